"""Two CPU processes under torchrun (gloo): equal weights on both ranks, one writer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VIDMOE_RANK_CHECKSUMS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vidmoe", "train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"train.output_dir={run}",
           'train.mixed_precision="no"', "train.max_steps=6", "train.checkpoint_every=3", "train.sample_every=3",
           "train.log_every=3"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    checksums = [json.loads((run / f"rank-{rank}-checksum.json").read_text()) for rank in (0, 1)]
    assert checksums[0] == checksums[1]  # the gradients were averaged: identical weights on both ranks
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [3, 6]
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_batch"] == 8 and state["step"] == 6 and state["batch_in_epoch"] == 6  # 4 clips per rank
    files = {p.name for p in (run / "checkpoint-6").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "COMPLETE"} <= files
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000003.gif", "step-0000006.gif"]
    assert (run / "model" / "config.json").is_file()
