"""The whole path at a small size on built-in data: train within a time budget, generate, inspect."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .config import load_config
from .errors import UsageError

DEFAULT_CONFIG = "configs/bouncing_small.yaml"
NUM_CLIPS = 8
# Share of the budget kept for what follows training (final checkpoint and export, generating the
# clips, the expert inspection): measured at about 1.5 minutes on a 2-core CPU for bouncing_small.
AFTER_TRAINING_MINUTES = 1.5
# A run cut short by a time budget: reach the full learning rate quickly and keep it (a cosine
# over the config's max_steps would barely start), report often, and sample with fewer steps.
DEMO_OVERRIDES = ["train.warmup_steps=20", "train.lr_schedule=constant_with_warmup", "train.log_every=5",
                  "sample.steps=20"]


def find_config(path: str | Path) -> Path:
    """A config path as given, else relative to the source checkout (so the demo runs from any folder)."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    checkout = Path(__file__).resolve().parents[1] / path
    return checkout if checkout.is_file() else path


def demo(out: str | Path = "runs/demo", minutes: float = 8.0, config: str | Path = DEFAULT_CONFIG) -> Path:
    """Train ``config`` for at most ``minutes`` in total (training gets what the later stages leave), then
    generate clips and inspect the experts; everything lands in ``out``."""
    from .train import format_duration, list_checkpoints, train

    started = time.monotonic()
    out = Path(out)
    if minutes <= 0:
        raise UsageError("--minutes must be positive")

    def left() -> str:
        return f"{format_duration(minutes * 60 - (time.monotonic() - started))} left"

    run_dir = out / "train"
    if list_checkpoints(run_dir)[0]:
        raise UsageError(f"{out} already holds a demo run; remove it or pass another --out")
    train_minutes = max(minutes - AFTER_TRAINING_MINUTES, minutes / 2)
    cfg = load_config(find_config(config), [*DEMO_OVERRIDES, f"train.output_dir={run_dir}",
                                            f"train.time_budget_minutes={train_minutes:.2f}"])
    print(f"[demo 1/3] training {Path(config).stem} on {cfg.data.source} for up to {train_minutes:.1f} min "
          f"(at most {cfg.train.max_steps} steps); {left()}", flush=True)
    train(cfg)
    model_dir = run_dir / "model"

    print(f"[demo 2/3] generating {NUM_CLIPS} clips; {left()}", flush=True)
    samples = generate_clips(cfg, model_dir, out / "samples")

    print(f"[demo 3/3] inspecting what the experts learned; {left()}", flush=True)
    report = inspect_experts(model_dir, out / "inspect")

    print(f"\ndemo finished in {(time.monotonic() - started) / 60:.1f} min. Where everything is:")
    print(f"  training log   {run_dir / 'log.jsonl'}  (TensorBoard: tensorboard --logdir {run_dir})")
    print(f"  model          {model_dir}")
    print(f"  clips          {samples}/sample_*.mp4, grid: {samples / 'grid.gif'}, prompts: {samples / 'prompts.txt'}")
    if report is not None:
        print(f"  expert report  {report / 'report.md'}")
    print(f"  more clips     vidmoe generate --model {model_dir} --prompt \"a red circle\" --out {out / 'more'}")
    return out


def generate_clips(cfg, model_dir: Path, folder: Path) -> Path:
    """One clip per condition (caption and label) of held-out clips: mp4 files, a gif grid, the prompts."""
    from .data import build_dataset
    from .generate import generate, save_videos
    from .video_io import tile_videos, write_video

    data = build_dataset(cfg, "eval")
    items = [data[i % len(data)] for i in range(NUM_CLIPS)]
    prompts = [item["caption"] for item in items]
    text = cfg.model.text or cfg.model.text_encoder
    videos = generate(model_dir, prompt=prompts if text else None,
                      label=[item["label"] for item in items] if cfg.model.num_classes else None,
                      num_videos=NUM_CLIPS, steps=cfg.sample.steps, guidance=cfg.sample.guidance, seed=cfg.sample.seed)
    save_videos(videos, folder, "mp4", cfg.sample.fps)
    write_video(folder / "grid.gif", tile_videos(videos), fps=cfg.sample.fps)
    (folder / "prompts.txt").write_text("".join(f"sample_{i:03d}: {p}\n" for i, p in enumerate(prompts)))
    return folder


def inspect_experts(model_dir: Path, folder: Path) -> Path | None:
    """The expert report, when the analysis part of vidmoe is installed."""
    try:
        from .analysis.inspect import inspect
    except ImportError:
        print("  (vidmoe.analysis is not available; skipped)")
        return None
    return Path(inspect(model_dir, data="synthetic:bouncing_shapes", out=folder, clips=NUM_CLIPS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--minutes", type=float, default=8.0,
                        help="wall-time budget of the whole demo in minutes (default: 8)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"model/training config (default: {DEFAULT_CONFIG})")


def main(args: argparse.Namespace) -> int:
    demo(args.out, args.minutes, args.config)
    return 0
