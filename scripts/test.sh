#!/usr/bin/env bash
# The test command: the whole suite, with the real CIFAR-10 cache when BENCH_DATA_DIR has it.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_DATA_DIR="${BENCH_DATA_DIR:-$(cd .. && pwd)/shared/data}"

# Headless Chromium for the report's HTML screenshot test (tests/test_report_html.py), from the system
# packages. Only where that can work (apt-get, root); otherwise say why: the test then skips with its reason.
have_chromium() {
  [ -n "${BENCH_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1
}
if ! have_chromium; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: chromium not installed and no apt-get here: the HTML screenshot test will skip" >&2
  elif [ "$(id -u)" != 0 ]; then
    echo "test.sh: chromium not installed (sudo apt-get install -y chromium); not root, so the HTML screenshot test will skip" >&2
  else
    echo "test.sh: installing chromium (apt-get) for the HTML screenshot test" >&2
    # bounded: an offline or slow mirror must not hold up the tests
    if ! (export DEBIAN_FRONTEND=noninteractive
          timeout 120 apt-get update -qq >/dev/null 2>&1
          timeout 300 apt-get install -y -qq chromium >/dev/null 2>&1); then
      echo "test.sh: could not install chromium (offline?): the HTML screenshot test will skip" >&2
    fi
  fi
fi

# One pytest-xdist worker per core, each kept to its core (tests/conftest.py); whole modules go to one
# worker (their shared fixtures are computed once), the longest first. BENCH_TEST_WORKERS=1: one process.
workers="${BENCH_TEST_WORKERS:-$(nproc)}"
parallel=()
if [ "$workers" -gt 1 ]; then parallel=(-n "$workers" --dist loadscope --no-loadscope-reorder); fi
# `long` tests (a real CIFAR-10 preset rerun against recorded numbers) run on request: BENCH_TEST_WORKERS=1 ... -m long
exec .venv/bin/python -m pytest -q -ra -m "not long" "${parallel[@]}" "$@"
