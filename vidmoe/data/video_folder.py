"""Video folders: every video file under a folder, with captions and class labels, cut into clips.

Layout, as Hugging Face's video/image folders and torchvision's ImageFolder expect it::

    root/
      metadata.jsonl        {"file_name": "cats/a.mp4", "text": "a cat jumps"}   (or metadata.csv)
      cats/a.mp4
      cats/b.webm  cats/b.txt   sidecar caption, used when no metadata row names the file
      dogs/nested/c.gif

- Files are found recursively by extension (``VIDEO_EXTENSIONS``); hidden files are ignored.
- ``file_name`` is relative to the folder holding the metadata file; metadata files may sit in any
  sub-folder, deeper ones winning. A caption is "" when nothing names the file.
- The label is the index of the file's first-level sub-folder among all first-level sub-folder
  names, sorted (files directly in the root form the class ""). No sub-folders: num_classes = 0.
- Held-out split: with ``eval_fraction`` f, a file is in the eval split when the CRC-32 of its
  relative path, divided by 2**32, is below f; stable when files are added. When that leaves
  either split empty (small folders), both splits use every file.
- One clip per file per epoch: a random start (and a random crop with ``crop="random"``) in
  training, the middle start and the centre crop in evaluation.
- A file that does not open, has no video stream, is too short or fails to decode is skipped with
  one warning; if no file is usable, DataError says why.
"""

from __future__ import annotations

import csv
import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import DataError
from ..text import build_vocabulary
from ..video_io import VIDEO_EXTENSIONS, VideoInfo, VideoReadError, probe_video, read_frames
from .transforms import ClipSampler, item_rng, resize_crop, split_code, to_model_video

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SkipHandler = Callable[[str, str], None]


@dataclass
class ClipSource:
    """One usable video: where it is, what it says, and its frame timestamps."""

    path: str
    name: str  # path relative to the root, with forward slashes
    caption: str
    label: int
    times: np.ndarray  # float64 [N] seconds from the first frame
    info: Optional[VideoInfo] = None  # for seeking in the file (None for caches)
    offset: int = 0  # first frame in a cache


@dataclass
class FolderScan:
    """The result of looking through a folder: usable videos, class names, and what was skipped."""

    root: Path
    sources: list[ClipSource]
    classes: list[str]
    num_files: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def log_skip(path: str, reason: str) -> None:
    logger.warning("skipping %s: %s", path, reason)


def discover_videos(root: Path) -> list[Path]:
    """Video files under ``root`` (or ``root`` itself when it is a file), sorted, hidden ones left out."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*")
                  if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _metadata_rows(path: Path):
    """(line, row dict) pairs of a metadata.jsonl / metadata.csv file."""
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                logger.warning("%s line %d: not JSON (%s); line ignored", path, number, err.msg)
                continue
            yield number, row
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            yield from enumerate(csv.DictReader(handle), 2)


def read_captions(root: Path, files: list[Path]) -> dict[Path, str]:
    """Caption per file: a metadata row naming it, else its sidecar .txt; files with neither are left out."""
    captions: dict[Path, str] = {}
    if root.is_dir():
        metadata = [p for name in METADATA_FILES for p in root.rglob(name)]
        for path in sorted(metadata, key=lambda p: (len(p.parts), str(p))):  # deeper files override
            for number, row in _metadata_rows(path):
                if not isinstance(row, dict) or not row.get("file_name") or row.get("text") is None:
                    logger.warning("%s line %d: needs 'file_name' and 'text'; line ignored", path, number)
                    continue
                captions[(path.parent / str(row["file_name"])).resolve()] = str(row["text"])
    result = {}
    for file in files:
        key = file.resolve()
        if key in captions:
            result[file] = captions[key]
        elif file.with_suffix(".txt").is_file():
            result[file] = file.with_suffix(".txt").read_text(encoding="utf-8").strip()
    return result


def class_names(root: Path, files: list[Path]) -> list[str]:
    """Sorted first-level sub-folder names ([] when every file sits in the root)."""
    names = {_class_of(root, f) for f in files}
    return [] if names <= {""} else sorted(names)


def _class_of(root: Path, file: Path) -> str:
    if root.is_file():
        return ""
    parts = file.relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


def _name(root: Path, file: Path) -> str:
    return file.name if root.is_file() else file.relative_to(root).as_posix()


def in_split(names: list[str], split: Optional[str], eval_fraction: float) -> list[bool]:
    """Which names belong to the split (None: all); see the module doc for the rule."""
    if split is None:
        return [True] * len(names)
    split_code(split)
    held_out = [zlib.crc32(n.encode("utf-8")) / 2**32 < eval_fraction for n in names]
    if all(held_out) or not any(held_out):
        return [True] * len(names)
    return held_out if split == "eval" else [not h for h in held_out]


def scan_folder(root, sampler: ClipSampler, timeout: float = 30.0, split: Optional[str] = None,
                eval_fraction: float = 0.1, on_skip: Optional[SkipHandler] = None) -> FolderScan:
    """Find the videos of a folder, read captions and labels, and keep files long enough for a clip."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root} does not exist")
    files = discover_videos(root)
    if not files:
        raise DataError(f"no video files in {root} (looked recursively for "
                        f"{', '.join(sorted(VIDEO_EXTENSIONS))})")
    classes = class_names(root, files)
    captions = read_captions(root, files)
    keep = in_split([_name(root, f) for f in files], split, eval_fraction)
    files = [f for f, k in zip(files, keep) if k]
    scan = FolderScan(root, [], classes, len(files))

    def skip(path: str, reason: str) -> None:
        scan.skipped.append((path, reason))
        (on_skip or log_skip)(path, reason)

    for file in tqdm(files, desc=f"checking {root.name}", unit="file", disable=None, leave=False):
        try:
            info = probe_video(file, timeout)
        except VideoReadError as err:
            skip(str(file), err.reason)
            continue
        if sampler.num_starts(info.times) == 0:
            skip(str(file), sampler.shortfall(info.times))
            continue
        label = classes.index(_class_of(root, file)) if classes else 0
        scan.sources.append(ClipSource(str(file), _name(root, file), captions.get(file, ""), label,
                                       info.times, info))
    return scan


def reason_counts(skipped: list[tuple[str, str]]) -> str:
    """'2 empty file, 1 no video stream': skip reasons grouped by their first words."""
    kinds = Counter(reason.split(" (")[0].split(":")[0] for _, reason in skipped)
    return ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())


def no_clip_error(where, num_files: int, skipped: list[tuple[str, str]]) -> DataError:
    """One line: how many files, and what was wrong with them, grouped."""
    first = f"; e.g. {Path(skipped[0][0]).name}: {skipped[0][1]}" if skipped else ""
    return DataError(f"no usable clip in {where}: {num_files} video file{'s' if num_files != 1 else ''}, "
                     f"all skipped ({reason_counts(skipped)}){first}")


class ClipDataset(Dataset):
    """Clips cut from a list of sources, one per source per epoch; subclasses fetch the frames."""

    def __init__(self, where: str, sources: list[ClipSource], sampler: ClipSampler, frame_size: tuple[int, int],
                 in_channels: int, split: str, seed: int, classes: list[str], skipped: list[tuple[str, str]]):
        split_code(split)
        self.where = where
        self.sources = sources
        self.sampler = sampler
        self.frame_size = tuple(frame_size)
        self.in_channels = in_channels
        self.split = split
        self.seed = seed
        self.classes = classes
        self.num_classes = len(classes)
        self.skipped = skipped
        self.epoch = 0
        self._failed: set[str] = set()  # sources that broke while loading, in this process

    def set_epoch(self, epoch: int) -> None:
        """New random starts and crops each training epoch; evaluation clips never change."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sources)

    def vocabulary(self) -> list[str]:
        return build_vocabulary(s.caption for s in self.sources)

    def _load(self, source: ClipSource, indices: np.ndarray, rng: Optional[np.random.Generator]) -> torch.Tensor:
        """uint8 [T, 3, H, W] at the model's frame size."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.sources):
            raise IndexError(i)
        rng = item_rng(self.seed, self.split, self.epoch, i) if self.split == "train" else None
        # a file that breaks only now (damage after the probed part) is skipped for the next one,
        # so an epoch never stops on it
        for k in range(len(self.sources)):
            source = self.sources[(i + k) % len(self.sources)]
            if source.name in self._failed:
                continue
            try:
                indices = self.sampler.indices(source.times, self.sampler.start(source.times, rng))
                frames = self._load(source, indices, rng)
            except VideoReadError as err:
                self._failed.add(source.name)
                self.skipped.append((source.path, err.reason))
                log_skip(source.path, err.reason)
                continue
            return {"video": to_model_video(frames, self.in_channels), "caption": source.caption,
                    "label": source.label}
        raise no_clip_error(self.where, len(self.sources), self.skipped)


class VideoFolderDataset(ClipDataset):
    """Clips decoded with PyAV from the video files of a folder (see the module doc)."""

    def __init__(self, root, num_frames: int, frame_size: tuple[int, int], in_channels: int = 3,
                 split: str = "train", frame_stride: int = 1, fps: Optional[float] = None, crop: str = "center",
                 seed: int = 0, decode_timeout: float = 30.0, eval_fraction: Optional[float] = 0.1):
        """``eval_fraction=None`` uses every file whatever the split (an explicit data.eval_source)."""
        sampler = ClipSampler(num_frames, frame_stride, fps)
        scan = scan_folder(root, sampler, decode_timeout, None if eval_fraction is None else split,
                           eval_fraction or 0.0)
        if not scan.sources:
            raise no_clip_error(scan.root, scan.num_files, scan.skipped)
        if scan.skipped:
            logger.warning("skipped %d of %d video files in %s", len(scan.skipped), scan.num_files, scan.root)
        super().__init__(str(scan.root), scan.sources, sampler, frame_size, in_channels, split, seed,
                         scan.classes, scan.skipped)
        self.crop = crop
        self.decode_timeout = decode_timeout

    def _load(self, source: ClipSource, indices: np.ndarray, rng: Optional[np.random.Generator]) -> torch.Tensor:
        frames = read_frames(source.path, indices, source.info, self.decode_timeout)  # [T, H, W, 3]
        return resize_crop(frames, self.frame_size, rng if self.crop == "random" else None)
