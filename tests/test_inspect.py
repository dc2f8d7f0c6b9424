"""`vidmoe inspect` end to end on a tiny random model saved like a training export."""

import json

import av
import numpy as np
import pytest
import torch

from vidmoe.cli import main as cli_main
from vidmoe.config import load_config, save_config

TINY = ["model.num_frames=4", "model.sample_size=16", "model.patch_size=4", "model.hidden_size=32", "model.depth=2",
        "model.num_heads=2", "model.ffn_hidden=32", "model.text=false", "model.num_classes=3",
        "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_pool=shared", "data.eval_clips=4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny shared-pool model, randomly perturbed so its output and routing are not trivial."""
    from vidmoe.model import build_model

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))  # adaLN-Zero would make the output exactly zero
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    save_config(cfg, path / "vidmoe_config.yaml")
    return path


def _decode(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.slow
def test_inspect_writes_metrics_report_figures_and_overlays(model_dir, tmp_path):
    from vidmoe.analysis.inspect import inspect

    out = inspect(model_dir, out=tmp_path / "report", clips=3, timesteps=[0.25, 0.75], seed=1,
                  ablate=["blocks.0.spatial:1", "blocks.1.temporal:0"], batch_size=2, permutations=5,
                  precision="no", progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    names = [f"blocks.{i}.{kind}" for i in range(2) for kind in ("spatial", "temporal")]
    assert [layer["name"] for layer in metrics["layers"]] == names
    assert metrics["clips"] == 3 and metrics["grid"] == [4, 4, 4]
    for layer in metrics["layers"]:
        assert layer["kind"] == layer["name"].rsplit(".", 1)[1]
        assert len(layer["load"]) == 4 and sum(layer["load"]) == pytest.approx(1.0)
        assert layer["tokens"] == 3 * 2 * 64 and layer["assignments"] == 2 * layer["tokens"]
        assert 0 <= layer["mi_over_h"]["motion"] <= 1
        assert set(layer["null_mi_over_h"]["motion"]) == {"mean", "std", "z", "p"}
        assert {"motion", "color", "shape", "time", "frame", "border"} <= set(layer["mi_over_h"])
        assert layer["pool"] == layer["name"].rsplit(".", 1)[0]
        assert -1 <= layer["weight_cosine"]["max"] <= 1
        assert layer["experts_per_token"]["motion"] == [pytest.approx(2.0)] * 2  # token choice, dropless: K each
    assert [p["name"] for p in metrics["pools"]] == ["blocks.0", "blocks.1"]

    # ablation: same noise and timesteps, one expert blocked -> a different loss on moving and static pixels
    ablated = [(a["router"], a["expert"]) for a in metrics["ablations"]]
    assert ablated == [("blocks.0.spatial", 1), ("blocks.1.temporal", 0)]
    for ablation in metrics["ablations"]:
        for part in ("moving", "static", "all"):
            change = ablation["loss"][part]
            assert change["base"] == pytest.approx(metrics["loss"][part])
            assert change["ablated"] != pytest.approx(change["base"], rel=1e-6)

    report = (out / "report.md").read_text()
    for name in names:
        assert f"`{name}`" in report
    assert "## Ablation" in report and "## Shared expert pools" in report
    for rel in metrics["files"]["figures"].values():
        assert f"]({rel})" in report or rel.endswith("legend.png")
        from matplotlib.image import imread

        assert imread(out / rel).shape[-1] in (3, 4)
    assert set(metrics["files"]["overlays"]) == {"blocks.0.spatial", "blocks.1.temporal"}  # first and last router
    for paths in metrics["files"]["overlays"].values():
        for rel in paths:
            frames = _decode(out / rel)
            assert len(frames) == 4 and frames[0].shape[0] >= 128


@pytest.mark.slow
def test_inspect_expert_choice_reports_experts_per_token(tmp_path):
    """Under expert choice tokens get different numbers of experts; the shares average back to K."""
    from vidmoe.analysis.inspect import inspect
    from vidmoe.model import build_model

    cfg = load_config(None, TINY + ["model.moe.router=expert_choice"])
    torch.manual_seed(1)
    model = build_model(cfg.model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "model")
    save_config(cfg, tmp_path / "model" / "vidmoe_config.yaml")
    out = inspect(tmp_path / "model", out=tmp_path / "report", clips=2, timesteps=[0.5], seed=1, batch_size=2,
                  permutations=2, precision="no", progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    shares = metrics["attributes"]["motion"]["shares"]
    for layer in metrics["layers"]:
        per_value = layer["experts_per_token"]["motion"]
        assert layer["assignments"] == 2 * layer["tokens"]  # 64 tokens a clip: each of 4 experts takes 32
        assert sum(s * v for s, v in zip(shares, per_value) if s) == pytest.approx(2.0)
    assert "Experts per token" in (out / "report.md").read_text()


def test_cli_inspect_rejects_bad_arguments(model_dir, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert cli_main(["inspect", "--model", str(model_dir), "--out", out, "--ablate", "blocks.0.spatial"]) == 2
    assert "LAYER:EXPERT" in capsys.readouterr().err
    assert cli_main(["inspect", "--model", str(model_dir), "--out", out, "--ablate", "blocks.9.spatial:0"]) == 2
    assert "unknown router" in capsys.readouterr().err
    assert cli_main(["inspect", "--model", str(model_dir), "--out", out, "--ablate", "blocks.0.spatial:7"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli_main(["inspect", "--model", str(model_dir), "--out", out, "--layers", "nope"]) == 2
    assert "no router named" in capsys.readouterr().err
    assert cli_main(["inspect", "--model", str(tmp_path / "missing"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_inspect_on_a_video_folder_estimates_motion(model_dir, tmp_path, capsys):
    from vidmoe.video_io import write_video

    videos = tmp_path / "videos"
    for k in range(2):  # a bright square moving over a dark background
        frames = np.full((8, 16, 16, 3), 20, dtype=np.uint8)
        for t in range(8):
            frames[t, 4 + k:10 + k, t:t + 6] = 230
        write_video(videos / f"clip{k}.mp4", frames, fps=8, upscale=1)
    out = tmp_path / "report"
    code = cli_main(["inspect", "--model", str(model_dir), "--data", str(videos), "--out", str(out), "--clips", "2",
                     "--timesteps", "0.5", "--layers", "blocks.1", "--permutations", "3", "--precision", "no",
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attributes"]["motion"]["source"] == "frame difference"
    assert 0 < metrics["attributes"]["motion"]["shares"][1] < 1
    assert "color" not in metrics["attributes"]
    assert set(metrics["files"]["overlays"]) == {"blocks.1.spatial", "blocks.1.temporal"}
