#!/usr/bin/env bash
# Fresh machine to test results in one command: creates .venv if absent, installs vidmoe with its
# test extra, runs the suite. Extra arguments go to pytest (e.g. -m "not slow" for the quick part).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build on some machines.
python -c "import torch, torchvision" 2>/dev/null || python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[test]"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # see tests/conftest.py
exec python -m pytest -q "$@"
