#!/usr/bin/env bash
# The vidmoe demo on a fresh machine: make .venv if needed, install the package, run `vidmoe demo`.
# Options are passed on: scripts/demo.sh --minutes 5 --out runs/mydemo
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    echo "creating .venv"
    python3 -m venv .venv
fi
PY=.venv/bin/python

# torch is the big download; install the pinned build only when none is importable yet.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install torch==2.14.1 torchvision==0.29.1
fi
"$PY" -m pip install --quiet -e .

exec "$PY" -m vidmoe demo "$@"
