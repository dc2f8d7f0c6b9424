"""Record every token's routing from a model's routers with forward hooks.

Usage::

    with RoutingRecorder(model) as rec:
        rec.set_batch(clips=[0, 1], time=0.5)
        model(x, t)
    records = rec.records()   # {router name: LayerRecord}

The MoE input is ordered [B, T', S] and flattened (b, t, s) with S = H' * W' row-major, so
token n of a forward pass sits at (b, t, y, x) = unravel(n, (B, T', H', W')).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

Grid = tuple[int, int, int]  # tokens per clip along (frames T', rows H', columns W')


def grid_from_config(model_cfg) -> Grid:
    """Token grid of one clip from a ModelConfig: (T / temporal patch, H / patch, W / patch)."""
    h, w = model_cfg.latent_size
    return (model_cfg.num_frames // model_cfg.temporal_patch_size,
            h // model_cfg.patch_size, w // model_cfg.patch_size)


@dataclass
class LayerRecord:
    """Every recorded token of one router: coordinates, diffusion time and assignments.

    Token arrays have length N (tokens in forward order, one block of G = T'*H'*W' tokens per
    clip and forward pass); assignment arrays have length A and point into the tokens.
    """

    name: str
    kind: str  # spatial | temporal
    num_experts: int
    grid: Grid
    clip: np.ndarray  # int16 [N] the caller's clip id
    frame: np.ndarray  # int16 [N] token frame t'
    row: np.ndarray  # int16 [N]
    col: np.ndarray  # int16 [N]
    time: np.ndarray  # float16 [N] diffusion time (1 = pure noise)
    top1: np.ndarray  # int16 [N] highest-gate expert, -1 when no routed expert took the token
    top1_gate: np.ndarray  # float16 [N]
    router_entropy: np.ndarray  # float16 [N] entropy (nats) of the router's softmax
    token: np.ndarray  # int32 [A] index into the token arrays
    expert: np.ndarray  # int16 [A]
    gate: np.ndarray  # float16 [A]

    @property
    def num_tokens(self) -> int:
        return len(self.top1)

    @property
    def block_size(self) -> int:
        return int(np.prod(self.grid))


@dataclass
class _Chunks:
    """Per-router lists of arrays, one per forward pass, concatenated on demand."""

    kind: str
    num_experts: int = 0
    tokens: int = 0
    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, **arrays: np.ndarray) -> None:
        """Store one forward pass's arrays, already in their compact dtypes."""
        for key, value in arrays.items():
            self.parts.setdefault(key, []).append(np.asarray(value).astype(_DTYPES[key]))


_DTYPES = {"clip": np.int16, "frame": np.int16, "row": np.int16, "col": np.int16, "time": np.float16,
           "top1": np.int16, "top1_gate": np.float16, "router_entropy": np.float16,
           "token": np.int32, "expert": np.int16, "gate": np.float16}


def top1_of(token_ids: np.ndarray, expert_ids: np.ndarray, gates: np.ndarray, num_tokens: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Highest-gate expert and its gate per token (-1 and 0 for tokens without assignment).

    Ties go to the lower expert id, so the result does not depend on assignment order.
    """
    top1 = np.full(num_tokens, -1, dtype=np.int64)
    top_gate = np.zeros(num_tokens, dtype=np.float32)
    if len(token_ids):
        order = np.lexsort((expert_ids, -gates, token_ids))  # by token, then gate descending
        tok = token_ids[order]
        first = np.r_[True, tok[1:] != tok[:-1]]
        top1[tok[first]] = expert_ids[order][first]
        top_gate[tok[first]] = gates[order][first]
    return top1, top_gate


class RoutingRecorder:
    """Context manager that hooks the routers of ``model.routers()`` and records their choices.

    ``layers`` restricts recording to those router names; ``grid`` overrides the token grid
    read from ``model.model_config``. Call :meth:`set_batch` before each forward pass to say
    which clips the batch holds and at which diffusion time; hooks are removed on exit.
    """

    def __init__(self, model: torch.nn.Module, layers: Optional[Sequence[str]] = None,
                 grid: Optional[Grid] = None):
        self.grid = tuple(grid) if grid is not None else grid_from_config(model.model_config)
        routers = list(model.routers())
        names = [name for name, _, _ in routers]
        unknown = sorted(set(layers or []) - set(names))
        if unknown:
            raise ValueError(f"unknown router {unknown[0]!r}; the model has {', '.join(names)}")
        self._routers = [r for r in routers if layers is None or r[0] in layers]
        self._chunks = {name: _Chunks(kind) for name, kind, _ in self._routers}
        self._handles: list = []
        self._clips: Optional[np.ndarray] = None
        self._times: Optional[np.ndarray] = None
        self._paused = False

    def __enter__(self) -> "RoutingRecorder":
        for name, _, module in self._routers:
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_batch(self, clips: Sequence[int], time: Union[float, Sequence[float], torch.Tensor]) -> None:
        """Clip ids [B] of the next forward pass and its diffusion time (one float or [B])."""
        self._clips = np.asarray(clips, dtype=np.int64).reshape(-1)
        if self._clips.size and not 0 <= self._clips.min() <= self._clips.max() <= np.iinfo(np.int16).max:
            raise ValueError("clip ids must lie in 0..32767 (they are stored as int16)")
        t = time.detach().float().cpu().numpy() if isinstance(time, torch.Tensor) else np.asarray(time, np.float64)
        self._times = np.broadcast_to(t.reshape(-1) if t.ndim else t, self._clips.shape).astype(np.float64)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block are not recorded (e.g. ablation runs)."""
        self._paused, previous = True, self._paused
        try:
            yield
        finally:
            self._paused = previous

    def _make_hook(self, name: str):
        def hook(module, args, output) -> None:
            if not self._paused:
                self._record(name, output)
        return hook

    def _record(self, name: str, out) -> None:
        chunks = self._chunks[name]
        g = int(np.prod(self.grid))
        n = int(out.num_tokens)
        if n % g:
            raise RuntimeError(f"router {name} saw {n} tokens, not a multiple of the {g}-token clip grid {self.grid}")
        batch = n // g
        clips, times = self._clips, self._times
        if clips is None or len(clips) != batch:
            raise RuntimeError(f"router {name} saw a batch of {batch} clips; call set_batch() with {batch} clip ids "
                               "before the forward pass")
        token_ids = out.token_ids.detach().cpu().numpy().astype(np.int64)
        expert_ids = out.expert_ids.detach().cpu().numpy().astype(np.int64)
        gates = out.gates.detach().float().cpu().numpy()
        probs = out.probs.detach().float()
        chunks.num_experts = int(probs.shape[-1])
        router_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).cpu().numpy()  # [N]
        top1, top_gate = top1_of(token_ids, expert_ids, gates, n)
        b, f, y, x = np.unravel_index(np.arange(n), (batch,) + self.grid)
        chunks.add(clip=clips[b], frame=f, row=y, col=x, time=times[b], top1=top1, top1_gate=top_gate,
                   router_entropy=router_entropy, token=token_ids + chunks.tokens, expert=expert_ids, gate=gates)
        chunks.tokens += n

    def records(self) -> dict[str, LayerRecord]:
        """Everything recorded so far, one LayerRecord per router (routers that never ran are left out)."""
        out = {}
        for name, chunks in self._chunks.items():
            if not chunks.tokens:
                continue
            arrays = {key: np.concatenate(chunks.parts[key]) for key in _DTYPES}
            out[name] = LayerRecord(name=name, kind=chunks.kind, num_experts=chunks.num_experts, grid=self.grid,
                                    **arrays)
        return out
