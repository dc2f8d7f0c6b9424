"""``vidmoe prepare``: write synthetic clips as a video folder, or decode a video folder into a cache.

    vidmoe prepare --data synthetic:bouncing_shapes --num-clips 512 --out data/shapes [--config F] [k=v ...]
    vidmoe prepare --data data/shapes --out data/shapes_cache --config F

The first writes ``SHAPE/clip_NNNNNN.mp4`` (the sub-folder is the clip's label), ``metadata.jsonl``
(``file_name``, ``text``) and ``ground_truth.npz`` (the arrays of ``render_clip`` stacked over clips,
at the rendered size; the mp4 files are upscaled by the factor stored as ``upscale``). The second
writes a cache that training reads without decoding when ``data.source`` points at it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from ..config import Config, load_config
from ..errors import UsageError, check_writable_dir
from ..video_io import default_upscale, write_video
from . import synthetic_name
from .cache import check_out_dir, is_cache, write_cache
from .synthetic import SHAPES, render_clip
from .transforms import ClipSampler
from .video_folder import log_skip, reason_counts

GROUND_TRUTH_FILE = "ground_truth.npz"
METADATA_FILE = "metadata.jsonl"
_GROUND_TRUTH_KEYS = ("object_mask", "motion_mask", "positions", "velocities", "bounces", "colors", "shapes",
                      "sizes", "num_objects", "label")


@dataclass
class PrepareSummary:
    """What ``prepare`` did: clips written, frames stored, files skipped with their reasons."""

    out: Path
    kind: str  # "videos" or "cache"
    clips: int
    frames: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def text(self) -> str:
        what = (f"wrote {self.clips} clips to {self.out}" if self.kind == "videos"
                else f"cached {self.clips} clips ({self.frames} frames) in {self.out}")
        skipped = f"skipped {len(self.skipped)} file{'s' if len(self.skipped) != 1 else ''}"
        return f"{what}; {skipped}" + (f" ({reason_counts(self.skipped)})" if self.skipped else "")


def prepare(data: str, out, num_clips: Optional[int] = None, cfg: Optional[Config] = None, split: str = "train",
            overwrite: bool = False, fps: Optional[float] = None) -> PrepareSummary:
    """Synthetic source -> a video folder of ``num_clips`` clips; a video folder -> a cache (see module doc)."""
    cfg = cfg or Config()
    out = Path(out).expanduser()
    check_writable_dir(out, "--out")
    name = synthetic_name(data)
    if name is not None:
        count = cfg.data.num_clips if num_clips is None else num_clips
        if count < 1:
            raise UsageError(f"--num-clips must be >= 1, got {count}")
        return _write_synthetic(out, count, cfg, split, overwrite, fps or cfg.sample.fps)
    source = Path(data).expanduser()
    if not source.exists():
        raise UsageError(f"--data {data}: no such folder (or use synthetic:bouncing_shapes)")
    if is_cache(source):
        raise UsageError(f"--data {data} is already a cache; point data.source at it to train")
    skipped: list[tuple[str, str]] = []
    # warnings wait until the end: with no usable file, the one-line error says it all
    index = write_cache(source, out, _sampler(cfg), cfg.model.frame_size, cfg.data.decode_timeout,
                        on_skip=lambda path, reason: skipped.append((path, reason)), overwrite=overwrite)
    for path, reason in skipped:
        log_skip(path, reason)
    return PrepareSummary(out, "cache", len(index["clips"]), index["num_frames"], skipped)


def _sampler(cfg: Config) -> ClipSampler:
    return ClipSampler(cfg.model.num_frames, cfg.data.frame_stride, cfg.data.fps)


def _write_synthetic(out: Path, count: int, cfg: Config, split: str, overwrite: bool, fps: float) -> PrepareSummary:
    check_out_dir(out, overwrite, lambda folder: (folder / GROUND_TRUTH_FILE).is_file())
    height, width = cfg.model.frame_size
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        truth: dict[str, list] = {key: [] for key in _GROUND_TRUTH_KEYS}
        names, captions = [], []
        for index in tqdm(range(count), desc="writing clips", unit="clip", disable=None):
            clip = render_clip(index, cfg.data.seed, cfg.model.num_frames, height, width, cfg.data, split)
            name = f"{SHAPES[clip['label']]}/clip_{index:06d}.mp4"
            write_video(tmp / name, clip["frames"], fps=fps)
            names.append(name)
            captions.append(clip["caption"])
            for key in _GROUND_TRUTH_KEYS:
                truth[key].append(clip[key])
        with (tmp / METADATA_FILE).open("w", encoding="utf-8") as handle:
            for name, caption in zip(names, captions):
                handle.write(json.dumps({"file_name": name, "text": caption}) + "\n")
        upscale = default_upscale(height, width, ".mp4")
        np.savez_compressed(tmp / GROUND_TRUTH_FILE, file_name=np.array(names), caption=np.array(captions),
                            index=np.arange(count), seed=cfg.data.seed, split=split, upscale=upscale,
                            **{key: np.stack(values) for key, values in truth.items()})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PrepareSummary(out, "videos", count)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="synthetic:bouncing_shapes (write clips as a video folder) or a video folder (decode "
                             "it into a cache)")
    parser.add_argument("--out", required=True, help="folder to create")
    parser.add_argument("--num-clips", type=int, default=None,
                        help="synthetic clips to write (default: data.num_clips)")
    parser.add_argument("--split", choices=("train", "eval"), default="train",
                        help="synthetic: which seeds to render (default: train)")
    parser.add_argument("--fps", type=float, default=None, help="synthetic: frame rate of the files "
                        "(default: sample.fps)")
    parser.add_argument("--config", default=None, help="YAML config: model.sample_size, model.num_frames, data.*")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = prepare(args.data, args.out, args.num_clips, cfg, split=args.split, overwrite=args.overwrite,
                      fps=args.fps)
    print(summary.text())
    return 0
