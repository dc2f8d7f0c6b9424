"""Figures (PNG, matplotlib's Agg canvas) and expert-overlay videos for the inspection report.

Every figure function takes plain arrays and a path and writes one file; none touches
pyplot's global state, so they are safe to call from notebooks and servers alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

UNROUTED_COLOR = (128, 128, 128)  # tokens no routed expert took
OVERLAY_ALPHA = 0.55  # weight of the expert colour in a tinted pixel
OVERLAY_MIN_SIDE = 128  # overlay clips are enlarged (nearest neighbour) to at least this many pixels


def new_figure(width: float, height: float):
    """A Figure drawn by the Agg canvas, without selecting a global pyplot backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _grid_axes(fig, count: int, max_cols: int = 4):
    """``count`` subplots in rows of at most ``max_cols``."""
    cols = min(max_cols, max(count, 1))
    rows = math.ceil(max(count, 1) / cols)
    return [fig.add_subplot(rows, cols, i + 1) for i in range(count)]


def _small_multiples_size(count: int, cell: tuple[float, float], max_cols: int = 4) -> tuple[float, float]:
    cols = min(max_cols, max(count, 1))
    return cell[0] * cols, cell[1] * math.ceil(max(count, 1) / cols)


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig`` and write it as a PNG of at most 256 colours: plots look the same at a third to
    a quarter of the bytes of a true-colour PNG (the figures committed under samples/ count)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    rgb.quantize(colors=256).save(path, optimize=True)
    return path


def _heatmap(ax, values: np.ndarray, xlabels: Sequence[str], ylabels: Sequence[str], title: str,
             vmin: Optional[float] = None, vmax: Optional[float] = None, cmap: str = "viridis", annotate: bool = True):
    values = np.asarray(values, dtype=np.float64)
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(xlabels)), labels=list(xlabels), fontsize=7)
    ax.set_yticks(range(len(ylabels)), labels=list(ylabels), fontsize=7)
    ax.set_title(title, fontsize=8)
    if annotate and values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    return image


def plot_load_heatmap(path: Path, names: Sequence[str], load: np.ndarray) -> Path:
    """Router x expert heatmap of assignment shares (each row sums to 1)."""
    load = np.asarray(load, dtype=np.float64)  # [L, E]
    fig = new_figure(1.2 + 0.45 * load.shape[1], 1.0 + 0.3 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    image = _heatmap(ax, load, [str(e) for e in range(load.shape[1])], names,
                     "expert load (share of assignments)", vmin=0.0)
    ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


def plot_time_buckets(path: Path, names: Sequence[str], shares: Sequence[np.ndarray],
                      bucket_labels: Sequence[str]) -> Path:
    """Per router: P(expert | diffusion-time bucket) as an expert x bucket heatmap."""
    fig = new_figure(*_small_multiples_size(len(names), (2.6, 2.6)))
    for ax, name, share in zip(_grid_axes(fig, len(names)), names, shares):
        share = np.asarray(share, dtype=np.float64)  # [E, buckets]
        _heatmap(ax, share, bucket_labels, [str(e) for e in range(len(share))], name, vmin=0.0,
                 annotate=share.size <= 64)
        ax.set_xlabel("t bucket", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
    return save_figure(fig, path)


def plot_motion_lift(path: Path, names: Sequence[str], lifts: Sequence[Sequence[Optional[float]]],
                     null_mean: Sequence[Optional[Sequence[Optional[float]]]],
                     null_std: Sequence[Optional[Sequence[Optional[float]]]]) -> Path:
    """Per router: each expert's motion lift P(moving | expert) / P(moving), with the null band."""
    fig = new_figure(*_small_multiples_size(len(names), (2.8, 2.2)))
    for i, (ax, name) in enumerate(zip(_grid_axes(fig, len(names)), names)):
        values = _as_float(lifts[i])
        experts = np.arange(len(values))
        ax.bar(experts, np.nan_to_num(values), color="tab:orange", label="observed")
        if null_mean[i] is not None:
            mean, std = _as_float(null_mean[i]), np.nan_to_num(_as_float(null_std[i]))
            ax.errorbar(experts, mean, yerr=2 * std, fmt="_", color="k", label="null ±2 std")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(experts)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("motion lift", fontsize=7)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_pool_shares(path: Path, pool_names: Sequence[str], spatial_share: Sequence[Sequence[Optional[float]]]) -> Path:
    """Shared pools: each expert's share of tokens coming from the spatial vs the temporal router."""
    fig = new_figure(*_small_multiples_size(len(pool_names), (2.8, 2.2)))
    for ax, name, share in zip(_grid_axes(fig, len(pool_names)), pool_names, spatial_share):
        share = np.nan_to_num(_as_float(share))
        experts = np.arange(len(share))
        ax.bar(experts, share, color="tab:blue", label="spatial")
        ax.bar(experts, 1 - share, bottom=share, color="tab:green", label="temporal")
        ax.set_ylim(0, 1)
        ax.set_xticks(experts)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_specialisation(path: Path, names: Sequence[str], attributes: Sequence[str], values: np.ndarray) -> Path:
    """Router x attribute heatmap of MI(expert; attribute) / H(attribute)."""
    values = np.asarray(values, dtype=np.float64)  # [L, A]
    fig = new_figure(1.5 + 0.7 * len(attributes), 1.0 + 0.3 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    image = _heatmap(ax, values, attributes, names, "specialisation MI(expert; attr) / H(attr)", vmin=0.0)
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


def plot_expert_legend(path: Path, colors: np.ndarray) -> Path:
    """The colour of each expert in the overlay videos."""
    colors = np.asarray(colors)
    fig = new_figure(0.5 + 0.4 * len(colors), 0.7)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(colors[None].astype(np.uint8), aspect="auto")
    ax.set_xticks(range(len(colors)), labels=[str(e) for e in range(len(colors))], fontsize=7)
    ax.set_yticks([])
    ax.set_title("expert colours", fontsize=8)
    return save_figure(fig, path)


def _as_float(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


# ---------------------------------------------------------------- overlays


def expert_colors(num_experts: int) -> np.ndarray:
    """A fixed, distinct colour per expert: uint8 [E, 3]."""
    from matplotlib import colormaps

    if num_experts <= 10:
        rgb = colormaps["tab10"](np.arange(num_experts))[:, :3]
    elif num_experts <= 20:
        rgb = colormaps["tab20"](np.arange(num_experts))[:, :3]
    else:
        rgb = colormaps["hsv"](np.arange(num_experts) / num_experts)[:, :3]
    return np.round(rgb * 255).astype(np.uint8)


def tint(frames: np.ndarray, top1: np.ndarray, colors: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Tint every patch of ``frames`` uint8 [T, H, W, 3] by its top-1 expert ``top1`` [T', H', W']."""
    t, h, w, _ = frames.shape
    gt, gh, gw = top1.shape
    palette = np.concatenate([np.asarray(colors, np.float32), np.float32([UNROUTED_COLOR])])  # [E+1, 3]
    per_pixel = top1.repeat(t // gt, 0).repeat(h // gh, 1).repeat(w // gw, 2)  # [T, H, W]
    color = palette[np.where(per_pixel < 0, len(palette) - 1, per_pixel)]  # [T, H, W, 3]
    return np.round((1 - alpha) * frames.astype(np.float32) + alpha * color).astype(np.uint8)


def side_by_side(frames: np.ndarray, tinted: np.ndarray, gap: int = 1) -> np.ndarray:
    """[T, H, W, 3] twice -> [T, H, 2W + gap, 3] with a white separator."""
    sep = np.full(frames.shape[:2] + (gap, 3), 255, dtype=np.uint8)
    return np.concatenate([frames, sep, tinted], axis=2)


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
    """A clip [C, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (grey clips are repeated to RGB)."""
    video = np.asarray(video, dtype=np.float32)
    frames = np.clip(np.round((video + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 3, 0)  # [T, H, W, C]
    if frames.shape[-1] == 1:
        frames = frames.repeat(3, axis=-1)
    return frames[..., :3]


def write_overlay(stem: Path, clips: Sequence[np.ndarray], top1: Sequence[np.ndarray], colors: np.ndarray,
                  fps: int = 4) -> list[Path]:
    """Each clip beside its expert-tinted copy, clips tiled one per row, as ``stem``.mp4 and .gif.

    ``clips``: uint8 [T, H, W, 3] each; ``top1``: the matching top-1 expert grids [T', H', W'].
    """
    from vidmoe.video_io import tile_videos, write_video

    pairs = np.stack([side_by_side(c, tint(c, e, colors)) for c, e in zip(clips, top1)])  # [N, T, H, 2W+1, 3]
    video = tile_videos(pairs, cols=1)  # [T, H', W', 3]
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    # Patches of a few pixels are unreadable at native size: enlarge each clip to >= 128 px.
    upscale = max(1, math.ceil(OVERLAY_MIN_SIDE / min(clips[0].shape[1:3])))
    paths = []
    for suffix in (".mp4", ".gif"):
        path = stem.parent / (stem.name + suffix)  # not with_suffix: names may contain dots
        write_video(path, video, fps=fps, upscale=upscale)
        paths.append(path)
    return paths
