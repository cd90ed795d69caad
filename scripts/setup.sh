#!/usr/bin/env bash
# Create .venv and install bench with its test, Slurm, Ray and generated-corruption extras.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pinned torch first: on these machines the pins install from local disk.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,slurm,ray,corruptions]"
