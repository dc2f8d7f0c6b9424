"""Mixture-of-Experts feed-forward: router, grouped SwiGLU experts, dispatch, balance losses.

Shapes use these letters:
    N  tokens in the layer (B * T' * S)      D  model width
    E  routed experts                        K  experts per token (token choice)
    H  hidden width of one expert            A  token-expert assignments (N * K without drops)
    C  tokens one expert takes (capacity)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .layers import SwiGLU, swiglu


@dataclass
class RouterOutput:
    """Which expert each assignment goes to, with its gate; plus what the balance losses need."""

    token_ids: torch.Tensor  # [A] long
    expert_ids: torch.Tensor  # [A] long
    gates: torch.Tensor  # [A] float32
    probs: torch.Tensor  # [N, E] float32 softmax of the logits
    logits: torch.Tensor  # [N, E] float32
    num_tokens: int
    dropped: int = 0  # assignments removed by the capacity limit
    top_k: int | None = None  # set when every token has exactly K assignments, ordered token-major
    per_expert: int | None = None  # set when every expert has exactly this many, ordered expert-major


@dataclass
class MoEAux:
    """Auxiliary results of MoE layers: the weighted loss to add, its parts, tokens per expert."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def combine(items: list[tuple[str, "MoEAux"]], device: torch.device | None = None) -> "MoEAux":
        """Average losses over layers (so coefficients do not scale with depth); keep counts per layer."""
        if not items:
            return MoEAux(loss=torch.zeros((), device=device))
        n = len(items)
        losses: dict[str, torch.Tensor] = {}
        for _, aux in items:
            for key, value in aux.losses.items():
                losses[key] = losses.get(key, 0.0) + value / n
        return MoEAux(
            loss=sum(aux.loss for _, aux in items) / n,
            losses=losses,
            counts={name: aux.counts[""] for name, aux in items if "" in aux.counts},
        )


class Router(nn.Module):
    """fp32 linear D -> E with token-choice or expert-choice selection."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        # Aux-loss-free balancing: a bias added for selection only, never to the gates.
        self.register_buffer("selection_bias", torch.zeros(cfg.num_experts), persistent=True)
        self.blocked_experts: set[int] = set()
        nn.init.normal_(self.weight, std=0.02)

    def capacity(self, num_tokens: int) -> int:
        factor = 1.0 if self.cfg.capacity_factor is None else self.cfg.capacity_factor
        return max(1, math.ceil(factor * num_tokens * self.cfg.top_k / self.num_experts))

    def forward(self, x: torch.Tensor, groups: int = 1) -> RouterOutput:
        """x [N, D] -> assignments. Expert choice picks within each of `groups` equal runs of tokens
        (one per clip), so a clip's routing never depends on the other clips in its batch."""
        with torch.autocast(x.device.type, enabled=False):
            h = x.float()
            if self.training and self.cfg.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.cfg.jitter, 1.0 + self.cfg.jitter)
            logits = F.linear(h, self.weight.float())  # [N, E]
            probs = logits.softmax(dim=-1)
            scores = probs.detach()
            if self.cfg.balance == "bias":
                scores = scores + self.selection_bias
            if self.blocked_experts:
                blocked = torch.tensor(sorted(self.blocked_experts), device=x.device)
                scores = scores.index_fill(1, blocked, float("-inf"))
            if self.cfg.router == "expert_choice":
                return self._expert_choice(probs, logits, scores, groups)
            return self._token_choice(probs, logits, scores)

    def _token_choice(self, probs, logits, scores) -> RouterOutput:
        n, k = probs.shape[0], self.cfg.top_k
        expert_ids = scores.topk(k, dim=-1).indices  # [N, K]
        gates = probs.gather(1, expert_ids)  # [N, K]
        if self.cfg.renormalize and k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        token_ids = torch.arange(n, device=probs.device).repeat_interleave(k)  # [A]
        expert_ids, gates = expert_ids.flatten(), gates.flatten()  # [A]
        if self.cfg.capacity_factor is None:
            return RouterOutput(token_ids, expert_ids, gates, probs, logits, n, top_k=k)
        # First choices take their places before second choices (GShard priority), then token order.
        priority = torch.arange(n * k, device=probs.device).view(n, k).t().flatten()  # [A]: k-major
        ranked = expert_ids[priority]
        one_hot = F.one_hot(ranked, self.num_experts)  # [A, E]
        position = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # place of each assignment in its expert
        keep = torch.empty_like(position, dtype=torch.bool)
        keep[priority] = position < self.capacity(n)
        dropped = int((~keep).sum())
        return RouterOutput(token_ids[keep], expert_ids[keep], gates[keep], probs, logits, n, dropped=dropped)

    def _expert_choice(self, probs, logits, scores, groups: int) -> RouterOutput:
        n, e = probs.shape
        if n % groups:
            raise ValueError(f"expert choice over {groups} clips needs a multiple of {groups} tokens, got {n}")
        length = n // groups
        c = min(self.capacity(length), length)
        # Each expert takes its top C tokens of every clip: [E, G, C] positions within the clip.
        chosen = scores.view(groups, length, e).permute(2, 0, 1).topk(c, dim=-1).indices
        starts = torch.arange(groups, device=probs.device).view(1, groups, 1) * length
        token_ids = (chosen + starts).flatten()  # [A] expert-major
        expert_ids = torch.arange(e, device=probs.device).repeat_interleave(groups * c)  # [A]
        gates = probs[token_ids, expert_ids]
        if not self.blocked_experts:
            return RouterOutput(token_ids, expert_ids, gates, probs, logits, n, per_expert=groups * c)
        keep = torch.isfinite(scores[token_ids, expert_ids])  # a blocked expert takes nobody
        return RouterOutput(token_ids[keep], expert_ids[keep], gates[keep], probs, logits, n)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _Permute(torch.autograd.Function):
    """Rows x[index] where index is a permutation: the backward is a gather too, not a scatter."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)  # on CPUs ~8x faster than x[index] for whole rows

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _Replicate(torch.autograd.Function):
    """Dispatch gather x[order // K] for fixed top-K routing: backward sums each token's K rows."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        n = inverse.numel() // ctx.k
        return grad.index_select(0, inverse).view(n, ctx.k, -1).sum(1), None, None, None


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned row strides in every operand."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    step = 16 // x.element_size()
    return all(w.shape[-1] % step == 0 and w.shape[-2] % step == 0 for w in weights)


# On CPUs oneDNN builds a kernel for each new matrix shape it meets (with AMX in bf16 ~3 ms, ten times
# the product itself) and routing gives every expert a new number of rows at every step; padding each
# expert's rows to a multiple of this makes the shapes repeat. Only the per-segment path pads: the
# grouped path (GPUs by default) takes the rows as they are. The zero rows add half of it per expert on
# average: 12% more rows for bouncing_small's 16 experts of ~256 rows, 1.5% for the bench's 8 of ~2048.
SEGMENT_ROWS = 64


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights, run together on expert-sorted tokens."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))  # [E, D, 2H]: gate | up
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))  # [E, H, D]
        nn.init.normal_(self.w_in, std=dim ** -0.5)
        nn.init.normal_(self.w_out, std=hidden ** -0.5)

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_in.to(dtype), self.w_out.to(dtype)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, grouped: bool = True) -> torch.Tensor:
        """x [A, D] sorted by expert, counts [E] -> [A, D]."""
        w_in, w_out = self._weights(x.dtype)
        # Under torch.compile the grouped kernel is traced for bf16 only.
        traceable = x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
        if grouped and traceable and grouped_mm_supported(x, w_in, w_out):
            offsets = counts.cumsum(0).to(torch.int32)  # [E] end of each expert's rows
            h = _ContiguousGrad.apply(torch._grouped_mm(x, w_in, offs=offsets))  # [A, 2H]
            return _ContiguousGrad.apply(torch._grouped_mm(swiglu(h), w_out, offs=offsets))  # [A, D]
        # unbind, not w_in[e]: indexing makes each expert's backward zero-fill a full [E, D, 2H]
        # gradient and add it up; unbind's backward stacks the slices once.
        outs = []
        for rows, w_in_e, w_out_e in zip(x.split(counts.tolist()), w_in.unbind(0), w_out.unbind(0)):
            m = rows.shape[0]
            # Zero rows up to a multiple of SEGMENT_ROWS (zero in, zero out), padded per segment: one
            # scatter into a padded buffer for both paths ran the bench's layer 11% slower (103 vs 92 ms).
            rows = F.pad(rows, (0, 0, 0, -m % SEGMENT_ROWS))
            outs.append((swiglu(rows @ w_in_e) @ w_out_e)[:m])
        return torch.cat(outs) if outs else x.new_zeros(0, self.dim)

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """x [E, R, D], R rows for every expert -> [E, R, D]: two batched products, no padding."""
        w_in, w_out = self._weights(x.dtype)
        return torch.bmm(swiglu(torch.bmm(x, w_in)), w_out)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x [M, D], written plainly: the reference the grouped path is tested against."""
        w_in, w_out = self._weights(x.dtype)
        gate, up = (x @ w_in[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w_out[e]


class ExpertPool(nn.Module):
    """Routed experts plus the always-on shared experts (fused into one SwiGLU)."""

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.experts = GroupedExperts(cfg.num_experts, dim, hidden)
        self.shared = SwiGLU(dim, hidden * cfg.num_shared_experts) if cfg.num_shared_experts else None


class MoEFeedForward(nn.Module):
    """Router + expert pool. A pool given from outside (shared pool) is used but not owned."""

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, pool: ExpertPool | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.router = Router(dim, cfg)
        if pool is None:
            self.pool = ExpertPool(dim, hidden, cfg)
        else:
            # Kept out of the module tree so the weights are saved once, by their owner.
            self._external_pool = (pool,)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros(()), persistent=False)
        self.register_buffer("seen_tokens", torch.zeros(()), persistent=False)
        self.register_buffer("bias_counts", torch.zeros(cfg.num_experts), persistent=False)

    @property
    def expert_pool(self) -> ExpertPool:
        return self._external_pool[0] if hasattr(self, "_external_pool") else self.pool

    @property
    def experts(self) -> GroupedExperts:
        return self.expert_pool.experts

    def _use_grouped_mm(self, device: torch.device) -> bool:
        """torch._grouped_mm on GPUs; on CPUs (torch 2.14) one matmul per sorted segment measured ~20% faster."""
        return self.cfg.dispatch == "grouped" or (self.cfg.dispatch == "auto" and device.type == "cuda")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """x [..., D] -> (y [..., D], aux); with three or more axes the first indexes clips."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        route = self.router(x, groups=shape[0] if len(shape) > 2 else 1)
        if route.per_expert is None:
            counts = torch.bincount(route.expert_ids, minlength=self.num_experts)  # [E]
        else:  # known without looking at the routing: the shapes stay fixed (torch.compile can take it)
            counts = torch.full((self.num_experts,), route.per_expert, device=x.device)
        if self.cfg.dispatch == "loop":
            y = self.loop_reference(x, route)
        else:
            y = self._dispatch(x, route, counts)
        pool = self.expert_pool
        if pool.shared is not None:
            y = y + pool.shared(x)
        if self.training:
            self._count(route, counts)
        return y.view(shape), self._aux(route, counts)

    def _dispatch(self, x: torch.Tensor, route: RouterOutput, counts: torch.Tensor) -> torch.Tensor:
        """Sort assignments by expert, run all experts at once, weight by gates, add back per token."""
        compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xc = x.to(compute_dtype)
        if route.per_expert is not None:
            # Expert choice: the assignments come expert-major, R rows each, so the experts run as
            # one batched product with fixed shapes (no sort, no padding, nothing read back).
            tokens = route.token_ids
            xs = xc.index_select(0, tokens).view(self.num_experts, route.per_expert, -1)  # [E, R, D]
            ys = self.experts.batched(xs).flatten(0, 1) * route.gates[:, None].to(xs.dtype)  # [A, D]
            return torch.zeros_like(x).index_add_(0, tokens, ys.to(x.dtype))  # [N, D]
        order = torch.argsort(route.expert_ids, stable=True)  # [A]
        if route.top_k is not None:
            # Every token has exactly K assignments (row a belongs to token a // K): gathers whose
            # backward is a gather, and a K-way weighted sum instead of a scatter-add.
            k = route.top_k
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            xs = _Replicate.apply(xc, order, inverse, k)  # [A, D] sorted by expert
            ys = self.experts(xs, counts, grouped=self._use_grouped_mm(x.device))  # [A, D]
            ys = _Permute.apply(ys, inverse, order).view(-1, k, x.shape[-1])  # [N, K, D] token-major
            gates = route.gates.view(-1, k, 1).to(ys.dtype)  # [N, K, 1]
            # Elementwise, not bmm: N tiny [1, K] x [K, D] products ran ~4x slower (CPU, fwd+bwd).
            return (ys * gates).sum(1).to(x.dtype)  # [N, D]
        tokens = route.token_ids[order]
        ys = self.experts(xc.index_select(0, tokens), counts, grouped=self._use_grouped_mm(x.device))  # [A, D]
        ys = ys * route.gates[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, ys.to(x.dtype))  # [N, D]

    def loop_reference(self, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """One expert at a time, no sorting: the plain version dispatch must agree with."""
        y = torch.zeros_like(x)
        for e in range(self.num_experts):
            mask = route.expert_ids == e
            tokens = route.token_ids[mask]
            out = self.experts.expert(e, x[tokens]) * route.gates[mask, None].to(x.dtype)
            y = y.index_add(0, tokens, out)
        return y

    def _aux(self, route: RouterOutput, counts: torch.Tensor) -> MoEAux:
        losses = {}
        total = route.probs.new_zeros(())
        if self.cfg.balance == "aux_loss" and self.cfg.router == "token_choice":
            losses["balance_loss"] = switch_balance_loss(route.probs, counts)
            total = total + self.cfg.aux_loss_coef * losses["balance_loss"]
        if self.cfg.z_loss_coef > 0:
            losses["z_loss"] = torch.logsumexp(route.logits, dim=-1).square().mean()
            total = total + self.cfg.z_loss_coef * losses["z_loss"]
        return MoEAux(loss=total, losses=losses, counts={"": counts.detach()})

    @torch.no_grad()
    def _count(self, route: RouterOutput, counts: torch.Tensor) -> None:
        self.tokens_per_expert += counts
        self.bias_counts += counts
        self.dropped_tokens += route.dropped
        self.seen_tokens += route.num_tokens

    @torch.no_grad()
    def stats(self, reset: bool = True) -> dict:
        """Load shares, dropped fraction and tokens since the last reset (training mode only)."""
        total = self.tokens_per_expert.sum()
        assignments = self.seen_tokens * (self.cfg.top_k if self.cfg.router == "token_choice" else 1)
        out = {
            "load": (self.tokens_per_expert / total.clamp_min(1)).cpu(),
            "dropped_frac": float(self.dropped_tokens / assignments.clamp_min(1)),
            "tokens": int(self.seen_tokens),
        }
        if reset:
            self.tokens_per_expert.zero_()
            self.dropped_tokens.zero_()
            self.seen_tokens.zero_()
        return out

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing: nudge the selection bias of under-loaded experts up, over-loaded down."""
        if self.cfg.balance != "bias":
            return
        load = self.bias_counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every rank applies the same update
        if load.sum() > 0:
            step = torch.sign(load.mean() - load)
            self.router.selection_bias += self.cfg.bias_update_rate * (step - step.mean())  # only differences matter
        self.bias_counts.zero_()


def switch_balance_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e: 1 when balanced, E when all tokens go to one expert."""
    num_experts = probs.shape[-1]
    f = counts.float() / counts.sum().clamp_min(1)  # share of assignments per expert
    p = probs.mean(dim=0)  # mean router probability per expert
    return num_experts * (f * p).sum()
