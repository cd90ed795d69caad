#!/usr/bin/env bash
# The test command: the whole suite, with the real CIFAR-10 cache when BENCH_DATA_DIR has it.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_DATA_DIR="${BENCH_DATA_DIR:-$(cd .. && pwd)/shared/data}"
exec .venv/bin/python -m pytest -q -ra "$@"
