"""Cutting clips out of decoded video: which frames, which crop, and the model's tensor layout."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from ..errors import DataError


class ClipSampler:
    """Chooses the frames of a clip: every ``stride``-th frame, or frames nearest to a target rate.

    Starts are source frame indices. Training draws a start uniformly from the valid ones;
    evaluation takes the middle valid start, so eval clips avoid intros and fades and are the
    same on every call.
    """

    def __init__(self, num_frames: int, stride: int = 1, fps: Optional[float] = None):
        self.num_frames = num_frames
        self.stride = stride
        self.fps = fps

    def describe(self) -> str:
        how = f"data.fps={self.fps:g}" if self.fps else f"data.frame_stride={self.stride}"
        return f"model.num_frames={self.num_frames}, {how}"

    def num_starts(self, times: np.ndarray) -> int:
        """How many start frames leave room for a whole clip (0: the video is too short)."""
        n = len(times)
        if not self.fps:
            return max(0, n - (self.num_frames - 1) * self.stride)
        span = (self.num_frames - 1) / self.fps
        # a small tolerance absorbs float rounding of timestamps (pts * time_base)
        return int(np.searchsorted(times, times[-1] - span + 1e-6, side="right")) if n else 0

    def shortfall(self, times: np.ndarray) -> str:
        """Why a video is too short, for the skip warning."""
        if not self.fps:
            need = (self.num_frames - 1) * self.stride + 1
            return f"too short: {len(times)} frames, a clip needs {need} ({self.describe()})"
        have = float(times[-1]) if len(times) else 0.0
        return (f"too short: its frames span {have:.2f} s, a clip needs {(self.num_frames - 1) / self.fps:.2f} s "
                f"({self.describe()})")

    def start(self, times: np.ndarray, rng: Optional[np.random.Generator]) -> int:
        count = self.num_starts(times)
        return int(rng.integers(count)) if rng is not None else (count - 1) // 2

    def indices(self, times: np.ndarray, start: int) -> np.ndarray:
        """Source frame indices [num_frames] of the clip beginning at frame ``start``."""
        if not self.fps:
            return start + self.stride * np.arange(self.num_frames)
        if len(times) == 1:
            return np.zeros(self.num_frames, dtype=np.int64)
        targets = times[start] + np.arange(self.num_frames) / self.fps
        # nearest source frame to each target time (ties go to the earlier frame); works for variable rates
        right = np.clip(np.searchsorted(times, targets), 1, len(times) - 1)
        left = right - 1
        return np.where(targets - times[left] <= times[right] - targets, left, right)


def crop_box(in_hw: tuple[int, int], out_hw: tuple[int, int], rng: Optional[np.random.Generator] = None
             ) -> tuple[int, int, int, int]:
    """Size to resize to so the frame covers ``out_hw``, then the crop's (top, left): centred, or random with rng.

    Returns (resized_h, resized_w, top, left). For a square target this is the usual "resize the shorter
    side, then crop".
    """
    (h, w), (oh, ow) = in_hw, out_hw
    scale = max(oh / h, ow / w)
    rh, rw = max(oh, round(h * scale)), max(ow, round(w * scale))
    if rng is None:
        return rh, rw, (rh - oh) // 2, (rw - ow) // 2
    return rh, rw, int(rng.integers(rh - oh + 1)), int(rng.integers(rw - ow + 1))


def resize_crop(frames: np.ndarray, out_hw: tuple[int, int], rng: Optional[np.random.Generator] = None) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> uint8 tensor [T, 3, h, w]: resize to cover, then centre (or random) crop."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T, 3, H, W]
    rh, rw, top, left = crop_box(tuple(video.shape[-2:]), out_hw, rng)
    if (rh, rw) != tuple(video.shape[-2:]):
        video = TF.resize(video, [rh, rw], antialias=True)
    return TF.crop(video, top, left, out_hw[0], out_hw[1])


def to_model_video(frames: torch.Tensor, in_channels: int) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> float [C, T, H, W] in [-1, 1]; C = 1 converts to luma."""
    if in_channels == 1:
        frames = TF.rgb_to_grayscale(frames, num_output_channels=1)
    elif in_channels != 3:
        raise DataError(f"video has 3 colour channels but model.in_channels={in_channels}; use 1 or 3")
    return frames.permute(1, 0, 2, 3).float().div(127.5).sub(1.0)  # [C, T, H, W]


def item_rng(seed: int, split: str, epoch: int, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, split, epoch, index), so worker count never changes a clip."""
    return np.random.default_rng([seed, split_code(split), epoch, index])


_SPLIT_CODES = {"train": 0, "eval": 1}


def split_code(split: str) -> int:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return _SPLIT_CODES[split]

