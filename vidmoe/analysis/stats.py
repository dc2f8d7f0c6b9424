"""Routing statistics on plain numpy arrays: load, collapse, token attributes, specialisation.

Letters: N tokens, E experts, V values of an attribute, C values of a conditioning variable,
G tokens per block (one clip at one diffusion time), P permutations. Entropies are in nats.

Specialisation is measured as MI(expert; attribute) / H(attribute): the share of the
attribute's uncertainty that the top-1 expert removes. It is 1 when the expert determines
the attribute (every moving token goes to experts that receive only moving tokens) whatever
the number of experts. Plain normalised mutual information, MI / sqrt(H(expert) H(attribute)),
also divides by the expert entropy and so stays far below 1 even for perfect specialisation
(8 balanced-ish experts and 15% moving tokens: NMI 0.45, MI/H 1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

# Collapse thresholds (documented in the report): a layer is flagged when any is crossed.
COLLAPSE_ENTROPY_NORM = 0.5  # routing entropy / log E below this
COLLAPSE_TOP_SHARE = 0.5  # one expert takes more than this share of the assignments
COLLAPSE_COSINE = 0.99  # two experts' flattened weights are this similar (homogenised)


# ---------------------------------------------------------------- entropies and information


def entropy(p: np.ndarray) -> float:
    """Entropy (nats) of a distribution or of unnormalised counts."""
    p = np.asarray(p, dtype=np.float64).ravel()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * np.log(p)).sum())


def _codes(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels as codes 0..K-1 (small non-negative integers are kept as they are: no sort needed)."""
    x = np.asarray(x).ravel()
    if x.dtype.kind in "iub" and len(x) and 0 <= x.min() and x.max() < 65536:
        return x.astype(np.int64), int(x.max()) + 1
    values, inverse = np.unique(x, return_inverse=True)
    return inverse.ravel(), len(values)


def _joint_table(*arrays: np.ndarray) -> np.ndarray:
    """Counts of every combination of the label arrays: shape [K1, K2, ...]."""
    coded = [_codes(a) for a in arrays]
    sizes = tuple(k for _, k in coded)
    flat = np.ravel_multi_index(tuple(c for c, _ in coded), sizes)
    return np.bincount(flat, minlength=int(np.prod(sizes))).reshape(sizes).astype(np.float64)


def _conditional_mi_from_table(table: np.ndarray) -> tuple[float, float]:
    """(MI(X; Y | C), H(Y | C)) from counts [C, X, Y]."""
    p = table / table.sum()
    p_c = p.sum(axis=(1, 2), keepdims=True)
    p_cx = p.sum(axis=2, keepdims=True)
    p_cy = p.sum(axis=1, keepdims=True)
    nz = p > 0  # where p > 0 the marginals are > 0 too
    mi = float((p[nz] * np.log((p * p_c)[nz] / (p_cx * p_cy)[nz])).sum())
    p_cy2 = p_cy[:, 0, :]  # [C, Y]
    nz_y = p_cy2 > 0
    p_c2 = np.broadcast_to(p_c[:, 0, :], p_cy2.shape)  # [C, Y]
    h_y_given_c = float(-(p_cy2[nz_y] * np.log(p_cy2[nz_y] / p_c2[nz_y])).sum())
    return max(mi, 0.0), h_y_given_c


def mutual_information(x: np.ndarray, y: np.ndarray, cond: Optional[np.ndarray] = None) -> float:
    """MI(x; y) in nats, or MI(x; y | cond) when ``cond`` is given."""
    c = np.zeros(len(x), dtype=np.int64) if cond is None else cond
    return _conditional_mi_from_table(_joint_table(c, x, y))[0]


def mi_over_h(expert: np.ndarray, attr: np.ndarray, cond: Optional[np.ndarray] = None) -> float:
    """MI(expert; attr [| cond]) / H(attr [| cond]); NaN when the attribute is constant."""
    if len(expert) == 0:
        return float("nan")
    c = np.zeros(len(expert), dtype=np.int64) if cond is None else cond
    mi, h = _conditional_mi_from_table(_joint_table(c, expert, attr))
    return mi / h if h > 1e-12 else float("nan")


def nmi(expert: np.ndarray, attr: np.ndarray) -> float:
    """Plain normalised MI, MI / sqrt(H(expert) H(attr)); kept to show why it is not enough."""
    h = np.sqrt(entropy(np.bincount(_codes(expert)[0])) * entropy(np.bincount(_codes(attr)[0])))
    return mutual_information(expert, attr) / h if h > 1e-12 else float("nan")


def lift(expert: np.ndarray, attr: np.ndarray, num_experts: int, num_values: int) -> np.ndarray:
    """P(attr = v | expert = e) / P(attr = v) as [E, V]; NaN for experts without tokens."""
    table = np.bincount(expert.astype(np.int64) * num_values + attr.astype(np.int64),
                        minlength=num_experts * num_values).reshape(num_experts, num_values)
    table = table.astype(np.float64)
    p_attr = table.sum(0) / max(table.sum(), 1.0)  # [V]
    per_expert = table.sum(1, keepdims=True)  # [E, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (table / per_expert) / p_attr[None, :]


def conditional_shares(expert: np.ndarray, cond: np.ndarray, num_experts: int, num_values: int) -> np.ndarray:
    """P(expert = e | cond = c) as [E, C] (each column sums to 1, or is NaN if c never occurs)."""
    table = np.bincount(cond.astype(np.int64) * num_experts + expert.astype(np.int64),
                        minlength=num_experts * num_values).reshape(num_values, num_experts).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return table / table.sum(0, keepdims=True)


# ---------------------------------------------------------------- nulls


def mean_by_value(x: np.ndarray, attr: np.ndarray, num_values: int) -> np.ndarray:
    """Mean of x [N] over the tokens of each attribute value [V] (NaN for a value no token has)."""
    sums = np.bincount(attr, weights=x, minlength=num_values)
    counts = np.bincount(attr, minlength=num_values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def summarize_null(observed: float, null: np.ndarray) -> dict:
    """Mean, std, z-score and one-sided permutation p-value of ``observed`` against ``null``."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if len(null) == 0 or not np.isfinite(observed):
        return {"mean": None, "std": None, "z": None, "p": None}
    mean, std = float(null.mean()), float(null.std(ddof=1)) if len(null) > 1 else 0.0
    z = (observed - mean) / std if std > 0 else (0.0 if observed == mean else float(np.sign(observed - mean) * np.inf))
    p = (1 + int((null >= observed).sum())) / (1 + len(null))
    return {"mean": mean, "std": std, "z": _finite_or_none(z), "p": p}


def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if np.isfinite(x) else None


def block_permutations(num_blocks: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` permutations of the blocks, none of them the identity (when more than one exists)."""
    perms = []
    while len(perms) < n:
        perm = rng.permutation(num_blocks)
        if num_blocks > 1 and np.array_equal(perm, np.arange(num_blocks)):
            continue
        perms.append(perm)
    return perms


def permute_blocks(attr: np.ndarray, block_size: int, perm: np.ndarray) -> np.ndarray:
    """Swap whole blocks' label arrays: tokens must be stored block by block, G each."""
    blocks = attr.reshape(-1, block_size)  # [num_blocks, G]
    return blocks[perm].reshape(-1)


def permutation_null(statistic: Callable[[np.ndarray], np.ndarray], attr: np.ndarray, block_size: int,
                     perms: Sequence[np.ndarray]) -> np.ndarray:
    """``statistic`` evaluated on the attribute with its block label arrays permuted: [P, ...]."""
    return np.stack([np.asarray(statistic(permute_blocks(attr, block_size, p))) for p in perms])


def random_router_null(statistic: Callable[[np.ndarray], np.ndarray], expert: np.ndarray, num_experts: int,
                       n: int, rng: np.random.Generator) -> np.ndarray:
    """``statistic`` on expert ids drawn i.i.d. from the observed load (same load, no information)."""
    load = np.bincount(expert, minlength=num_experts).astype(np.float64)
    load /= load.sum()
    return np.stack([np.asarray(statistic(rng.choice(num_experts, size=len(expert), p=load)))
                     for _ in range(n)])


def specialisation(expert: np.ndarray, attr: np.ndarray, num_experts: int, num_values: int, block_size: int,
                   perms: Optional[Sequence[np.ndarray]], rng: np.random.Generator, num_random: int,
                   cond: Optional[np.ndarray] = None) -> dict:
    """MI/H and lift of one attribute against the block-permutation and random-router nulls.

    ``expert`` [N] holds top-1 ids (-1: unrouted, left out); ``attr`` [N] codes 0..V-1 stored
    block by block (G = ``block_size`` tokens each) so whole blocks can be permuted; ``perms``
    None skips the permutation null (attributes that are the same in every block, e.g. frame
    index, cannot be permuted between blocks). ``cond`` conditions MI and H on a variable that
    belongs to the forward pass (the time bucket), so it is not permuted.
    """
    keep = expert >= 0
    e = expert[keep].astype(np.int64)
    c = None if cond is None else cond[keep]

    def score(a: np.ndarray) -> float:
        return mi_over_h(e, a[keep], c)

    def lifts(a: np.ndarray) -> np.ndarray:
        return lift(e, a[keep], num_experts, num_values)

    observed = score(attr)
    result = {"mi_over_h": _finite_or_none(observed), "null": None, "random_router": None,
              "lift": nan_to_none(lifts(attr)), "lift_null_mean": None, "lift_null_std": None}
    if perms is not None and len(perms):
        null = permutation_null(score, attr, block_size, perms)
        result["null"] = summarize_null(observed, null)
        with warnings.catch_warnings():  # experts without tokens give all-NaN columns
            warnings.simplefilter("ignore", RuntimeWarning)
            null_lift = permutation_null(lifts, attr, block_size, perms)  # [P, E, V]
            result["lift_null_mean"] = nan_to_none(np.nanmean(null_lift, axis=0))
            result["lift_null_std"] = nan_to_none(np.nanstd(null_lift, axis=0, ddof=1))
    if num_random:
        a_kept = attr[keep]
        null = random_router_null(lambda r: mi_over_h(r, a_kept, c), e, num_experts, num_random, rng)
        result["random_router"] = summarize_null(observed, null)
    return result


def nan_to_none(x: np.ndarray) -> Any:
    """Nested lists with NaN as None, for JSON."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        return _finite_or_none(float(x))
    return [nan_to_none(v) for v in x]


# ---------------------------------------------------------------- load and collapse


@dataclass
class LoadStats:
    """Per-layer load and collapse diagnostics from the routed assignments."""

    load: np.ndarray  # [E] share of assignments, sums to 1
    top1_load: np.ndarray  # [E] share of tokens whose highest-gate expert is e
    entropy: float  # of ``load``, nats
    entropy_norm: Optional[float]  # entropy / log E (None for one expert)
    cv: float  # std / mean of the assignment counts
    top_share: float
    dead_experts: list[int]  # experts that received no assignment
    dropped: float  # share of the N*K token-choice slots not filled (capacity drops)
    unrouted: float  # share of tokens that no routed expert processed

    def to_dict(self) -> dict:
        return {
            "load": self.load.tolist(), "top1_load": self.top1_load.tolist(), "entropy": self.entropy,
            "entropy_norm": self.entropy_norm, "cv": self.cv, "top_share": self.top_share,
            "dead_experts": self.dead_experts, "dropped": self.dropped, "unrouted": self.unrouted,
        }


def load_stats(assigned: np.ndarray, top1: np.ndarray, num_experts: int, slots_per_token: Optional[int]) -> LoadStats:
    """Load statistics from all assignments' expert ids [A] and top-1 ids [N] (-1: unrouted).

    ``slots_per_token`` is K for token choice (so dropped = 1 - A / (N K)); None for expert
    choice, where only unrouted tokens count as dropped.
    """
    counts = np.bincount(assigned.astype(np.int64), minlength=num_experts).astype(np.float64)
    total = counts.sum()
    load = counts / total if total > 0 else np.full(num_experts, np.nan)
    routed = top1[top1 >= 0].astype(np.int64)
    top1_counts = np.bincount(routed, minlength=num_experts).astype(np.float64)
    top1_load = top1_counts / max(top1_counts.sum(), 1.0)
    h = entropy(counts)
    n = len(top1)
    unrouted = float((top1 < 0).mean()) if n else 0.0
    dropped = max(0.0, 1.0 - total / (n * slots_per_token)) if slots_per_token and n else unrouted
    return LoadStats(
        load=load, top1_load=top1_load, entropy=h,
        entropy_norm=h / np.log(num_experts) if num_experts > 1 else None,
        cv=float(counts.std() / counts.mean()) if total > 0 else float("nan"),
        top_share=float(load.max()) if total > 0 else float("nan"),
        dead_experts=[int(e) for e in np.flatnonzero(counts == 0)],
        dropped=float(dropped), unrouted=unrouted,
    )


def weight_cosine(weights: np.ndarray) -> dict:
    """Mean and max off-diagonal cosine similarity between experts' flattened weights [E, F]."""
    w = np.asarray(weights, dtype=np.float64).reshape(len(weights), -1)
    if len(w) < 2:
        return {"mean": None, "max": None}
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    sim = w @ w.T  # [E, E]
    off = sim[~np.eye(len(w), dtype=bool)]
    return {"mean": float(off.mean()), "max": float(off.max())}


def collapse_reasons(stats: LoadStats, cosine_max: Optional[float]) -> list[str]:
    """Why a layer looks collapsed (empty list: it does not)."""
    reasons = []
    if stats.entropy_norm is not None and stats.entropy_norm < COLLAPSE_ENTROPY_NORM:
        reasons.append(f"entropy/logE {stats.entropy_norm:.2f} < {COLLAPSE_ENTROPY_NORM}")
    if len(stats.load) > 1 and stats.top_share > COLLAPSE_TOP_SHARE:
        reasons.append(f"top expert share {stats.top_share:.2f} > {COLLAPSE_TOP_SHARE}")
    if cosine_max is not None and cosine_max > COLLAPSE_COSINE:
        reasons.append(f"expert weight cosine {cosine_max:.3f} > {COLLAPSE_COSINE}")
    return reasons


# ---------------------------------------------------------------- token attributes

MOTION_THRESHOLD = 0.25  # a patch is moving when at least this share of its pixels moves
OBJECT_THRESHOLD = 0.25  # a patch belongs to an object when it covers at least this share
FRAME_DIFF_THRESHOLD = 0.1  # real video: |pixel - clip median| (on a 0..1 scale) that counts as motion


def pool_to_patches(mask: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Share of true pixels per patch: mask [T, H, W] -> [T', H', W'] floats."""
    t, h, w = mask.shape
    gt, gh, gw = grid
    if t % gt or h % gh or w % gw:
        raise ValueError(f"mask of shape {mask.shape} does not tile into a {grid} patch grid")
    blocks = np.asarray(mask, dtype=np.float32).reshape(gt, t // gt, gh, h // gh, gw, w // gw)  # [T', pt, H', p, W', p]
    return blocks.mean(axis=(1, 3, 5))


def moving_patches(motion_mask: np.ndarray, grid: tuple[int, int, int],
                   threshold: float = MOTION_THRESHOLD) -> np.ndarray:
    """Moving patches [T', H', W'] bool: at least ``threshold`` of the patch's pixels move."""
    return pool_to_patches(motion_mask, grid) >= threshold


def estimate_motion(video: np.ndarray, threshold: float = FRAME_DIFF_THRESHOLD) -> np.ndarray:
    """Moving pixels of a real clip [C, T, H, W] in [-1, 1] -> bool [T, H, W].

    The clip's per-pixel median over time stands in for the static background; a pixel moves
    in a frame when any channel differs from it by more than ``threshold`` (0..1 scale).
    """
    video = np.asarray(video, dtype=np.float32)
    background = np.median(video, axis=1, keepdims=True)  # [C, 1, H, W]
    return (np.abs(video - background).max(axis=0) / 2.0) > threshold


def patch_objects(object_mask: np.ndarray, grid: tuple[int, int, int], num_objects: int,
                  threshold: float = OBJECT_THRESHOLD) -> np.ndarray:
    """Object covering each patch [T', H', W'] (0 background, i+1 object i).

    The object with the largest coverage wins when it covers at least ``threshold`` of the patch.
    """
    if num_objects == 0:
        return np.zeros(grid, dtype=np.int64)
    cover = np.stack([pool_to_patches(object_mask == i + 1, grid) for i in range(num_objects)])  # [O, T', H', W']
    best = cover.argmax(0)
    return np.where(cover.max(0) >= threshold, best + 1, 0)


def time_bucket(t: np.ndarray, num_buckets: int) -> np.ndarray:
    """Equal-width buckets of t in [0, 1]: 0 is the least noisy."""
    return np.clip(np.floor(np.asarray(t, dtype=np.float64) * num_buckets), 0, num_buckets - 1).astype(np.int64)


def border_grid(rows: int, cols: int) -> np.ndarray:
    """True for patches on the frame's outer ring [H', W']."""
    border = np.zeros((rows, cols), dtype=bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    return border
