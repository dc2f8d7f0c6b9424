"""Physics of bouncing-shapes clips, measured from pixels alone (no ground truth of the clip).

Every function takes plain numpy: a clip is uint8 [T, H, W, 3], a batch of clips [N, T, H, W, 3].
What a clip is scored on, in the order the pipeline computes it:

1. Background: the most common colour of the clip (coarsely binned, then the median of that bin).
2. Objects: pixels far from the background in colour, grouped by colour (a few colour centres
   per clip), then into 8-connected components per frame; tiny components are noise.
3. Tracks: each object is linked to the nearest object of the previous frame (position only).
4. Scores per clip: objects per frame (and how many of them are tiny fragments), how stable that
   count is (``flicker`` when it changes often), colour consistency along tracks, the
   constant-velocity residual (the second difference of centroid positions, away from walls and
   occlusions), bounce correctness (velocity sign flips happen next to the wall they point at),
   ``frozen`` (almost no pixel changes between frames) and ``empty`` (no object most of the time).

Sizes and speeds scale with the frame, so thresholds are fractions of min(H, W) where that matters.
``summarize`` averages the scores over clips with bootstrap confidence intervals; ``checker``
compares generated clips with real ones the way an independent checker would.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

BACKGROUND_BIN = 32  # colour bin width for finding the background's mode
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that makes a pixel part of an object
COLOR_RADIUS = 60.0  # RGB distance within which two pixels have the same object colour
MAX_COLORS = 8  # colour centres looked for per clip
MIN_AREA_FRACTION = 0.002  # components smaller than this share of the frame are noise (2 px at 32x32)
WALL_MARGIN_FRACTION = 0.08  # an object is "at a wall" when its box is this close to the frame edge
MAX_JUMP_FRACTION = 0.35  # farthest an object may move between frames and still be the same object
AREA_TOLERANCE = 0.3  # area this far off the track's median: partly hidden or merged, centroid unreliable
VELOCITY_DEADZONE = 0.3  # px/frame: slower moves have no reliable sign (pixel rounding of centroids)
COLOR_TOLERANCE = 40.0  # an object keeps its colour while it stays this close to its track's median colour
CHANGE_LEVEL = 24  # a pixel changed between frames if a channel moved by more than this
FROZEN_CHANGE = 0.002  # mean share of changed pixels below which a clip is frozen
FLICKER_RATE = 0.3  # share of frame pairs whose object count differs above which a clip flickers
RESIDUAL_LIMIT = 1.0  # px/frame^2: plausible clips keep the mean residual below this (or 4% of min(H, W)) ...
RESIDUAL_FRACTION = 0.04  # ... whichever is larger; pixel rounding alone gives about 0.45
MIN_COLOR_CONSISTENCY = 0.9  # plausible clips keep their objects' colours at least this often ...
MIN_BOUNCE_CORRECTNESS = 0.5  # ... and flip velocity at a wall at least this often
EMPTY_OBJECTS = 0.5  # fewer objects per frame than this on average: an empty clip
# Objects smaller than this share of the frame (5 px at 32x32) are counted as fragments too: the
# smallest bouncing shape covers about 15 px, while a soft, blended edge of a generated shape
# leaves 2-5 px pieces of an in-between colour that count as objects of their own.
FRAGMENT_AREA_FRACTION = 0.005

# Aggregates of ``summarize``: mean of the per-clip value over clips (rates are means of booleans).
MEAN_METRICS = ("objects_per_frame", "fragments_per_frame", "count_stability", "count_change_rate",
                "color_consistency", "motion_residual", "changed_fraction", "frozen", "flicker", "empty",
                "plausible")


@dataclass
class Blob:
    """One object in one frame: centroid (x, y) in pixels, area, mean colour, box (x0, y0, x1, y1)."""

    x: float
    y: float
    area: int
    color: np.ndarray
    box: tuple[int, int, int, int]


@dataclass
class Track:
    """One object followed over consecutive frames."""

    times: list[int] = field(default_factory=list)
    blobs: list[Blob] = field(default_factory=list)

    def add(self, t: int, blob: Blob) -> None:
        self.times.append(t)
        self.blobs.append(blob)


def _as_clips(videos) -> np.ndarray:
    """uint8 [N, T, H, W, 3] from numpy or torch, single-channel clips repeated to RGB."""
    videos = np.asarray(videos.cpu() if hasattr(videos, "cpu") else videos)
    if videos.ndim != 5 or videos.shape[-1] not in (1, 3):
        raise ValueError(f"expected clips [N, T, H, W, 3], got shape {videos.shape}")
    if videos.shape[-1] == 1:
        videos = np.repeat(videos, 3, axis=-1)
    return videos.astype(np.uint8, copy=False)


def background_color(clip: np.ndarray) -> np.ndarray:
    """The clip's most common colour [3] (float): the mode of coarse colour bins, refined by the median."""
    pixels = clip.reshape(-1, 3)
    bins = pixels.astype(np.int64) // BACKGROUND_BIN
    codes = (bins[:, 0] * 256 + bins[:, 1]) * 256 + bins[:, 2]
    values, counts = np.unique(codes, return_counts=True)
    mode = values[np.argmax(counts)]
    return np.median(pixels[codes == mode], axis=0).astype(np.float64)


def color_centres(pixels: np.ndarray, min_count: int) -> np.ndarray:
    """Object colours [k, 3] among foreground pixels [P, 3]: most frequent first, each COLOR_RADIUS apart."""
    pixels = pixels.astype(np.float64)
    left = np.ones(len(pixels), dtype=bool)
    centres = []
    while left.sum() >= min_count and len(centres) < MAX_COLORS:
        rest = pixels[left]
        codes = (rest // 16).astype(np.int64) @ np.array([256 * 256, 256, 1])
        _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
        seed = rest[inverse == np.argmax(counts)].mean(axis=0)  # the most common fine colour bin
        near = np.linalg.norm(rest - seed, axis=1) <= COLOR_RADIUS
        if near.sum() < min_count:
            break
        centres.append(np.median(rest[near], axis=0))
        left[np.flatnonzero(left)[near]] = False
    return np.array(centres).reshape(-1, 3)


def _flood_label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2D bool mask by breadth-first flood fill (for when scipy is absent)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    count = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        count += 1
        labels[y0, x0] = count
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        queue.append((ny, nx))
    return labels, count


def label_components(mask: np.ndarray, use_scipy: Optional[bool] = None) -> tuple[np.ndarray, int]:
    """8-connected components of a 2D bool mask: (labels int [H, W], 0 = none; count).

    scipy.ndimage.label when scipy is installed (``use_scipy=None``), else a flood fill.
    """
    if use_scipy is not False:
        try:
            from scipy import ndimage
        except ImportError:
            if use_scipy:
                raise
        else:
            labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
            return labels, int(count)
    return _flood_label(mask)


def min_area(height: int, width: int) -> int:
    return max(2, round(MIN_AREA_FRACTION * height * width))


def detect_objects(clip: np.ndarray, use_scipy: Optional[bool] = None) -> list[list[Blob]]:
    """The objects of every frame of one clip uint8 [T, H, W, 3] (see the module doc)."""
    t_len, h, w, _ = clip.shape
    smallest = min_area(h, w)
    pixels = clip.astype(np.float64)
    background = background_color(clip)
    foreground = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE  # [T, H, W]
    centres = color_centres(pixels[foreground], smallest)
    frames: list[list[Blob]] = [[] for _ in range(t_len)]
    if not len(centres):
        return frames
    distance = np.linalg.norm(pixels[..., None, :] - centres, axis=-1)  # [T, H, W, k]
    nearest = distance.argmin(-1)
    assigned = foreground & (distance.min(-1) <= COLOR_RADIUS)
    for t in range(t_len):
        for c in range(len(centres)):
            labels, count = label_components(assigned[t] & (nearest[t] == c), use_scipy)
            for k in range(1, count + 1):
                ys, xs = np.nonzero(labels == k)
                if len(ys) < smallest:
                    continue
                frames[t].append(Blob(x=float(xs.mean()) + 0.5, y=float(ys.mean()) + 0.5, area=len(ys),
                                      color=pixels[t, ys, xs].mean(axis=0),
                                      box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return frames


def track_objects(frames: list[list[Blob]], max_jump: float) -> list[Track]:
    """Link each blob to the nearest blob of the previous frame (closest pairs first, at most ``max_jump`` apart)."""
    tracks: list[Track] = []
    active: list[Track] = []
    for t, blobs in enumerate(frames):
        pairs = sorted((np.hypot(b.x - tr.blobs[-1].x, b.y - tr.blobs[-1].y), i, j)
                       for i, tr in enumerate(active) for j, b in enumerate(blobs))
        used_tracks, used_blobs, now = set(), set(), []
        for dist, i, j in pairs:
            if dist > max_jump or i in used_tracks or j in used_blobs:
                continue
            used_tracks.add(i)
            used_blobs.add(j)
            active[i].add(t, blobs[j])
            now.append(active[i])
        for j, blob in enumerate(blobs):
            if j not in used_blobs:
                track = Track()
                track.add(t, blob)
                tracks.append(track)
                now.append(track)
        active = now
    return tracks


def _near_wall(box: tuple[int, int, int, int], height: int, width: int, margin: float) -> tuple[bool, bool, bool, bool]:
    """(left, right, top, bottom): whether the box is within ``margin`` pixels of each frame edge."""
    x0, y0, x1, y1 = box
    return x0 <= margin, x1 >= width - margin, y0 <= margin, y1 >= height - margin


def _track_motion(track: Track, height: int, width: int) -> tuple[list[float], int, int]:
    """Constant-velocity residuals (px/frame^2) away from walls and occlusions, and (flips, correct flips)."""
    size = min(height, width)
    margin = max(1.5, WALL_MARGIN_FRACTION * size)
    blobs = track.blobs
    xy = np.array([(b.x, b.y) for b in blobs])  # [n, 2]
    areas = np.array([b.area for b in blobs], dtype=np.float64)
    whole = np.abs(areas - np.median(areas)) <= AREA_TOLERANCE * np.median(areas)
    walls = [_near_wall(b.box, height, width, margin) for b in blobs]
    free = np.array([not any(w) for w in walls]) & whole
    residuals = []
    for i in range(1, len(blobs) - 1):
        if free[i - 1:i + 2].all():
            residuals.append(float(np.linalg.norm(xy[i + 1] - 2 * xy[i] + xy[i - 1])))
    flips = correct = 0
    velocity = np.diff(xy, axis=0)  # [n-1, 2]: velocity[i] = motion from frame i to i+1
    for i in range(len(velocity) - 1):
        if not (whole[i] and whole[i + 1] and whole[i + 2]):
            continue
        for axis in (0, 1):
            before, after = velocity[i, axis], velocity[i + 1, axis]
            if abs(before) <= VELOCITY_DEADZONE or abs(after) <= VELOCITY_DEADZONE or np.sign(before) == np.sign(after):
                continue
            flips += 1
            # The wall the object was heading for: index 0/1 = left/right for x, 2/3 = top/bottom for y.
            wall = 2 * axis + (1 if before > 0 else 0)
            correct += any(walls[j][wall] for j in (i, i + 1, i + 2))
    return residuals, flips, correct


def clip_metrics(clip: np.ndarray, use_scipy: Optional[bool] = None) -> dict:
    """Per-clip scores of one clip uint8 [T, H, W, 3] (see the module doc for their meaning)."""
    t_len, h, w, _ = clip.shape
    frames = detect_objects(clip, use_scipy)
    counts = np.array([len(f) for f in frames])
    fragments = [sum(b.area < FRAGMENT_AREA_FRACTION * h * w for b in f) for f in frames]
    values, freq = np.unique(counts, return_counts=True)
    mode = int(values[np.argmax(freq)])
    change_rate = float(np.mean(counts[1:] != counts[:-1])) if t_len > 1 else 0.0
    diffs = np.abs(np.diff(clip.astype(np.int16), axis=0)).max(-1) > CHANGE_LEVEL  # [T-1, H, W]
    changed = float(diffs.mean()) if t_len > 1 else 0.0

    tracks = track_objects(frames, MAX_JUMP_FRACTION * min(h, w))
    residuals, flips, correct, kept, steps = [], 0, 0, 0, 0
    for track in tracks:
        r, f, c = _track_motion(track, h, w)
        residuals += r
        flips += f
        correct += c
        colors = np.array([b.color for b in track.blobs])
        offsets = np.linalg.norm(colors - np.median(colors, axis=0), axis=1)
        kept += int((offsets <= COLOR_TOLERANCE).sum())
        steps += len(offsets)
    residual = float(np.mean(residuals)) if residuals else float("nan")
    color = kept / steps if steps else float("nan")
    frozen = changed < FROZEN_CHANGE
    flicker = change_rate > FLICKER_RATE
    empty = float(counts.mean()) < EMPTY_OBJECTS
    # NaN (nothing to measure, e.g. no track away from the walls) fails no check.
    residual_limit = max(RESIDUAL_LIMIT, RESIDUAL_FRACTION * min(h, w))
    plausible = (not frozen and not flicker and not empty and not color < MIN_COLOR_CONSISTENCY
                 and not residual > residual_limit and not (flips and correct / flips < MIN_BOUNCE_CORRECTNESS))
    return {
        "counts": counts.tolist(),
        "fragment_counts": fragments,
        "objects_per_frame": float(counts.mean()),
        "fragments_per_frame": float(np.mean(fragments)),
        "count_mode": mode,
        "count_stability": float(np.mean(counts == mode)),
        "count_change_rate": change_rate,
        "color_consistency": color,
        "motion_residual": residual,
        "residual_samples": len(residuals),
        "bounce_flips": flips,
        "bounce_correct": correct,
        "changed_fraction": changed,
        "frozen": bool(frozen),
        "flicker": bool(flicker),
        "empty": bool(empty),
        "plausible": bool(plausible),
        "tracks": len(tracks),
    }


def per_clip_metrics(videos, use_scipy: Optional[bool] = None) -> list[dict]:
    """``clip_metrics`` of every clip of uint8 [N, T, H, W, 3] (or [N, T, H, W, 1])."""
    return [clip_metrics(clip, use_scipy) for clip in _as_clips(videos)]


def _aggregate(per_clip: Sequence[dict], index: np.ndarray) -> dict[str, float]:
    """Metric values over the clips ``index`` (with repeats, for the bootstrap)."""
    out = {}
    for name in MEAN_METRICS:
        values = np.array([float(per_clip[i][name]) for i in index])
        out[name] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    flips = sum(per_clip[i]["bounce_flips"] for i in index)
    out["bounce_correctness"] = sum(per_clip[i]["bounce_correct"] for i in index) / flips if flips else float("nan")
    return out


def summarize(per_clip: Sequence[dict], resamples: int = 200, seed: int = 0, level: float = 0.95) -> dict:
    """Each metric over clips as {"value", "ci": [low, high]} with a bootstrap over clips (percentile interval)."""
    n = len(per_clip)
    if n == 0:
        raise ValueError("no clips to summarize")
    value = _aggregate(per_clip, np.arange(n))
    rng = np.random.default_rng(seed)
    draws = [_aggregate(per_clip, rng.integers(n, size=n)) for _ in range(resamples)]
    tail = (1 - level) / 2 * 100
    out = {"clips": n}
    for name, v in value.items():
        samples = np.array([d[name] for d in draws])
        samples = samples[np.isfinite(samples)]
        ci = [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))] if len(samples) else None
        out[name] = {"value": v, "ci": ci}
    return out


def static_clips(videos) -> np.ndarray:
    """Reference: each clip's first frame repeated (a frozen clip)."""
    videos = _as_clips(videos)
    return np.repeat(videos[:, :1], videos.shape[1], axis=1)


def shuffled_clips(videos, seed: int = 0) -> np.ndarray:
    """Reference: each clip's frames in a random order (never the original one)."""
    videos = _as_clips(videos)
    rng = np.random.default_rng(seed)
    out = np.empty_like(videos)
    t_len = videos.shape[1]
    for i, clip in enumerate(videos):
        order = rng.permutation(t_len)
        while t_len > 1 and (order == np.arange(t_len)).all():
            order = rng.permutation(t_len)
        out[i] = clip[order]
    return out


def count_agreement(per_clip: Sequence[dict], expected: Sequence[int], fragments: bool = True) -> float:
    """Share of frames whose object count equals the count asked for (e.g. the objects named in the prompt);
    with ``fragments=False`` objects under FRAGMENT_AREA_FRACTION of the frame are not counted."""
    counts = [np.array(c["counts"]) - (0 if fragments else np.array(c["fragment_counts"])) for c in per_clip]
    hits = [np.mean(n == e) for n, e in zip(counts, expected)]
    return float(np.mean(hits)) if hits else float("nan")


def count_agreement_by_count(per_clip: Sequence[dict], expected: Sequence[int],
                             fragments: bool = True) -> dict[int, float]:
    """count_agreement of the clips asked for each number of objects, by that number (ascending)."""
    return {int(n): count_agreement([c for c, e in zip(per_clip, expected) if e == n],
                                    [e for e in expected if e == n], fragments)
            for n in sorted(set(expected))}


def count_histogram_overlap(per_clip: Sequence[dict], reference: Sequence[dict]) -> float:
    """Overlap (sum of minima, 1 = same) of the per-frame object count distributions of two sets of clips."""
    a = np.concatenate([c["counts"] for c in per_clip]).astype(np.int64)
    b = np.concatenate([c["counts"] for c in reference]).astype(np.int64)
    size = max(a.max(initial=0), b.max(initial=0)) + 1
    return float(np.minimum(np.bincount(a, minlength=size) / len(a), np.bincount(b, minlength=size) / len(b)).sum())


def checker(generated: Sequence[dict], real: Sequence[dict], expected_counts: Optional[Sequence[int]] = None,
            residual_factor: float = 3.0, rare: float = 0.1) -> dict:
    """The three numbers of an independent physics checker, generated clips against real ones.

    - objects per frame agreement: with ``expected_counts`` (one per generated clip, e.g. the number
      of objects its prompt names) the share of frames with that many objects; otherwise the overlap
      of the per-frame count distributions of generated and real clips;
    - motion residual of generated clips within ``residual_factor`` times that of real clips;
    - frozen or empty clips rare (at most ``rare`` of the generated clips).
    """
    extra = {}
    if expected_counts is not None:
        agreement, basis = count_agreement(generated, expected_counts), "prompt object count"
        # Diagnostics, not the checker's number: how much of the disagreement is fragments alone, and how
        # it depends on the number asked for. The built-in generator draws 1-3 objects equally often while a
        # short list of prompts need not (vidmoe eval's first 16 held-out clips ask for 1, 2 and 3 objects
        # 6, 7 and 3 times), so the mean over the numbers asked for is closer to what prompts drawn like the
        # generator's clips would score, as far as the few prompts of each number are typical ones.
        extra["agreement_without_fragments"] = count_agreement(generated, expected_counts, fragments=False)
        by_count = count_agreement_by_count(generated, expected_counts)
        extra["agreement_by_count"] = {str(n): value for n, value in by_count.items()}  # JSON keys
        extra["clips_by_count"] = {str(n): int(sum(e == n for e in expected_counts)) for n in by_count}
        extra["agreement_mean_over_counts"] = float(np.mean(list(by_count.values())))
    else:
        agreement, basis = count_histogram_overlap(generated, real), "count distribution overlap with real"
    gen = _aggregate(generated, np.arange(len(generated)))
    ref = _aggregate(real, np.arange(len(real)))
    ratio = gen["motion_residual"] / ref["motion_residual"] if ref["motion_residual"] > 0 else float("nan")
    bad = float(np.mean([c["frozen"] or c["empty"] for c in generated]))
    return {
        "objects_per_frame_agreement": agreement,
        "agreement_basis": basis,
        **extra,
        "motion_residual_ratio": ratio,
        "residual_factor": residual_factor,
        "motion_residual_within_3x_real": bool(ratio <= residual_factor),
        "frozen_or_empty_rate": bad,
        "frozen_or_empty_rare": bool(bad <= rare),
    }
