import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture
def tiny_overrides():
    """Overrides that make any config test-sized."""
    return []


def pytest_configure(config):
    # Tests share two cores with whatever else runs; one thread per process keeps them predictable.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
