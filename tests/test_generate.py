"""Generation: export round trip, files that decode, guidance and seeds, bad model folders."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from safetensors.torch import load_file

from vidmoe.cli import main
from vidmoe.config import load_config
from vidmoe.errors import ModelFolderError, UsageError
from vidmoe.data import build_dataset
from vidmoe.generate import (EXAMPLE_CONDITIONS_FILE, draw_example_conditions, example_conditions, generate,
                             load_model_dir, save_videos)
from vidmoe.model import build_model
from vidmoe.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained for a few steps and exported."""
    out = tmp_path_factory.mktemp("gen") / "run"
    train(load_config(TINY, [f"train.output_dir={out}", 'train.mixed_precision="no"', "train.max_steps=4",
                             "train.checkpoint_every=0", "train.sample_every=0"]))
    return out


@pytest.fixture(scope="module")
def cfg(run_dir):
    return load_config(run_dir / "model" / "vidmoe_config.yaml")


def random_model(**overrides):
    """A tiny model with every weight random, so the condition visibly changes the output."""
    cfg = load_config(TINY, [f"{k}={v}" for k, v in overrides.items()] + ["model.vocab=[a,red,blue,circle]"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def test_export_round_trip(run_dir, cfg):
    model, loaded_cfg, vae = load_model_dir(run_dir / "model", device="cpu")
    assert vae is None and not model.training
    saved = load_file(run_dir / "model" / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert loaded_cfg.model.vocab and loaded_cfg.model == cfg.model
    assert json.loads((run_dir / "model" / "scheduler" / "scheduler_config.json").read_text())["shift"] == 1.0

    videos = generate(run_dir, num_videos=2, steps=3, seed=5, device="cpu")  # a run folder works too
    t, (h, w) = cfg.model.num_frames, cfg.model.frame_size
    assert videos.shape == (2, t, h, w, 3) and videos.dtype == torch.uint8
    assert torch.equal(videos, generate(run_dir / "model", num_videos=2, steps=3, seed=5, device="cpu"))


@pytest.mark.slow
def test_fp16_copy_loads_in_fp32_and_generates_the_same_clips(run_dir, tmp_path):
    half = tmp_path / "half"
    ship = [sys.executable, str(ROOT / "scripts" / "ship_model.py"), str(run_dir / "model"), str(half)]
    bad = subprocess.run(ship + ["--guidance-min-t", "1.5"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--guidance-min-t must be in [0, 1)" in bad.stderr and not half.exists()
    subprocess.run(ship + ["--guidance", "2.5", "--guidance-min-t", "0.4"], check=True, capture_output=True)
    saved = load_config(half / "vidmoe_config.yaml").sample
    assert (saved.guidance, saved.guidance_min_t) == (2.5, 0.4)
    stored = load_file(half / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert (half / EXAMPLE_CONDITIONS_FILE).read_text() == (run_dir / "model" / EXAMPLE_CONDITIONS_FILE).read_text()
    model, _, _ = load_model_dir(half, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    full = generate(run_dir / "model", num_videos=2, steps=3, seed=5, device="cpu", guidance=2.5,
                    guidance_min_t=0.4).int()
    copy = generate(half, num_videos=2, steps=3, seed=5, device="cpu").int()  # the copy's own defaults
    assert (full - copy).abs().max() <= 2  # uint8 levels: fp16 rounding of the weights only


@pytest.mark.slow
def test_fp16_copy_takes_the_raw_weights_of_the_final_checkpoint(run_dir, tmp_path):
    half, final = tmp_path / "half", run_dir / "checkpoint-4"
    ship = [sys.executable, str(ROOT / "scripts" / "ship_model.py"), str(run_dir / "model"), str(half), "--weights"]
    earlier = tmp_path / "checkpoint-2"
    shutil.copytree(final, earlier)
    (earlier / "trainer_state.json").write_text(json.dumps({"step": 2}))
    bad = subprocess.run(ship + [str(earlier)], capture_output=True, text=True)
    assert bad.returncode == 2 and "a checkpoint of step 2" in bad.stderr and not half.exists()
    subprocess.run(ship + [str(final)], check=True, capture_output=True)
    stored = load_file(half / "diffusion_pytorch_model.safetensors")
    raw = load_file(final / "model.safetensors")
    ema = load_file(run_dir / "model" / "diffusion_pytorch_model.safetensors")
    assert stored.keys() == raw.keys() and all(torch.equal(stored[k], raw[k].half()) for k in raw)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # so the copy did not keep the EMA
    info = json.loads((half / "train_info.json").read_text())
    assert info["weights"] == "raw" and info["step"] == 4


def test_python_generate_takes_the_models_sample_defaults(run_dir, cfg, tmp_path):
    import shutil

    from vidmoe.config import save_config

    low = tmp_path / "low"
    shutil.copytree(run_dir / "model", low)
    saved = load_config(low / "vidmoe_config.yaml")
    saved.sample.steps, saved.sample.guidance = 2, 1.0
    save_config(saved, low / "vidmoe_config.yaml")
    kw = dict(prompt="a red circle", label=0, num_videos=2, seed=5, device="cpu")
    assert torch.equal(generate(low, **kw), generate(low, steps=2, guidance=1.0, **kw))
    model = run_dir / "model"
    assert torch.equal(generate(model, **kw), generate(model, steps=cfg.sample.steps, guidance=cfg.sample.guidance, **kw))
    assert not torch.equal(generate(low, **kw), generate(low, steps=2, guidance=3.0, **kw))


def test_shift_overrides_the_saved_schedule(run_dir):
    def clips(**kw):
        return generate(run_dir / "model", num_videos=2, steps=3, seed=5, device="cpu", **kw)

    assert torch.equal(clips(), clips(shift=1.0))  # the export saved sample.shift = 1
    assert not torch.equal(clips(), clips(shift=3.0))


def test_seed_and_batch_size():
    model = random_model()
    a = generate(model, prompt="a red circle", num_videos=3, steps=2, seed=1, batch_size=3)
    b = generate(model, prompt="a red circle", num_videos=3, steps=2, seed=1, batch_size=1)
    c = generate(model, prompt="a red circle", num_videos=3, steps=2, seed=2)
    assert (a.int() - b.int()).abs().max() <= 1  # the same noise per clip whatever the batching
    assert not torch.equal(a, c)


def test_stochastic_sampler_is_seeded_per_clip():
    model = random_model()

    def clips(**kw):
        return generate(model, prompt="a red circle", num_videos=3, steps=3, **kw).int()

    a = clips(seed=1, batch_size=3, scheduler="euler-stochastic")
    b = clips(seed=1, batch_size=1, scheduler="euler-stochastic")
    assert (a - b).abs().max() <= 1  # each clip's step noise is its own stream
    assert not torch.equal(a, clips(seed=2, scheduler="euler-stochastic"))
    assert not torch.equal(a, clips(seed=1, batch_size=3, scheduler="euler"))


def test_guidance_changes_the_clips():
    model = random_model()
    plain = generate(model, prompt="a blue circle", label=1, num_videos=2, steps=2, guidance=1.0, seed=0)
    guided = generate(model, prompt="a blue circle", label=1, num_videos=2, steps=2, guidance=4.0, seed=0)
    assert (plain.int() - guided.int()).abs().float().mean() > 1.0


def test_guidance_interval_guides_the_noisy_steps_only():
    model = random_model()
    kwargs = dict(prompt="a blue circle", label=1, num_videos=2, steps=4, seed=0)
    plain = generate(model, guidance=1.0, **kwargs)
    late = generate(model, guidance=4.0, guidance_min_t=0.99, **kwargs)  # only the first step (t = 1)
    full = generate(model, guidance=4.0, **kwargs)
    assert not torch.equal(late, plain) and not torch.equal(late, full)
    with pytest.raises(UsageError, match="guidance-min-t"):
        generate(model, guidance=4.0, guidance_min_t=1.5, **kwargs)


def test_conditions_are_checked():
    model = random_model(**{"model.text": "false"})
    with pytest.raises(UsageError, match="no text conditioning"):
        generate(model, prompt="a red circle", num_videos=1, steps=1)
    with pytest.raises(UsageError, match="out of range"):
        generate(model, label=7, num_videos=1, steps=1)
    with pytest.raises(UsageError, match="2 labels for 3 clips"):
        generate(model, label=[0, 1], num_videos=3, steps=1)


def _decode(path: Path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, float(stream.average_rate or stream.base_rate or 0)


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webm"])
def test_cli_writes_files_that_decode(run_dir, cfg, tmp_path, fmt):
    args = ["generate", "--model", str(run_dir / "model"), "--num-videos", "2", "--steps", "2", "--seed", "3",
            "--format", fmt, "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    files = sorted((tmp_path / "a").iterdir())
    assert [f.name for f in files] == [f"sample_000.{fmt}", f"sample_001.{fmt}"]
    t, (h, w), fps = cfg.model.num_frames, cfg.model.frame_size, cfg.sample.fps
    for file in files:
        frames, rate = _decode(file)
        assert len(frames) == t and rate == pytest.approx(fps, rel=0.02)
        fh, fw = frames[0].shape[:2]
        if fmt == "gif":
            assert (fh, fw) == (h, w)
        else:  # small frames are upscaled by an integer factor for players
            assert fh % h == 0 and fw % w == 0 and fh // h == fw // w and fh >= 128
        again, _ = _decode(tmp_path / "b" / file.name)
        assert all((x == y).all() for x, y in zip(frames, again))  # same seed, same clips
        if fmt != "webm":  # WebM (Matroska) stamps each file with a random segment id
            assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes()


def test_png_grid(run_dir, cfg, tmp_path):
    assert main(["generate", "--model", str(run_dir / "model"), "--num-videos", "2", "--steps", "2",
                 "--format", "png", "--out", str(tmp_path), "--device", "cpu"]) == 0
    frames, _ = _decode(tmp_path / "grid.png")
    t, (h, w) = cfg.model.num_frames, cfg.model.frame_size
    assert len(frames) == 1 and frames[0].shape[:2] == (2 * (h + 1) - 1, t * (w + 1) - 1)


def test_prompts_file_gives_a_clip_per_line(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle bouncing\n\na blue square bouncing\n")
    args = ["generate", "--model", str(run_dir / "model"), "--steps", "2", "--format", "gif", "--device", "cpu"]
    assert main([*args, "--prompts-file", str(prompts), "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["sample_000.gif", "sample_001.gif"]
    assert all(len(_decode(tmp_path / "a" / f"sample_00{i}.gif")[0]) == 4 for i in range(2))  # tiny: 4 frames
    (tmp_path / "empty.txt").write_text("\n")
    assert main([*args, "--prompts-file", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "b")]) == 2
    assert main([*args, "--prompts-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "has no prompts" in err and "missing.txt" in err


def test_no_prompt_conditions_on_the_training_examples(run_dir, cfg, tmp_path, capsys):
    model_dir = run_dir / "model"
    examples = json.loads((model_dir / EXAMPLE_CONDITIONS_FILE).read_text())
    dataset = build_dataset(cfg)
    assert examples == example_conditions(dataset)  # the export wrote the first training clips' conditions
    assert examples["captions"][0] == dataset[0]["caption"] and len(examples["captions"]) == min(64, len(dataset))
    captions, labels = draw_example_conditions(model_dir, 3, seed=7)
    assert (captions, labels) == draw_example_conditions(model_dir, 3, seed=7)
    assert all(c in examples["captions"] for c in captions) and all(v in examples["labels"] for v in labels)

    args = ["generate", "--model", str(model_dir), "--steps", "2", "--num-videos", "3", "--seed", "7",
            "--format", "png", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "drawn")]) == 0
    assert EXAMPLE_CONDITIONS_FILE in capsys.readouterr().err
    explicit = generate(model_dir, prompt=captions, label=labels, num_videos=3, steps=2, seed=7, device="cpu")
    save_videos(explicit, tmp_path / "explicit", "png")
    assert (tmp_path / "drawn" / "grid.png").read_bytes() == (tmp_path / "explicit" / "grid.png").read_bytes()
    assert main([*args, "--unconditional", "--out", str(tmp_path / "null")]) == 0
    null = generate(model_dir, num_videos=3, steps=2, seed=7, device="cpu")
    save_videos(null, tmp_path / "null_api", "png")
    assert (tmp_path / "null" / "grid.png").read_bytes() == (tmp_path / "null_api" / "grid.png").read_bytes()
    assert main([*args, "--unconditional", "--prompt", "a red circle", "--out", str(tmp_path / "x")]) == 2


def test_not_a_model_folder(tmp_path, capsys):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model_dir(tmp_path / "missing")
    with pytest.raises(ModelFolderError, match="not a vidmoe model folder"):
        load_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "vidmoe_config.yaml").write_text("{}\n")
    with pytest.raises(ModelFolderError, match="UNet2DModel"):
        load_model_dir(tmp_path)
    assert main(["generate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vidmoe generate: error:")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.2", "--config", str(TINY)]) == 0
    printed = capsys.readouterr().out
    assert "[demo 1/3]" in printed and "Where everything is" in printed
    assert (out / "train" / "model" / "config.json").is_file()
    assert sorted(p.name for p in (out / "samples").glob("sample_*.mp4")) == [f"sample_{i:03d}.mp4" for i in range(8)]
    assert len((out / "samples" / "prompts.txt").read_text().splitlines()) == 8
    frames, _ = _decode(out / "samples" / "grid.gif")
    assert len(frames) == load_config(TINY).model.num_frames
    assert main(["demo", "--out", str(out), "--minutes", "0.2", "--config", str(TINY)]) == 2  # never overwrites


def test_shipped_model_generates(tmp_path):
    """samples/bouncing-moe, committed in fp16, loads and writes clips (2 steps: a smoke test of the folder)."""
    shipped = ROOT / "samples" / "bouncing-moe"
    model, cfg, _ = load_model_dir(shipped, device="cpu")
    assert cfg.sample.scheduler == "euler-stochastic" and cfg.model.prediction == "x0"
    assert main(["generate", "--model", str(shipped), "--prompt", "a red circle bouncing", "--num-videos", "1",
                 "--steps", "2", "--format", "gif", "--out", str(tmp_path), "--device", "cpu"]) == 0
    frames, _ = _decode(tmp_path / "sample_000.gif")
    assert len(frames) == cfg.model.num_frames
