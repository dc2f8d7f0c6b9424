"""Training: the loss goes down, checkpoints are atomic and complete, resume continues exactly."""

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vidmoe.cli import main
from vidmoe.config import load_config
from vidmoe.data import build_dataset, collate
from vidmoe.errors import UsageError
from vidmoe.model import build_model
from vidmoe.train import (COMPLETE_MARKER, SNAPSHOT_DIR, EpochBatchSampler, find_checkpoint, list_checkpoints,
                          soft_edge_source, train, training_loss, training_timesteps, wsd_factor)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FP32 = 'train.mixed_precision="no"'  # quoted: YAML reads a bare no as false


def tiny_overrides(out: Path, *extra: str) -> list[str]:
    return [f"train.output_dir={out}", FP32, "train.sample_every=0", *extra]


def tiny(out: Path, *extra: str):
    return load_config(TINY, tiny_overrides(out, *extra))


def log_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    def batches(**kw):
        return list(EpochBatchSampler(20, batch_size=3, seed=7, **kw))

    epoch0 = batches(epoch=0)
    assert len(epoch0) == 6 and epoch0 == batches(epoch=0)
    assert epoch0 != batches(epoch=1)
    assert batches(epoch=0, start=4) == epoch0[4:]  # resume skips by index
    ranks = [batches(epoch=0, rank=r, num_processes=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    seen = [i for rank in ranks for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 18  # disjoint shards, the incomplete last batch dropped


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    cfg = load_config(TINY, ["model.cond_dropout=0.0"])
    data = build_dataset(cfg, "train")
    cfg.model.vocab = data.vocabulary()
    batch = collate([data[0], data[1]])
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        torch.manual_seed(123)  # the same timesteps and noise every step: a pure memorisation task
        loss, flow, _ = training_loss(model, batch["video"], batch["label"], batch["caption"], cfg.train)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(flow.item())
    assert sum(losses[-5:]) / 5 < losses[0] / 3


def test_accelerate_autocasts_to_bf16_on_cpu():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        layer = accelerator.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8)))
        dtypes = []
        layer[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        out = layer(torch.randn(2, 8))
        assert dtypes == [torch.bfloat16] and out.dtype == torch.float32
    finally:
        AcceleratorState._reset_state()


def _fake_checkpoint(path: Path, step: int, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
        (path / COMPLETE_MARKER).write_text("")
    return path


def test_find_checkpoint_skips_incomplete_folders(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint-5", 5)
    _fake_checkpoint(tmp_path / "checkpoint-20", 20)
    _fake_checkpoint(tmp_path / "checkpoint-30", 30, complete=False)
    _fake_checkpoint(tmp_path / ".tmp-checkpoint-40", 40)
    complete, incomplete = list_checkpoints(tmp_path)
    assert [step for step, _ in complete] == [5, 20]
    assert {p.name for p in incomplete} == {"checkpoint-30", ".tmp-checkpoint-40"}
    reports = []
    assert find_checkpoint(tmp_path, "latest", report=reports.append) == tmp_path / "checkpoint-20"
    assert len(reports) == 2 and any("checkpoint-30" in r for r in reports)
    assert find_checkpoint(tmp_path, str(tmp_path / "checkpoint-5")) == tmp_path / "checkpoint-5"
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoint-30"))
    assert find_checkpoint(tmp_path / "empty", "latest", report=reports.append) is None


def test_existing_run_without_resume_is_refused(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "run" / "checkpoint-10", 10)
    assert main(["train", "--config", str(TINY), *tiny_overrides(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume latest" in err[0]


@pytest.mark.slow
def test_checkpoints_resume_latest_and_ignore_half_written(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=10", "train.sample_every=5"))
    checkpoint = run / "checkpoint-10"
    assert (checkpoint / COMPLETE_MARKER).is_file()
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json",
            "vidmoe_config.yaml"} <= {p.name for p in checkpoint.iterdir()}
    model = run / "model"
    assert {"config.json", "diffusion_pytorch_model.safetensors", "vidmoe_config.yaml"} <= {
        p.name for p in model.iterdir()}
    assert (model / "scheduler" / "scheduler_config.json").is_file()
    assert log_steps(run) == [5, 10]
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss", "lr", "grad_norm", "clips_per_s", "time"} <= set(record) and record["loss"] > 0
    assert any(k.startswith("aux/") for k in record)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000005.gif", "step-0000010.gif"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "clips_per_s", "moe/blocks.0.spatial/max_load",
            "moe/blocks.0.temporal/dropped_frac"} <= tags

    # A save that died half-way: a checkpoint folder without its marker, and a temporary folder.
    half = run / "checkpoint-12"
    half.mkdir()
    shutil.copy(checkpoint / "model.safetensors", half / "model.safetensors")
    (run / ".tmp-checkpoint-14").mkdir()
    capsys.readouterr()
    overrides = tiny_overrides(run, "train.max_steps=15")
    assert main(["train", "--config", str(TINY), *overrides, "--resume", "latest"]) == 0
    err = capsys.readouterr().err
    assert "ignoring" in err and "checkpoint-12" in err and "resumed from" in err and "step 10" in err
    state = json.loads((run / "checkpoint-15" / "trainer_state.json").read_text())
    assert state["step"] == 15
    assert [step for step, _ in list_checkpoints(run)[0]] == [10, 15]  # keep_checkpoints: 2
    assert not (run / ".tmp-checkpoint-14").exists()
    assert log_steps(run) == [5, 10, 15]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, optimizer):
    """N+M steps in one go and N steps resumed to N+M give the same weights, EMA and losses."""
    # A constant schedule (after a warmup that spans the resume point), so stopping at N needs no
    # other max_steps-independent stop; the data epoch (16 clips per epoch) ends in between too.
    common = ["train.lr_schedule=constant_with_warmup", "train.warmup_steps=8", "train.checkpoint_every=0",
              "train.log_every=1", "data.num_clips=16", f"train.optimizer={optimizer}"]
    train(tiny(tmp_path / "a", "train.max_steps=10", *common))
    train(tiny(tmp_path / "b", "train.max_steps=6", *common))
    train(tiny(tmp_path / "b", "train.max_steps=10", *common), resume="latest")
    for file in ("checkpoint-10/model.safetensors", "model/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "a" / file), load_file(tmp_path / "b" / file)
        assert a.keys() == b.keys()
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6, file
    losses = [[json.loads(line)["loss"] for line in (tmp_path / r / "log.jsonl").read_text().splitlines()]
              for r in "ab"]
    assert len(losses[0]) == 10 and losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_init_from_starts_from_an_exported_model(tmp_path, capsys):
    first = tmp_path / "first"
    train(tiny(first, "train.max_steps=3", "train.checkpoint_every=0"))
    weights = load_file(first / "model" / "diffusion_pytorch_model.safetensors")
    # A learning rate of ~0 and no EMA lag: the fine-tuned export must be the model it started from.
    second = tmp_path / "second"
    train(tiny(second, f"train.init_from={first / 'model'}", "train.max_steps=1", "train.lr=1e-12",
               "train.ema_decay=0.0", "train.checkpoint_every=0"))
    tuned = load_file(second / "model" / "diffusion_pytorch_model.safetensors")
    assert tuned.keys() == weights.keys()
    assert all(torch.allclose(tuned[k], weights[k], atol=1e-6) for k in weights)
    fresh = tmp_path / "fresh"
    train(tiny(fresh, "train.max_steps=1", "train.lr=1e-12", "train.ema_decay=0.0", "train.checkpoint_every=0"))
    other = load_file(fresh / "model" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.allclose(other[k], weights[k], atol=1e-6) for k in weights)
    # A folder of another network: one line, exit status 2, nothing trained.
    capsys.readouterr()
    code = main(["train", "--config", str(TINY), *tiny_overrides(tmp_path / "wide", "model.hidden_size=64"),
                 f"train.init_from={first / 'model'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.init_from" in err[0]
    assert not (tmp_path / "wide" / "model").exists()


def test_low_timestep_fraction_moves_that_share_below_the_cut(tmp_path):
    torch.manual_seed(0)
    base = training_timesteps(20000, tiny(tmp_path, "train.timestep_mean=1.2", "train.timestep_std=1.4").train, "cpu")
    mixed = training_timesteps(20000, tiny(tmp_path, "train.timestep_mean=1.2", "train.timestep_std=1.4",
                                           "train.low_timestep_fraction=0.25", "train.low_timestep_max=0.2").train, "cpu")
    assert 0 < mixed.min() and mixed.max() < 1
    assert (base < 0.1).float().mean() < 0.02  # logit-normal(1.2, 1.4) rarely goes there
    # A quarter uniform in (0, 0.2) puts about an eighth below 0.1, on top of the logit-normal's share.
    assert abs((mixed < 0.1).float().mean() - 0.125 - 0.75 * (base < 0.1).float().mean()) < 0.01


def test_soft_edge_source_blurs_only_low_noise_clips(tmp_path):
    x0 = torch.zeros(4, 3, 2, 16, 16)
    x0[..., 4:12, 4:12] = 1.0  # hard-edged squares
    t = torch.tensor([0.1, 0.2, 0.7, 0.9])
    assert soft_edge_source(x0, t, tiny(tmp_path).train) is None  # off by default
    cfg = tiny(tmp_path, "train.blur_prob=1.0", "train.blur_max_t=0.5", "train.blur_sigma=[0.8, 1.0]").train
    source = soft_edge_source(x0, t, cfg)
    assert torch.equal(source[2:], x0[2:])  # high noise: untouched
    assert soft_edge_source(x0, torch.full((4,), 0.02), cfg) is None  # nor where the x0 head's t is clamped
    edge = source[:2, ..., 8, 3:5]  # across the left edge: soft now, and every value in between
    assert ((edge > 0.01) & (edge < 0.99)).all()
    assert torch.allclose(source[:2].sum((2, 3, 4)), x0[:2].sum((2, 3, 4)), rtol=1e-4)  # blur keeps the mass
    with pytest.raises(Exception, match="train.blur_prob"):
        tiny(tmp_path, "train.blur_prob=1.5")


def test_low_noise_from_turns_the_options_on_late_in_the_run(tmp_path, monkeypatch, capsys):
    train_module = importlib.import_module("vidmoe.train")  # the module (vidmoe.train is also a function)
    flags, real_loss = [], train_module.training_loss

    def recording_loss(*args, **kwargs):
        flags.append(args[-1])  # the Trainer passes low_noise last
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", recording_loss)
    train(tiny(tmp_path / "run", "train.max_steps=10", "train.low_noise_from=0.5", "train.low_timestep_fraction=0.5",
               "train.blur_prob=0.5", "train.checkpoint_every=0"))
    assert flags == [False] * 5 + [True] * 5
    assert "step 5: the low-noise options start" in capsys.readouterr().err
    # Off, the timesteps are exactly the logit-normal ones.
    cfg = tiny(tmp_path, "train.low_timestep_fraction=1.0").train
    torch.manual_seed(0)
    plain = training_timesteps(64, tiny(tmp_path).train, "cpu")
    torch.manual_seed(0)
    assert torch.equal(training_timesteps(64, cfg, "cpu", low_noise=False), plain)
    with pytest.raises(Exception, match="train.low_noise_from"):
        tiny(tmp_path, "train.low_noise_from=1.0")


def test_warmup_stable_decay_factor():
    factors = [wsd_factor(step, step / 100, warmup_steps=10, decay_fraction=0.2) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0  # linear warmup
    assert factors[10:81] == pytest.approx([1.0] * 71)  # stable until 80% of the run
    assert factors[81] == pytest.approx(0.95)
    assert factors[90] == pytest.approx(0.5) and factors[100] == 0.0  # linear fall to zero
    # The run's progress may be ahead of its steps (a time budget): the decay follows progress.
    assert wsd_factor(50, 0.9, warmup_steps=10, decay_fraction=0.2) == pytest.approx(0.5)
    assert wsd_factor(50, 1.3, warmup_steps=10, decay_fraction=0.2) == 0.0


def test_warmup_stable_decay_run_ends_at_zero_lr(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=10", "train.lr_schedule=warmup_stable_decay", "train.warmup_steps=2",
               "train.decay_fraction=0.5", "train.log_every=1", "train.checkpoint_every=0", "train.lr=0.01"))
    lrs = [json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert lrs[2:5] == pytest.approx([0.01] * 3)
    assert lrs[5:] == pytest.approx([0.008, 0.006, 0.004, 0.002, 0.0])


@pytest.mark.slow
def test_time_budget_stops_early_and_still_exports(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=100000", "train.time_budget_minutes=0.0001", "train.grad_accum=2"))
    (step, checkpoint), = list_checkpoints(run)[0]
    assert step < 100000
    assert (run / "model" / "config.json").is_file()


@pytest.mark.slow
def test_trains_in_bf16_with_gradient_accumulation(tmp_path):
    run = tmp_path / "run"
    train(load_config(TINY, [f"train.output_dir={run}", "train.mixed_precision=bf16", "train.max_steps=4",
                             "train.grad_accum=2", "train.log_every=2", "train.checkpoint_every=0"]))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    # An untrained x0 head's velocity error is x0 / t: large at small t, but finite in bf16.
    assert all(0 < r["loss"] < 1e4 and r["grad_norm"] > 0 for r in records)


def test_export_weights_raw_exports_the_trained_weights_and_snapshots_keep_the_ema(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=3", "train.snapshot_every=3", "train.checkpoint_every=0",
               "train.export_weights=raw", "train.lr=1e-2"))
    final = load_file(run / "model" / "diffusion_pytorch_model.safetensors")
    raw = load_file(run / "checkpoint-3" / "model.safetensors")  # the checkpoint holds the raw weights
    ema = load_file(run / SNAPSHOT_DIR / "step-0000003" / "diffusion_pytorch_model.safetensors")
    assert final.keys() == raw.keys() == ema.keys()
    assert all(torch.equal(final[k], raw[k]) for k in final)
    assert any(not torch.equal(final[k], ema[k]) for k in final)
    assert json.loads((run / "model" / "train_info.json").read_text())["weights"] == "raw"
    assert json.loads((run / SNAPSHOT_DIR / "step-0000003" / "train_info.json").read_text())["weights"] == "ema"


def test_snapshots_export_the_ema_model_along_the_run(tmp_path):
    from vidmoe.generate import load_model_dir

    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=4", "train.snapshot_every=2", "train.checkpoint_every=0"))
    snapshots = sorted((run / SNAPSHOT_DIR).iterdir())
    assert [p.name for p in snapshots] == ["step-0000002", "step-0000004"]
    infos = [json.loads((p / "train_info.json").read_text()) for p in snapshots]
    assert [i["step"] for i in infos] == [2, 4] and 0 < infos[0]["train_seconds"] <= infos[1]["train_seconds"]
    final = load_file(run / "model" / "diffusion_pytorch_model.safetensors")
    last = load_file(snapshots[-1] / "diffusion_pytorch_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    first = load_file(snapshots[0] / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in final)
    model, cfg, _ = load_model_dir(snapshots[0], "cpu")  # a snapshot is a model folder
    assert cfg.train.snapshot_every == 2
