"""Faults during training: kill -9 at any moment, then resume; non-finite losses and gradients."""

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vidmoe.cli import main
from vidmoe.config import load_config
from vidmoe.train import CHECKPOINT_DELAY_ENV, COMPLETE_MARKER, Trainer, list_checkpoints

from conftest import CONFIGS, ROOT

TINY = str(CONFIGS / "tiny.yaml")
# the module, not the function vidmoe.train that the package exports under the same name
train_module = importlib.import_module("vidmoe.train")


def overrides(run: Path, *extra: str) -> list[str]:
    # quoted "no": YAML reads a bare no as false
    return [f"train.output_dir={run}", 'train.mixed_precision="no"', "train.sample_every=0", *extra]


def log_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def final_step(run: Path) -> int:
    """The step of the newest complete checkpoint (checked against its trainer state)."""
    step, checkpoint = list_checkpoints(run)[0][-1]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
    return step


# ----------------------------------------------------------------------------- kill -9


KILL_RUN = ("train.max_steps=8", "train.checkpoint_every=2", "train.log_every=1", "train.keep_checkpoints=2")


def start_training(run: Path, delay: float) -> tuple[subprocess.Popen, Path]:
    """``vidmoe train`` in a child process whose checkpoint writes each take ``delay`` seconds more."""
    env = {**os.environ, CHECKPOINT_DELAY_ENV: str(delay), "OMP_NUM_THREADS": "1"}
    stderr = run.parent / "killed.stderr"
    with open(stderr, "w") as handle:  # a file, not a pipe: a full pipe would block the child
        child = subprocess.Popen([sys.executable, "-m", "vidmoe", "train", "--config", TINY,
                                  *overrides(run, *KILL_RUN)], cwd=ROOT, env=env, stdout=handle, stderr=handle)
    return child, stderr


def kill_when(child: subprocess.Popen, stderr: Path, ready, limit: float = 120.0) -> None:
    """SIGKILL the child as soon as ``ready()`` holds (polling); fail if it exits first."""
    give_up = time.monotonic() + limit
    while not ready():
        if child.poll() is not None:
            pytest.fail(f"training exited ({child.returncode}) before the moment to kill it:\n{stderr.read_text()}")
        if time.monotonic() > give_up:
            child.kill()
            child.wait()
            pytest.fail(f"the moment to kill never came:\n{stderr.read_text()}")
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL


def resume_to_the_end(run: Path, capsys) -> str:
    """``vidmoe train --resume latest`` to max_steps; returns what it printed on stderr."""
    capsys.readouterr()
    assert main(["train", "--config", TINY, *overrides(run, *KILL_RUN), "--resume", "latest"]) == 0
    err = capsys.readouterr().err
    assert final_step(run) == 8
    info = json.loads((run / "model" / "train_info.json").read_text())
    assert info["step"] == 8 and (run / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert log_steps(run) == list(range(1, 9))  # lines the killed session wrote after its checkpoint are gone
    assert not list(run.glob(".tmp-*"))
    return err


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(CHECKPOINT_DELAY_ENV, raising=False)
    run = tmp_path / "run"
    child, stderr = start_training(run, delay=2.0)
    writing = run / ".tmp-checkpoint-4"
    kill_when(child, stderr, writing.is_dir)
    assert writing.is_dir() and not (run / "checkpoint-4").exists()
    assert [step for step, _ in list_checkpoints(run)[0]] == [2]

    err = resume_to_the_end(run, capsys)
    assert "ignoring" in err and ".tmp-checkpoint-4" in err and "incomplete" in err
    assert "checkpoint-2 at step 2" in err


@pytest.mark.slow
def test_kill_after_the_second_checkpoint_resumes_from_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(CHECKPOINT_DELAY_ENV, raising=False)
    run = tmp_path / "run"
    # the delay keeps the third checkpoint from being published before the kill
    child, stderr = start_training(run, delay=2.0)
    kill_when(child, stderr, (run / "checkpoint-4" / COMPLETE_MARKER).is_file)
    with open(run / "log.jsonl", "a") as log:
        log.write('{"step": 5, "lo')  # what a kill in the middle of a log line leaves

    err = resume_to_the_end(run, capsys)
    assert "checkpoint-4 at step 4" in err


# ----------------------------------------------------------------------------- non-finite steps


def faulty_loss(bad_calls, monkeypatch, on_call=None):
    """Replace the trainer's loss with one that is NaN (odd bad calls) or infinite (even ones) on ``bad_calls``.

    Calls are counted from 1; with train.grad_accum=1, call k is step k. ``on_call(k, model)`` runs first.
    """
    real = train_module.training_loss
    calls = 0

    def loss(model, *args):
        nonlocal calls
        calls += 1
        if on_call is not None:
            on_call(calls, model)
        total, flow, out = real(model, *args)
        if calls in bad_calls:
            bad = float("nan") if calls % 2 else float("inf")
            return total * bad, flow * bad, out
        return total, flow, out

    monkeypatch.setattr(train_module, "training_loss", loss)


def snapshot(trainer: Trainer) -> list[torch.Tensor]:
    """Weights and EMA weights, copied."""
    return [p.detach().clone() for p in trainer.params] + [p.detach().clone() for p in trainer.ema.shadow_params]


def test_nonfinite_steps_are_skipped_without_touching_weights_or_ema(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    # Weight decay and Adam's momentum would move the weights even with zeroed gradients.
    cfg = load_config(TINY, overrides(run, "train.max_steps=6", "train.log_every=3", "train.checkpoint_every=0",
                                      "train.weight_decay=0.1"))
    trainer = Trainer(cfg)
    before = {}
    faulty_loss({3, 4}, monkeypatch, on_call=lambda k, model: before.setdefault(k, snapshot(trainer)))
    trainer.fit()

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    assert not same(before[2], before[3])  # a good step moves the weights and the EMA
    assert same(before[3], before[5])  # steps 3 (NaN) and 4 (inf) left both alone
    assert all(torch.isfinite(p).all() for p in snapshot(trainer))
    assert trainer.state.step == 6 and trainer.state.skipped_steps == 2
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 2
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(3, 1), (6, 2)]
    assert all(math.isfinite(r["loss"]) for r in records)  # the mean is over the steps that were applied
    err = capsys.readouterr().err
    assert "step 3: non-finite loss or gradient" in err and "step 4: non-finite" in err


def test_a_run_of_nonfinite_steps_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    args = ["train", "--config", TINY, *overrides(run, "train.max_steps=12", "train.checkpoint_every=4",
                                                    "train.max_bad_steps=3")]
    faulty_loss(set(range(9, 100)), monkeypatch)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vidmoe train: error: 3 steps in a row") and "non-finite" in last
    assert str(run / "checkpoint-8") in last
    assert [step for step, _ in list_checkpoints(run)[0]] == [4, 8]  # nothing saved at the failure
    assert not (run / "model").exists()
    weights = load_file(run / "checkpoint-8" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())

    monkeypatch.undo()  # the cause is gone (say, a lower lr): the run continues from the last good checkpoint
    assert main([*args, "--resume", "latest"]) == 0
    assert "checkpoint-8 at step 8" in capsys.readouterr().err
    assert final_step(run) == 12 and (run / "model" / "config.json").is_file()
