"""A decoded video folder on disk: every frame once, resized and centre-cropped, read through a memory map.

Layout of a cache folder (written by ``vidmoe prepare --data FOLDER --out CACHE``)::

    frames.npy   uint8 [F, H, W, 3], all frames of all usable files, file after file
    index.json   {"format": "vidmoe-cache", "frame_size": [H, W], "classes": [...],
                  "clips": [{"file", "path", "caption", "label", "offset", "length", "times"}, ...],
                  "skipped": [[path, reason], ...]}

Frames are stored at the model's frame size with the centre crop, so a cache serves the clips an
evaluation pass over the folder would decode, bit for bit; training from a cache keeps random
starts but has no random crop. Clip length, stride and fps are applied when reading, so one cache
serves any ``model.num_frames`` / ``data.frame_stride`` / ``data.fps``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError, UsageError
from ..video_io import VideoReadError, iter_frames
from .transforms import ClipSampler, resize_crop
from .video_folder import ClipDataset, ClipSource, SkipHandler, in_split, log_skip, no_clip_error, scan_folder

CACHE_FORMAT = "vidmoe-cache"
INDEX_FILE = "index.json"
FRAMES_FILE = "frames.npy"
_CHUNK = 64  # frames decoded before a resize, so long files never sit in memory whole


def is_cache(path) -> bool:
    index = Path(path) / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == CACHE_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def check_out_dir(out: Path, overwrite: bool, ours: Callable[[Path], bool]) -> None:
    """An output folder may be new or empty; a full one only with ``overwrite`` and only if we wrote it."""
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not overwrite:
            raise UsageError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
        if not ours(out):
            raise UsageError(f"{out} was not written by 'vidmoe prepare'; refusing to replace it")


def _store_video(source: ClipSource, frame_size: tuple[int, int], timeout: float, raw) -> tuple[int, np.ndarray]:
    """Decode one file in chunks, resize and crop, append to ``raw`` -> (frames written, times)."""
    stamps, chunk, written = [], [], 0

    def flush() -> int:
        video = resize_crop(np.stack(chunk), frame_size).permute(0, 2, 3, 1).contiguous().numpy()  # [n, H, W, 3]
        raw.write(video.tobytes())
        chunk.clear()
        return len(video)

    for frame, time in iter_frames(source.path, timeout):
        chunk.append(frame)
        stamps.append(time)
        if len(chunk) == _CHUNK:
            written += flush()
    if chunk:
        written += flush()
    if written == 0:
        raise VideoReadError(source.path, "no decodable frame")
    if written == len(source.times):
        times = source.times  # the probed timestamps, so a cache cuts the clips the folder reader cuts
    elif any(t is None for t in stamps):
        times = np.arange(written) / (source.info.fps or 25.0)
    else:
        times = np.asarray(stamps, dtype=np.float64) - stamps[0]
    return written, times


def write_cache(root, out, sampler: ClipSampler, frame_size: tuple[int, int], timeout: float = 30.0,
                on_skip: Optional[SkipHandler] = None, overwrite: bool = False) -> dict:
    """Decode every usable file of ``root`` into a cache at ``out``; returns the index (without frames).

    ``out`` is written through a temporary folder next to it and renamed at the end, so an
    interrupted run leaves no half cache. Raises DataError when no file is usable.
    """
    out = Path(out)
    check_out_dir(out, overwrite, is_cache)
    report = on_skip or log_skip
    scan = scan_folder(root, sampler, timeout, on_skip=report)
    skipped = list(scan.skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        clips, total = [], 0
        raw_path = tmp / "frames.raw"
        with raw_path.open("wb") as raw:
            for source in tqdm(scan.sources, desc="decoding", unit="file", disable=None):
                start = raw.tell()
                try:
                    length, times = _store_video(source, frame_size, timeout, raw)
                except VideoReadError as err:
                    raw.seek(start)
                    raw.truncate()
                    skipped.append((source.path, err.reason))
                    report(source.path, err.reason)
                    continue
                clips.append({"file": source.name, "path": source.path, "caption": source.caption,
                              "label": source.label, "offset": total, "length": length,
                              "times": [round(float(t), 6) for t in times]})
                total += length
        if not clips:
            raise no_clip_error(scan.root, scan.num_files, skipped)
        shape = (total, *frame_size, 3)
        stored = np.lib.format.open_memmap(tmp / FRAMES_FILE, mode="w+", dtype=np.uint8, shape=shape)
        stored[:] = np.memmap(raw_path, dtype=np.uint8, mode="r", shape=shape)
        stored.flush()
        del stored
        raw_path.unlink()
        index = {"format": CACHE_FORMAT, "version": 1, "source": str(scan.root), "frame_size": list(frame_size),
                 "classes": scan.classes, "num_files": scan.num_files, "num_frames": total, "clips": clips,
                 "skipped": [list(s) for s in skipped]}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


class CachedClipDataset(ClipDataset):
    """Clips read from a cache written by ``write_cache``; the frame array is opened lazily in each worker."""

    def __init__(self, cache_dir, num_frames: int, frame_size: tuple[int, int], in_channels: int = 3,
                 split: str = "train", frame_stride: int = 1, fps: Optional[float] = None, seed: int = 0,
                 eval_fraction: Optional[float] = 0.1):
        cache_dir = Path(cache_dir)
        index = json.loads((cache_dir / INDEX_FILE).read_text())
        stored = tuple(index["frame_size"])
        if stored != tuple(frame_size):
            raise DataError(f"cache {cache_dir} holds {stored[0]}x{stored[1]} frames but model.sample_size is "
                            f"{frame_size[0]}x{frame_size[1]}; run 'vidmoe prepare' again with this config")
        sampler = ClipSampler(num_frames, frame_stride, fps)
        clips = index["clips"]
        keep = in_split([c["file"] for c in clips], None if eval_fraction is None else split, eval_fraction or 0.0)
        sources, skipped = [], []
        for clip, kept in zip(clips, keep):
            if not kept:
                continue
            times = np.asarray(clip["times"], dtype=np.float64)
            if sampler.num_starts(times) == 0:
                skipped.append((clip["path"], sampler.shortfall(times)))
                log_skip(*skipped[-1])
                continue
            sources.append(ClipSource(clip["path"], clip["file"], clip["caption"], clip["label"], times,
                                      offset=clip["offset"]))
        if not sources:
            raise no_clip_error(cache_dir, len(clips), skipped)
        super().__init__(str(cache_dir), sources, sampler, frame_size, in_channels, split, seed,
                         index["classes"], skipped)
        self.cache_dir = cache_dir
        self._frames: Optional[np.ndarray] = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_frames"] = None  # each worker maps the file itself
        return state

    def _load(self, source: ClipSource, indices: np.ndarray, rng: Optional[np.random.Generator]) -> torch.Tensor:
        if self._frames is None:
            self._frames = np.load(self.cache_dir / FRAMES_FILE, mmap_mode="r")
        frames = np.ascontiguousarray(self._frames[source.offset + indices])  # [T, H, W, 3]
        return torch.from_numpy(frames).permute(0, 3, 1, 2)  # [T, 3, H, W]
