import os
from pathlib import Path

# One thread per test process, set before torch loads: two processes with two OpenMP threads each
# on a 2-core machine spin against each other and run many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
