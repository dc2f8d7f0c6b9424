"""Generation: load an exported model folder, sample clips with guidance, write video files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, ConfigError, load_config
from .diffusion import load_vae, sample, to_uint8_frames, vae_decode
from .errors import ModelFolderError, UsageError, check_writable_dir

CONFIG_FILE = "vidmoe_config.yaml"
VIDEO_FORMATS = ("mp4", "gif", "webm")
# Captions and labels of the first training clips, written with the model: what `vidmoe generate`
# conditions on when given no prompt and no label (clips like the training data, not the null condition).
EXAMPLE_CONDITIONS_FILE = "example_conditions.json"
NUM_EXAMPLE_CONDITIONS = 64


def example_conditions(dataset, count: int = NUM_EXAMPLE_CONDITIONS) -> dict:
    """{"captions": [...], "labels": [...]} of the first ``count`` clips of a dataset."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return {"captions": [str(item["caption"]) for item in items], "labels": [int(item["label"]) for item in items]}


def draw_example_conditions(model_dir: Path, num_videos: int, seed: int) -> Optional[tuple[list[str], list[int]]]:
    """(captions, labels) for num_videos clips drawn with ``seed`` from the model's example conditions;
    None when the folder has none (models exported before they were written)."""
    path = Path(model_dir) / EXAMPLE_CONDITIONS_FILE
    if not path.is_file():
        return None
    try:
        examples = json.loads(path.read_text())
        captions, labels = list(examples["captions"]), [int(v) for v in examples["labels"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ModelFolderError(f"{path} is not a valid example-conditions file") from None
    if not captions or len(captions) != len(labels):
        raise ModelFolderError(f"{path} is not a valid example-conditions file")
    picks = np.random.default_rng(seed).integers(len(captions), size=num_videos)
    return [captions[i] for i in picks], [labels[i] for i in picks]


def resolve_model_dir(path: str | Path) -> Path:
    """The model folder itself; a run folder (holding model/) is accepted too."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"{path} does not exist; pass the model/ folder of a training run (runs/NAME/model)")
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"
    missing = [name for name in ("config.json", CONFIG_FILE) if not (path / name).is_file()]
    if missing:
        raise ModelFolderError(f"{path} is not a vidmoe model folder (no {' or '.join(missing)}); pass the model/ "
                               "folder that 'vidmoe train' exports, e.g. runs/NAME/model")
    try:
        class_name = json.loads((path / "config.json").read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise ModelFolderError(f"{path / 'config.json'} is not a valid model config (not JSON)") from None
    if class_name != "VidMoETransformer":
        raise ModelFolderError(f"{path} holds a {class_name or 'unknown'} model, not a vidmoe VidMoETransformer")
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_dir(path: str | Path, device: Optional[torch.device | str] = None):
    """(model in eval mode, Config, VAE or None) from an exported folder; ModelFolderError if it is not one."""
    from .model import VidMoETransformer

    path = resolve_model_dir(path)
    device = torch.device(device) if device is not None else default_device()
    try:
        cfg = load_config(path / CONFIG_FILE)
    except ConfigError as err:
        raise ModelFolderError(f"{path / CONFIG_FILE}: {err}") from None
    try:
        # fp32 whatever the file holds (a folder may store fp16 weights to be small): autocast,
        # not the weights' dtype, decides the compute precision.
        model = VidMoETransformer.from_pretrained(path, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelFolderError(f"cannot load the model weights in {path}: {str(err).splitlines()[0]}") from None
    vae = None
    if cfg.model.vae:
        cfg.model.vae = str(path / "vae") if (path / "vae").is_dir() else cfg.model.vae
        try:
            vae = load_vae(cfg.model, device)
        except ConfigError as err:
            raise ModelFolderError(f"{path}: the model's VAE cannot be loaded: {err}") from None
    return model.to(device).eval(), cfg, vae


def _scheduler_config(model_dir: Path) -> Optional[dict]:
    """The scheduler settings saved with the model (its shift), if any."""
    file = model_dir / "scheduler" / "scheduler_config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _per_clip(value, n: int, name: str) -> Optional[list]:
    """One value for every clip, a list of n values, or None."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise UsageError(f"got {len(values)} {name}s for {n} clips; give one, or one per clip")
    return values


def _conditions(cfg: Config, prompt, label, n: int):
    """Captions and labels for n clips, checked against what the model was trained to take."""
    m = cfg.model
    prompts, labels = _per_clip(prompt, n, "prompt"), _per_clip(label, n, "label")
    if prompts is not None and not (m.text or m.text_encoder):
        raise UsageError("this model has no text conditioning (model.text is false); use --label or no prompt")
    for value in labels or []:
        if not 0 <= int(value) < m.num_classes:
            raise UsageError(f"label {value} is out of range: this model has "
                             + (f"classes 0..{m.num_classes - 1}" if m.num_classes else "no class conditioning"))
    if prompts is not None and m.text and not m.text_encoder and m.vocab:
        from .text import words

        unknown = sorted({w for p in prompts for w in words(p)} - set(m.vocab))
        if unknown:
            print(f"vidmoe generate: words the model never saw are ignored: {', '.join(unknown)}", file=sys.stderr)
    return prompts, None if labels is None else torch.tensor([int(v) for v in labels], dtype=torch.long)


def resolve_guidance_min_t(cfg: Config, value: Optional[float]) -> float:
    """``value``, or the model's sample.guidance_min_t when None; UsageError outside [0, 1)."""
    value = cfg.sample.guidance_min_t if value is None else value
    if not 0.0 <= value < 1.0:
        raise UsageError(f"--guidance-min-t must be in [0, 1), got {value:g}")
    return value


@torch.no_grad()
def generate(model_dir_or_model, prompt: Optional[str | list[str]] = None, label: Optional[int | list[int]] = None,
             num_videos: int = 4, steps: Optional[int] = None, guidance: Optional[float] = None, seed: int = 0, *,
             scheduler: Optional[str] = None, shift: Optional[float] = None, guidance_min_t: Optional[float] = None,
             batch_size: Optional[int] = None, device: Optional[torch.device | str] = None,
             out: Optional[str | Path] = None, format: Optional[str] = None, fps: Optional[int] = None,
             vae=None, init: Optional[torch.Tensor] = None, start_t: float = 1.0) -> torch.Tensor:
    """Sample clips: uint8 [N, T, H, W, C] on the CPU; also written to ``out`` when given.

    ``prompt`` and ``label`` are one value for all clips or a list with one per clip; None is the
    null condition. ``model_dir_or_model`` is an exported folder or a VidMoETransformer (then ``vae`` for a latent
    model). The noise of all clips is drawn at once from ``seed``, so the clips do not depend on
    ``batch_size`` or the device. ``steps``, ``guidance``, ``scheduler`` and ``guidance_min_t`` left None
    take the model's saved sample section (``guidance_min_t``: see ``diffusion.sample``), as on the
    command line; a bare VidMoETransformer has none, so it gets that section's defaults.
    ``init`` (clean clips in the model's space, [N, C, T, H, W]) with ``start_t`` < 1 starts each clip
    from its init noised to start_t instead of from pure noise (``diffusion.sample``).
    """
    if out is not None:
        check_writable_dir(out, "--out")
    scheduler_config = None
    if isinstance(model_dir_or_model, (str, Path)):
        model, cfg, vae = load_model_dir(model_dir_or_model, device)
        scheduler_config = _scheduler_config(resolve_model_dir(model_dir_or_model))
    else:
        model = model_dir_or_model
        cfg = Config(model=model.model_config)
        if device is not None:
            model.to(device)
    steps = cfg.sample.steps if steps is None else steps
    guidance = cfg.sample.guidance if guidance is None else guidance
    if num_videos < 1 or steps < 1:
        raise UsageError("--num-videos and --steps must be at least 1")
    device = next(model.parameters()).device
    guidance_min_t = resolve_guidance_min_t(cfg, guidance_min_t)
    was_training = model.training
    model.eval()
    m = cfg.model
    captions, labels = _conditions(cfg, prompt, label, num_videos)
    shape = (num_videos, m.latent_channels, m.num_frames, *m.latent_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    # A stochastic scheduler's noise: one stream per clip, so clips do not depend on batch_size.
    streams = [torch.Generator().manual_seed(int(s)) for s in np.random.SeedSequence(seed).generate_state(num_videos)]
    batch_size = batch_size or min(num_videos, 8)
    clips = []
    try:
        for start in range(0, num_videos, batch_size):
            chunk = slice(start, start + batch_size)
            x = sample(model, noise[chunk].shape, labels=None if labels is None else labels[chunk],
                       captions=None if captions is None else captions[chunk], steps=steps, guidance=guidance,
                       scheduler_name=scheduler or cfg.sample.scheduler, noise=noise[chunk],
                       scheduler_config=scheduler_config, shift=shift, guidance_min_t=guidance_min_t, device=device,
                       generator=streams[chunk], init=None if init is None else init[chunk], start_t=start_t)
            if vae is not None:
                x = vae_decode(vae, x)
            clips.append(to_uint8_frames(x).cpu())
    finally:
        model.train(was_training)
    videos = torch.cat(clips)
    if out is not None:
        save_videos(videos, out, format or cfg.sample.format, fps or cfg.sample.fps)
    return videos


def save_videos(videos: torch.Tensor, out: str | Path, format: str = "mp4", fps: int = 8) -> list[Path]:
    """Write clips uint8 [N, T, H, W, C]: one file per clip (mp4, gif, webm) or one PNG grid of frames (png)."""
    from .video_io import save_frame_grid, write_video

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if format == "png":
        return [save_frame_grid(out / "grid.png", videos)]
    if format not in VIDEO_FORMATS:
        raise UsageError(f"unknown format '{format}'; use one of mp4, gif, webm, png")
    return [write_video(out / f"sample_{i:03d}.{format}", clip, fps=fps) for i, clip in enumerate(videos)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder (runs/NAME/model)")
    parser.add_argument("--prompt", help="text prompt (models trained with captions)")
    parser.add_argument("--prompts-file", metavar="FILE",
                        help="one prompt per line, a clip each (default --num-videos: the number of lines)")
    parser.add_argument("--label", type=int, help="class label (models trained with classes)")
    parser.add_argument("--unconditional", action="store_true",
                        help="the null condition (default without --prompt or --label: captions and labels "
                             f"drawn from the training clips', saved with the model as {EXAMPLE_CONDITIONS_FILE})")
    parser.add_argument("--num-videos", type=int, help="clips to generate (default: the model's sample.num_videos)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: sample.steps)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale; 1 = none (default: sample.guidance)")
    parser.add_argument("--seed", type=int, help="random seed; the same seed gives the same clips (default: sample.seed)")
    parser.add_argument("--out", default="generated", help="output folder (default: generated)")
    parser.add_argument("--format", choices=("mp4", "gif", "webm", "png"), help="file format (default: sample.format)")
    parser.add_argument("--fps", type=int, help="frames per second of the files (default: sample.fps)")
    parser.add_argument("--scheduler", help="euler, heun, dpm++, unipc or a diffusers flow scheduler class name")
    parser.add_argument("--shift", type=float, help="timestep shift of the schedule (default: the model's sample.shift)")
    parser.add_argument("--guidance-min-t", type=float,
                        help="guidance only at t >= this, none below (default: the model's sample.guidance_min_t)")
    parser.add_argument("--batch-size", type=int, help="clips per forward pass (default: up to 8)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def main(args: argparse.Namespace) -> int:
    check_writable_dir(args.out, "--out")  # before the sampling, not after it
    model_dir = resolve_model_dir(args.model)
    try:
        saved = load_config(model_dir / CONFIG_FILE)
        s = saved.sample  # the defaults the model was trained with
    except ConfigError as err:
        raise ModelFolderError(f"{model_dir / CONFIG_FILE}: {err}") from None

    def pick(value, default):
        return default if value is None else value

    prompt, num_videos = args.prompt, pick(args.num_videos, s.num_videos)
    if args.prompts_file:
        if args.prompt:
            raise UsageError("give --prompt or --prompts-file, not both")
        try:
            prompt = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--prompts-file {args.prompts_file}: {err.strerror or err}") from None
        if not prompt:
            raise UsageError(f"--prompts-file {args.prompts_file} has no prompts")
        num_videos = pick(args.num_videos, len(prompt))
    label, seed = args.label, pick(args.seed, s.seed)
    if args.unconditional and (prompt is not None or label is not None):
        raise UsageError("--unconditional takes no --prompt, --prompts-file or --label")
    if prompt is None and label is None and not args.unconditional:
        drawn = draw_example_conditions(model_dir, num_videos, seed)
        if drawn is not None:
            m = saved.model
            prompt = drawn[0] if m.text or m.text_encoder else None
            label = drawn[1] if m.num_classes else None
            print(f"no --prompt or --label: conditioning on {EXAMPLE_CONDITIONS_FILE} of the model "
                  "(training captions and labels); --unconditional for none", file=sys.stderr)
    videos = generate(model_dir, prompt=prompt, label=label, num_videos=num_videos,
                      steps=pick(args.steps, s.steps), guidance=pick(args.guidance, s.guidance),
                      seed=seed, scheduler=pick(args.scheduler, s.scheduler), shift=args.shift,
                      guidance_min_t=args.guidance_min_t,
                      batch_size=args.batch_size, device=args.device)
    paths = save_videos(videos, args.out, pick(args.format, s.format), pick(args.fps, s.fps))
    print(f"wrote {len(paths)} file(s) to {args.out}: {', '.join(p.name for p in paths[:4])}"
          + (" ..." if len(paths) > 4 else ""))
    return 0
