"""Training data: built-in synthetic clips, video folders, and decoded caches of video folders.

``build_dataset(cfg, split)`` picks the source from ``cfg.data.source`` (or ``cfg.data.eval_source``
for the eval split): ``synthetic:NAME``, a folder written by ``vidmoe prepare --out`` from a video
folder (a cache), or any folder of video files. Every item is a dict with ``video`` float
[C, T, H, W] in [-1, 1], ``caption`` str and ``label`` int; synthetic items add their ground truth.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, default_collate

from ..errors import DataError
from .cache import CachedClipDataset, is_cache, write_cache
from .synthetic import BouncingShapesDataset, render_clip
from .video_folder import VideoFolderDataset

SYNTHETIC = {"bouncing_shapes": BouncingShapesDataset}

__all__ = ["BouncingShapesDataset", "CachedClipDataset", "VideoFolderDataset", "build_dataset", "collate",
           "is_cache", "render_clip", "synthetic_name", "write_cache"]


def synthetic_name(source: str) -> str | None:
    """'synthetic:bouncing_shapes' -> 'bouncing_shapes'; None for paths. DataError for an unknown name."""
    if not source.startswith("synthetic:"):
        return None
    name = source.split(":", 1)[1]
    if name not in SYNTHETIC:
        raise DataError(f"unknown synthetic data '{source}'; available: "
                        + ", ".join(f"synthetic:{n}" for n in SYNTHETIC))
    return name


def build_dataset(cfg, split: str = "train") -> Dataset:
    """The dataset for a config and split ('train' or 'eval'); see the module doc."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    data, model = cfg.data, cfg.model
    source = data.source
    # with an explicit eval source, the whole of it is the eval set; otherwise part of source is held out
    eval_fraction, field = data.eval_fraction, "data.source"
    if split == "eval" and data.eval_source:
        source, eval_fraction, field = data.eval_source, None, "data.eval_source"
    name = synthetic_name(source)
    if name is not None:
        return SYNTHETIC[name](data, model.num_frames, model.frame_size, model.in_channels, split)
    path = Path(source).expanduser()
    common = dict(num_frames=model.num_frames, frame_size=model.frame_size, in_channels=model.in_channels,
                  split=split, frame_stride=data.frame_stride, fps=data.fps, seed=data.seed,
                  eval_fraction=eval_fraction)
    if is_cache(path):
        return CachedClipDataset(path, **common)
    if path.exists():
        return VideoFolderDataset(path, crop=data.crop, decode_timeout=data.decode_timeout, **common)
    raise DataError(f"{field} '{source}' does not exist; use a folder of videos, a cache from 'vidmoe prepare', "
                    f"or synthetic:{', synthetic:'.join(SYNTHETIC)}")


def collate(items: list[dict]) -> dict:
    """Stack tensors and numbers; captions stay a list of strings."""
    return default_collate(items)
