"""``synthetic:bouncing_shapes``: 1-3 coloured shapes moving at constant velocity and bouncing off the walls.

Every clip is a pure function of (seed, split, index), rendered with numpy masks (no anti-aliasing)
at any frame count and size, and carries its ground truth.

Coordinates: a frame spans [0, W] x [0, H] in pixel units; pixel (row i, column j) covers
[j, j + 1) x [i, i + 1) and is inside a shape when its centre (j + 0.5, i + 0.5) is. ``positions``
are shape centres in these units (for a triangle, its centroid), so an object's centre lies in
pixel (floor(y), floor(x)).

Ground truth per clip (O = MAX_OBJECTS slots, absent objects NaN / -1 / False):
  object_mask uint8 [T, H, W]  0 background, k + 1 where object k is visible (later objects on top)
  motion_mask bool [T, H, W]   pixels whose content changed because an object moved between t-1 and t:
                               the union of the visible masks at t and t-1, minus pixels that show the
                               same object at both times while that object stood still. So it covers
                               where a moving object is, where it was (uncovered background), and
                               nothing else; background in both frames is never in it. Frame 0 is
                               compared with the trajectory extended back to t = -1.
  positions float32 [T, O, 2]  (x, y) centre
  velocities float32 [T, O, 2] pixels per frame at t (after any bounce in (t-1, t])
  bounces bool [T, O]          the object hit a wall during (t-1, t]
  colors, shapes int64 [O]     indices into COLOR_NAMES and SHAPES
  sizes float32 [O]            diameter / side in pixels
  label int                    the shape of object 0 (the bottom one): 0 circle, 1 square, 2 triangle
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import split_code, to_model_video

PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "cyan": (40, 220, 230),
    "magenta": (220, 50, 220),
    "orange": (245, 140, 20),
    "white": (240, 240, 240),
}
COLOR_NAMES = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (20, 20, 20)
MAX_OBJECTS = 3
REFERENCE_SIZE = 32  # data.object_size and data.speed are given for 32x32 frames
_TRIANGLE_HEIGHT = math.sqrt(3) / 2  # equilateral triangle height per unit side


def shape_extents(shape: int, size: float) -> np.ndarray:
    """Distances from the centre to the (left, right, top, bottom) edges of a shape."""
    if SHAPES[shape] == "triangle":
        h = size * _TRIANGLE_HEIGHT
        return np.array([size / 2, size / 2, 2 * h / 3, h / 3])  # centroid sits 2/3 of the way down
    return np.full(4, size / 2)


def shape_mask(shape: int, size: float, x, y, height: int, width: int) -> np.ndarray:
    """Pixels inside one shape centred at (x, y): bool [H, W], or [N, H, W] for arrays of N centres."""
    x = np.asarray(x, dtype=np.float64)[..., None, None]
    y = np.asarray(y, dtype=np.float64)[..., None, None]
    dx = np.arange(width) + 0.5 - x  # [..., 1, W]
    dy = (np.arange(height) + 0.5)[:, None] - y  # [..., H, 1]
    name = SHAPES[shape]
    if name == "circle":
        return dx**2 + dy**2 <= (size / 2) ** 2
    if name == "square":
        return (np.abs(dx) <= size / 2) & (np.abs(dy) <= size / 2)
    h = size * _TRIANGLE_HEIGHT
    below_apex = dy + 2 * h / 3  # 0 at the apex, h at the base
    return (dy <= h / 3) & (np.abs(dx) <= below_apex * (size / 2) / h)


def _reflect(start: float, velocity: float, lo: float, hi: float, times: np.ndarray):
    """Elastic bounces in [lo, hi] by unfolding: -> positions, velocities, wall-hit counts at ``times``."""
    span = hi - lo
    if span <= 0:
        return np.full(len(times), (lo + hi) / 2), np.zeros(len(times)), np.zeros(len(times), dtype=np.int64)
    unfolded = start - lo + velocity * times
    folds = np.floor(unfolded / span).astype(np.int64)
    rest = unfolded - folds * span
    even = folds % 2 == 0
    return lo + np.where(even, rest, span - rest), np.where(even, velocity, -velocity), folds


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(colors, shapes) -> str:
    """'a red circle bouncing', 'a red circle and a blue square bouncing', 'a ..., a ... and a ... bouncing'."""
    names = [f"{_article(COLOR_NAMES[c])} {COLOR_NAMES[c]} {SHAPES[s]}" for c, s in zip(colors, shapes)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} bouncing"


def vocabulary() -> list[str]:
    """Every word a bouncing-shapes caption can use."""
    return ["a", "an", "and", "bouncing", *COLOR_NAMES, *SHAPES]


def _number_of_objects(rng: np.random.Generator, data_cfg, split: str) -> int:
    """Uniform over min..max objects, or drawn by data.object_count_weights in the training split."""
    lo, hi = data_cfg.min_objects, data_cfg.max_objects
    weights = data_cfg.object_count_weights
    if weights is None or split != "train":
        return int(rng.integers(lo, hi + 1))  # the draw every clip made before the weights existed
    p = np.asarray(weights, dtype=np.float64)
    return lo + int(rng.choice(len(p), p=p / p.sum()))


def render_clip(index: int, seed: int, num_frames: int, height: int, width: int, data_cfg,
                split: str = "train") -> dict:
    """Clip ``index`` of the given seed and split: frames uint8 [T, H, W, 3] plus the ground truth (module doc)."""
    rng = np.random.default_rng([seed, split_code(split), index])
    scale = min(height, width) / REFERENCE_SIZE
    n = _number_of_objects(rng, data_cfg, split)
    colors = rng.choice(len(PALETTE), size=n, replace=False)
    shapes = rng.integers(len(SHAPES), size=n)
    largest = max(1.0, min(height, width) - 1.0)  # leave room to move
    sizes = np.clip(rng.uniform(*data_cfg.object_size, size=n) * scale, 1.0, largest)
    speeds = rng.uniform(*data_cfg.speed, size=n) * scale
    angles = rng.uniform(0, 2 * math.pi, size=n)
    times = np.arange(-1, num_frames, dtype=np.float64)  # t = -1 gives frame 0 a previous frame

    t1 = num_frames + 1
    positions = np.full((t1, MAX_OBJECTS, 2), np.nan)
    velocities = np.full((t1, MAX_OBJECTS, 2), np.nan)
    folds = np.zeros((t1, MAX_OBJECTS, 2), dtype=np.int64)
    labels = np.zeros((t1, height, width), dtype=np.uint8)  # [T+1, H, W] visible object per pixel
    for k in range(n):
        left, right, top, bottom = shape_extents(shapes[k], sizes[k])
        bounds = ((left, width - right), (top, height - bottom))
        velocity = speeds[k] * np.array([math.cos(angles[k]), math.sin(angles[k])])
        for axis, (lo, hi) in enumerate(bounds):
            start = rng.uniform(lo, hi) if hi > lo else (lo + hi) / 2
            positions[:, k, axis], velocities[:, k, axis], folds[:, k, axis] = _reflect(
                start, velocity[axis], lo, hi, times)
        mask = shape_mask(shapes[k], sizes[k], positions[:, k, 0], positions[:, k, 1], height, width)
        labels[mask] = k + 1  # drawn in order: later objects cover earlier ones

    moved = np.zeros((t1, MAX_OBJECTS + 1), dtype=bool)  # [T+1, 1 + O]; column 0 is the background
    moved[1:, 1:] = np.any(positions[1:] != positions[:-1], axis=-1) & ~np.isnan(positions[1:, :, 0])
    now, before = labels[1:], labels[:-1]
    still = (now == before) & ~np.take_along_axis(moved[1:], now.reshape(num_frames, -1).astype(np.int64),
                                                  axis=1).reshape(now.shape)
    motion = ((now > 0) | (before > 0)) & ~still

    lut = np.array([BACKGROUND] + [PALETTE[COLOR_NAMES[c]] for c in colors], dtype=np.uint8)  # [1 + n, 3]
    slots = np.full(MAX_OBJECTS, -1, dtype=np.int64)
    size_slots = np.full(MAX_OBJECTS, np.nan, dtype=np.float32)
    size_slots[:n] = sizes
    return {
        "frames": lut[now],
        "object_mask": now,
        "motion_mask": motion,
        "positions": positions[1:].astype(np.float32),
        "velocities": velocities[1:].astype(np.float32),
        "bounces": np.any(folds[1:] != folds[:-1], axis=-1),
        "colors": np.concatenate([colors, slots[n:]]).astype(np.int64),
        "shapes": np.concatenate([shapes, slots[n:]]).astype(np.int64),
        "sizes": size_slots,
        "num_objects": n,
        "caption": caption_for(colors, shapes),
        "label": int(shapes[0]),
    }


class BouncingShapesDataset(Dataset):
    """Bouncing shapes rendered on the fly; item i of epoch e is clip e * len + i (train) or i (eval)."""

    num_classes = len(SHAPES)
    classes = list(SHAPES)

    def __init__(self, data_cfg, num_frames: int, frame_size: tuple[int, int], in_channels: int = 3,
                 split: str = "train"):
        split_code(split)
        self.data_cfg = data_cfg
        self.num_frames = num_frames
        self.frame_size = frame_size
        self.in_channels = in_channels
        self.split = split
        self.length = data_cfg.num_clips if split == "train" else data_cfg.eval_clips
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []

    def set_epoch(self, epoch: int) -> None:
        """Training sees new clips every epoch; evaluation always sees the same ones."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def clip_index(self, i: int) -> int:
        return self.epoch * self.length + i if self.split == "train" else i

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        clip = render_clip(self.clip_index(i), self.data_cfg.seed, self.num_frames, *self.frame_size,
                           self.data_cfg, self.split)
        frames = torch.from_numpy(clip.pop("frames")).permute(0, 3, 1, 2)  # [T, 3, H, W]
        item = {"video": to_model_video(frames, self.in_channels), "caption": clip.pop("caption"),
                "label": clip.pop("label")}
        item.update({k: torch.as_tensor(v) for k, v in clip.items()})
        return item

    def vocabulary(self) -> list[str]:
        return vocabulary()
