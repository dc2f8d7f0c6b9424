"""Building blocks shared by the model: embedders, patchify, attention, SwiGLU, sin-cos positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; shift and scale broadcast over the token axes of x."""
    return x * (1 + scale) + shift


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin-cos features of shape [len(positions), dim] (dim even)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.to(torch.float64)[:, None] * freqs[None]  # [P, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos positions [height * width, dim], row-major: half the width each for y and x."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([sincos_1d(ys.flatten(), dim // 2), sincos_1d(xs.flatten(), dim // 2)], dim=1)


class TimestepEmbedder(nn.Module):
    """Diffusion time t in [0, 1] -> sinusoidal features -> MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t is scaled to [0, 1000] so the sinusoid frequencies cover the range as in DiT.
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]  # [B, half]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class LabelEmbedder(nn.Module):
    """Class label -> vector; index num_classes is the learned null class used for guidance."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor | None, drop: torch.Tensor, batch: int) -> torch.Tensor:
        device = self.table.weight.device
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels.to(device))
        return self.table(labels)


class PatchEmbed3D(nn.Module):
    """Non-overlapping (pt, p, p) patches -> tokens [B, T', S, D]."""

    def __init__(self, in_channels: int, hidden: int, patch: int, temporal_patch: int):
        super().__init__()
        kernel = (temporal_patch, patch, patch)
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, D, T', H', W']
        return x.flatten(3).permute(0, 2, 3, 1)  # [B, T', H'*W', D]


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with its weight cast to the input's dtype: under bf16 autocast the input arrives in
    bf16 while the weight stays fp32, and torch then falls back from its fused kernel to composed ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


# On CPUs in bf16, torch's fused attention kernel is several times slower than writing the products
# out for short sequences (fwd+bwd, [32, 4, 64, 32]: 14.3 against 1.9 ms; [512, 4, 4, 32]: 5.1 against
# 2.2 ms) and level at about 256 x 256 scores per head; in fp32 and on GPUs the kernel wins throughout.
SMALL_ATTENTION = 256 * 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [B, h, L, d], k and v [B, h, M, d]; mask broadcasts to [B, h, L, M]
    (True = attend)."""
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    if device != "cpu" or dtype != torch.bfloat16 or q.shape[-2] * k.shape[-2] > SMALL_ATTENTION:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # [B, h, L, M]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(dim=-1).to(dtype) @ v


class Attention(nn.Module):
    """Multi-head attention (through `attention`); self- or cross-attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D]; context [B, M, Dc] for cross-attention; mask [B, keys] (True = attend)."""
        b, n, d = x.shape
        if self.cross:
            q = self.q(x).view(b, n, self.num_heads, self.head_dim)  # [B, L, h, hd]
            k, v = self.kv(context).view(b, context.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        else:
            q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, L, h, hd]
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)  # [B, h, L, hd]
        if mask is not None:
            mask = mask[:, None, None, :]  # [B, 1, 1, keys]
        out = attention(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, L, D]


class _SwiGLUActivation(torch.autograd.Function):
    """silu(gate) * up on a fused [.., 2H] input; the backward writes one [.., 2H] gradient (no concat)."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        # Memory-bound at these sizes, so the number of passes over [.., H] is what counts:
        # aten's fused silu_backward makes it four.
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        out = torch.empty_like(h)
        d_gate, d_up = out.chunk(2, dim=-1)
        d_gate.copy_(torch.ops.aten.silu_backward(grad * up, gate))
        torch.mul(grad, F.silu(gate), out=d_up)
        return out


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last axis."""
    return _SwiGLUActivation.apply(h)


class SwiGLU(nn.Module):
    """Gated feed-forward: (silu(x W_g) * x W_u) W_out, gate and up projections fused."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(swiglu(self.w_in(x)))
