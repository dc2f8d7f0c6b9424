"""The spatiotemporal Mixture-of-Experts diffusion transformer, readable top to bottom.

Tokens live as [B, T', S, D] (T' frames after temporal patching, S = H' * W' patches per frame).
Each block is a spatial sub-block (attention within a frame) then a temporal sub-block
(attention across frames at one position); both end in a dense or MoE feed-forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange
from torch import nn

from .config import ModelConfig, config_from_dict, config_to_dict
from .layers import Attention, LabelEmbedder, PatchEmbed3D, SwiGLU, TimestepEmbedder, modulate, sincos_1d, sincos_2d
from .moe import ExpertPool, MoEAux, MoEFeedForward
from .precision import CheckedCompile
from .text import BuiltinTextEncoder, PretrainedTextEncoder

SUBBLOCK_KINDS = ("spatial", "temporal")

# The one place where tokens are regrouped into attention sequences.
_SEQUENCE_PATTERNS = {
    "spatial": "b t s d -> (b t) s d",  # one sequence per frame
    "temporal": "b t s d -> (b s) t d",  # one sequence per patch position
}


def to_sequences(x: torch.Tensor, kind: str) -> torch.Tensor:
    return rearrange(x, _SEQUENCE_PATTERNS[kind])


def from_sequences(x: torch.Tensor, kind: str, b: int, t: int, s: int) -> torch.Tensor:
    source, target = _SEQUENCE_PATTERNS[kind].split(" -> ")
    return rearrange(x, f"{target} -> {source}", b=b, t=t, s=s)


def expert_hidden(cfg: ModelConfig) -> int:
    return cfg.moe.expert_hidden or cfg.ffn_hidden


def dense_hidden_for(cfg: ModelConfig, match: str) -> int:
    """Hidden width of a dense SwiGLU that matches the MoE's active ("flops") or total ("params") size.

    In units of one hidden channel (3 * D parameters): a routed or shared expert is H of them,
    a router D * E parameters is E / 3 of them. A shared pool serves two sub-blocks, so a
    parameter-matched dense FFN gets half of it in each.
    """
    moe, h = cfg.moe, expert_hidden(cfg)
    router = moe.num_experts / 3
    if match == "flops":
        width = (moe.top_k + moe.num_shared_experts) * h + router
    elif match == "params":
        per_pool = (moe.num_experts + moe.num_shared_experts) * h
        width = (per_pool + 2 * router) / 2 if moe.expert_pool == "shared" else per_pool + router
    else:
        raise ValueError(f"unknown match {match!r}")
    # A multiple of 16: odd widths (e.g. 4099) fall off the fast matmul kernels and would make
    # the baseline look slow for a reason that has nothing to do with MoE.
    return multiple_of_16(width)


def multiple_of_16(width: float) -> int:
    """A feed-forward width rounded to the nearest multiple of 16 (at least 16), as aligned matmuls like."""
    return max(16, 16 * round(width / 16))


class SubBlock(nn.Module):
    """adaLN-Zero self-attention along one axis, cross-attention to text, then a dense or MoE feed-forward."""

    def __init__(self, cfg: ModelConfig, kind: str, ffn: nn.Module):
        super().__init__()
        d = cfg.hidden_size
        self.kind = kind
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.qk_norm)
        has_text = (cfg.text or cfg.text_encoder is not None) and (kind == "spatial" or cfg.cross_attention == "both")
        self.norm_cross = nn.LayerNorm(d, eps=1e-6) if has_text else None
        self.cross_attn = Attention(d, cfg.num_heads, cfg.qk_norm, context_dim=d) if has_text else None
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ffn = ffn
        # shift/scale/gate for attention and feed-forward, plus a gate for cross-attention.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, (7 if has_text else 6) * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor | None,
                text_mask: torch.Tensor | None) -> tuple[torch.Tensor, MoEAux | None]:
        mods = self.adaLN_modulation(c)[:, None, None, :].chunk(7 if self.cross_attn else 6, dim=-1)  # [B,1,1,D]
        x, h = self.mix(x, mods, text, text_mask)
        aux = None
        if isinstance(self.ffn, MoEFeedForward):
            h, aux = self.ffn(h)
        else:
            h = self.ffn(h)
        gate_f = mods[5]  # order of the chunks: shift, scale, gate of attention, then of the feed-forward
        return x + gate_f * h, aux

    def mix(self, x: torch.Tensor, mods: tuple[torch.Tensor, ...], text: torch.Tensor | None,
            text_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention and cross-attention with their residuals -> (x, the modulated feed-forward input).

        Fixed shapes and many small elementwise passes: the part `compile_regions` hands to torch.compile.
        """
        b, t, s, d = x.shape
        shift_a, scale_a, gate_a, shift_f, scale_f = mods[:5]
        h = to_sequences(modulate(self.norm1(x), shift_a, scale_a), self.kind)
        x = x + gate_a * from_sequences(self.attn(h), self.kind, b, t, s)
        if self.cross_attn is not None:
            h = self.cross_attn(self.norm_cross(x).reshape(b, t * s, d), context=text, mask=text_mask)
            x = x + mods[6] * h.view(b, t, s, d)
        return x, modulate(self.norm2(x), shift_f, scale_f)


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens back to patches."""

    def __init__(self, hidden: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, None, :].chunk(2, dim=-1)  # [B, 1, 1, D]
        return self.linear(modulate(self.norm(x), shift, scale))


class PixelRefiner(nn.Module):
    """Per-frame convolutions that correct the token head's x0 at full resolution, seeing the noisy input."""

    # A token head paints a 4x4 patch from one vector, and near t = 0 it must rebuild the clean clip
    # through the whole network: edges come out blended, and blended rims read as extra objects.
    # Here each pixel sees its neighbours across patch borders, the noisy input itself and the noise
    # level, so where little noise is left it can copy the input's hard edges (a skip connection the
    # network learns to use only where it helps, unlike edm's fixed c_skip(t)).

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels + 1, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 1), nn.SiLU(),
            nn.Conv2d(hidden, channels, 3, padding=1),
        ).to(memory_format=torch.channels_last)

    def forward(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0, x_t [B, C, T, H, W], t [B] -> the corrected x0 [B, C, T, H, W]."""
        b = x0.shape[0]
        level = t.to(x0.dtype).view(b, 1, 1, 1, 1).expand(b, 1, *x0.shape[2:])  # [B, 1, T, H, W]
        inputs = torch.cat([x0, x_t.to(x0.dtype), level], dim=1)  # [B, 2C+1, T, H, W]
        # Channels-last inputs and weights: CPU convolutions this narrow ran 3x faster so (forward + backward).
        frames = rearrange(inputs, "b c t h w -> (b t) c h w").contiguous(memory_format=torch.channels_last)
        correction = rearrange(self.net(frames), "(b t) c h w -> b c t h w", b=b)
        return x0 + correction


# Below this noise level an x0 head's error is weighed as if t were this, so the loss weight 1 / t^2
# of a velocity loss stays bounded near the clean end: by clamping the velocity itself
# (model.x0_velocity=clamped) or by the output's loss_weight (exact).
MIN_VELOCITY_T = 0.05
EXACT_VELOCITY_MIN_T = 1e-6  # x0_velocity=exact: only guards the division


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                     min_t: float = MIN_VELOCITY_T) -> torch.Tensor:
    """The flow velocity (x_t - x0) / t for x_t = (1 - t) x0 + t noise, t [B] or scalar, t clamped at ``min_t``."""
    t = t.float().clamp(min=min_t).reshape(-1, *([1] * (x_t.dim() - 1)))
    return (x_t.float() - x0.float()) / t


def x0_loss_weight(t: torch.Tensor) -> torch.Tensor:
    """(t / max(t, MIN_VELOCITY_T))^2 for t [B]: on an exact velocity's squared error, the x0 error
    weighed by 1 / max(t, MIN_VELOCITY_T)^2."""
    t = t.float()
    return (t / t.clamp(min=MIN_VELOCITY_T)) ** 2


def edm_coefficients(t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_in, skip, out) for t [B] as [B, 1, 1, 1, 1]: the edm velocity is skip * x_t - out * F(c_in * x_t).

    With var = (1 - t)^2 sd^2 + t^2, the variance of x_t: c_in = var^-1/2, and the velocity
    (x_t - x0) / t of x0 = c_skip x_t + c_out F, c_skip = (1 - t) sd^2 / var, c_out = t sd var^-1/2,
    simplifies to skip = (t - (1 - t) sd^2) / var and out = sd var^-1/2: bounded, no division by t.
    """
    t = t.float().reshape(-1, 1, 1, 1, 1)
    sd2 = sigma_data ** 2
    var = (1 - t) ** 2 * sd2 + t ** 2
    return var.rsqrt(), (t - (1 - t) * sd2) / var, sigma_data * var.rsqrt()


@dataclass
class VidMoEOutput(BaseOutput):
    """Velocity prediction and the MoE auxiliary results."""

    sample: torch.Tensor
    aux: MoEAux | None = None  # a default, because Accelerate rebuilds outputs field by field
    # [B]: the factor on each sample's squared velocity error in the training loss (None: 1)
    loss_weight: torch.Tensor | None = None
    # the clean-clip estimate behind `sample` (what self-conditioning feeds back; None from a velocity or edm
    # head without model.self_condition)
    x0: torch.Tensor | None = None


class VidMoETransformer(ModelMixin, ConfigMixin):
    """Spatiotemporal diffusion transformer with spatial and temporal Mixture-of-Experts sub-blocks."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, model_config: dict | None = None):
        super().__init__()
        cfg = config_from_dict({"model": model_config or {}}).model
        self.cfg = cfg
        d, c = cfg.hidden_size, cfg.latent_channels
        h, w = cfg.latent_size
        p, pt = cfg.patch_size, cfg.temporal_patch_size
        self.grid = (cfg.num_frames // pt, h // p, w // p)  # T', H', W'

        # A self-conditioned model takes its earlier x0 estimate as C more input channels.
        self.patch_embed = PatchEmbed3D(2 * c if cfg.self_condition else c, d, p, pt)
        self.register_buffer("pos_spatial", sincos_2d(self.grid[1], self.grid[2], d)[None, None], persistent=False)
        self.register_buffer("pos_temporal", sincos_1d(torch.arange(self.grid[0]), d)[None, :, None], persistent=False)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d) if cfg.num_classes > 0 else None
        if cfg.text_encoder is not None:
            self.text_encoder = PretrainedTextEncoder(cfg.text_encoder, d, cfg.text_max_length)
        elif cfg.text:
            self.text_encoder = BuiltinTextEncoder(cfg.vocab, d, cfg.num_heads, cfg.text_max_length, cfg.text_layers)
        else:
            self.text_encoder = None
        self.text_pool = nn.Linear(d, d) if self.text_encoder is not None else None

        shared_pool = cfg.ffn == "moe" and cfg.moe.expert_pool == "shared"
        self.pools = nn.ModuleList(ExpertPool(d, expert_hidden(cfg), cfg.moe) for _ in range(cfg.depth)) \
            if shared_pool else None
        self.spatial_blocks = nn.ModuleList(SubBlock(cfg, "spatial", self._ffn(i)) for i in range(cfg.depth))
        self.temporal_blocks = nn.ModuleList(SubBlock(cfg, "temporal", self._ffn(i)) for i in range(cfg.depth))
        self.final_layer = FinalLayer(d, pt * p * p * c)
        self.refiner = PixelRefiner(c, cfg.refine_channels) if cfg.refine_channels else None
        # The first-pass draws of self-conditioning: the same on every process (see forward).
        self._self_cond_draws = torch.Generator().manual_seed(0) if cfg.self_condition else None
        self.initialize_weights()

    def _ffn(self, block: int) -> nn.Module:
        cfg = self.cfg
        if cfg.ffn == "dense":
            hidden = dense_hidden_for(cfg, cfg.dense_match) if cfg.dense_match else cfg.ffn_hidden
            return SwiGLU(cfg.hidden_size, hidden)
        pool = self.pools[block] if self.pools is not None else None
        return MoEFeedForward(cfg.hidden_size, expert_hidden(cfg), cfg.moe, pool=pool)

    def initialize_weights(self) -> None:
        """DiT initialisation: every residual branch and the output start at exactly zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for block in [*self.spatial_blocks, *self.temporal_blocks, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.refiner is not None:
            nn.init.zeros_(self.refiner.net[-1].weight)
            nn.init.zeros_(self.refiner.net[-1].bias)

    def compile_regions(self, **options) -> None:
        """torch.compile each sub-block's attention part (`SubBlock.mix`) in place; the MoE stays eager.

        The MoE's data-dependent shapes break a whole-model graph into pieces that gain nothing;
        the attention and adaLN part has fixed shapes and is mostly small elementwise passes, which
        compiling fuses. Parameters and state_dict keys are unchanged. Each region checks its first call of
        each input shape against the eager code (`precision.CheckedCompile`): on one CPU the compiled code
        gave NaN in bf16.
        """
        for block in (*self.spatial_blocks, *self.temporal_blocks):
            block.mix = CheckedCompile(block.mix, **options)

    @property
    def model_config(self) -> ModelConfig:
        return self.cfg

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None = None,
                captions: list[str] | None = None, drop: torch.Tensor | None = None,
                self_cond: torch.Tensor | None = None, return_dict: bool = True) -> VidMoEOutput | tuple:
        """x [B, C, T, H, W], timestep [B] in [0, 1] (1 = noise) -> velocity [B, C, T, H, W].

        ``self_cond`` (model.self_condition): an earlier x0 estimate of the clip [B, C, T, H, W], such as
        the previous sampling step's ``x0``; None gives zeros, or in training, with probability
        model.self_condition_prob, the model's own estimate from a first pass without gradient.
        """
        b = x.shape[0]
        drop = self._drop_mask(b, drop, x.device)
        timestep = timestep.expand(b) if timestep.dim() == 0 else timestep  # [B]
        c = self.t_embedder(timestep)  # [B, D]
        if self.y_embedder is not None:
            c = c + self.y_embedder(labels, drop, b)
        text = text_mask = None
        if self.text_encoder is not None:
            texts = ["" if captions is None or dropped else caption
                     for caption, dropped in zip(captions or [""] * b, drop.tolist())]
            text, text_mask = self.text_encoder(texts)  # [B, L, D], [B, L]
            weights = text_mask.float().unsqueeze(-1)
            c = c + self.text_pool((text * weights).sum(1) / weights.sum(1))
        if self.cfg.self_condition and self_cond is None:
            self_cond = torch.zeros_like(x)
            # One draw for the whole batch (the first pass costs a forward whenever any clip takes it), from
            # the model's own generator: every process draws the same, so under FSDP all make the same passes.
            draw = torch.rand((), generator=self._self_cond_draws) if self.training else None
            if draw is not None and float(draw) < self.cfg.self_condition_prob:
                with torch.no_grad():  # same condition, same dropped captions; its MoE losses are not used
                    self_cond = self._denoise(x, timestep, c, text, text_mask, self_cond)[1].to(x.dtype)
        sample, x0, auxes, loss_weight = self._denoise(x, timestep, c, text, text_mask, self_cond)
        aux = MoEAux.combine(auxes, device=x.device)
        if not return_dict:
            return sample, aux
        return VidMoEOutput(sample=sample, aux=aux, loss_weight=loss_weight, x0=x0)

    def _denoise(self, x: torch.Tensor, timestep: torch.Tensor, c: torch.Tensor, text: torch.Tensor | None,
                 text_mask: torch.Tensor | None, self_cond: torch.Tensor | None):
        """The network from the noisy clip and the embedded condition: (velocity, x0 estimate, MoE aux
        items, loss weight or None)."""
        cfg = self.cfg
        x_in = x
        loss_weight = None
        if cfg.prediction == "edm":
            c_in, skip, scale_out = edm_coefficients(timestep, cfg.sigma_data)  # each [B, 1, 1, 1, 1]
            x_in = x * c_in.to(x.dtype)
        if cfg.self_condition:
            x_in = torch.cat([x_in, self_cond.to(x_in.dtype)], dim=1)  # [B, 2C, T, H, W]
        h = self.patch_embed(x_in) + self.pos_spatial + self.pos_temporal  # [B, T', S, D]
        auxes = []
        for i, (spatial, temporal) in enumerate(zip(self.spatial_blocks, self.temporal_blocks)):
            for kind, block in (("spatial", spatial), ("temporal", temporal)):
                h, aux = block(h, c, text, text_mask)
                if aux is not None:
                    auxes.append((f"blocks.{i}.{kind}", aux))
        out = self.final_layer(h, c)  # [B, T', S, pt*p*p*C]
        t, hh, ww = self.grid
        sample = rearrange(out, "b t (h w) (pt p q c) -> b c (t pt) (h p) (w q)",
                           h=hh, w=ww, pt=cfg.temporal_patch_size, p=cfg.patch_size, q=cfg.patch_size)
        if cfg.prediction == "x0":
            if self.refiner is not None:
                sample = self.refiner(sample, x, timestep)
            x0 = sample
            if cfg.x0_velocity == "exact":
                sample = velocity_from_x0(x, sample, timestep, EXACT_VELOCITY_MIN_T)
                loss_weight = x0_loss_weight(timestep)
            else:
                sample = velocity_from_x0(x, sample, timestep)
        else:
            if cfg.prediction == "edm":
                sample = skip * x.float() - scale_out * sample.float()
            # x_t - t v, only where it is fed back: not on every other model's training step
            x0 = x.float() - timestep.float().view(-1, 1, 1, 1, 1) * sample.float() if cfg.self_condition else None
        return sample, x0, auxes, loss_weight

    def _drop_mask(self, batch: int, drop: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Which samples see the null condition: those asked for, plus random ones in training."""
        mask = torch.zeros(batch, dtype=torch.bool, device=device) if drop is None else drop.to(device).bool()
        if self.training and self.cfg.cond_dropout > 0:
            mask = mask | (torch.rand(batch, device=device) < self.cfg.cond_dropout)
        return mask

    def moe_layers(self) -> list[tuple[str, MoEFeedForward]]:
        return [(f"blocks.{i}.{kind}", block.ffn)
                for i, pair in enumerate(zip(self.spatial_blocks, self.temporal_blocks))
                for kind, block in zip(SUBBLOCK_KINDS, pair) if isinstance(block.ffn, MoEFeedForward)]

    def routers(self) -> list[tuple[str, str, nn.Module]]:
        return [(name, name.rsplit(".", 1)[1], ffn.router) for name, ffn in self.moe_layers()]

    def moe_stats(self, reset: bool = True) -> dict[str, dict]:
        return {name: ffn.stats(reset) for name, ffn in self.moe_layers()}

    def after_optimizer_step(self) -> None:
        for _, ffn in self.moe_layers():
            ffn.update_bias()

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and active ones: what one token's forward pass multiplies by."""
        total = sum(p.numel() for p in self.parameters())
        active = total
        pools = {id(ffn.expert_pool): ffn.expert_pool for _, ffn in self.moe_layers()}
        for pool in pools.values():
            active -= sum(p.numel() for p in pool.parameters())
        for _, ffn in self.moe_layers():
            experts = ffn.experts
            per_expert = experts.w_in[0].numel() + experts.w_out[0].numel()
            active += ffn.cfg.top_k * per_expert
            if ffn.expert_pool.shared is not None:
                active += sum(p.numel() for p in ffn.expert_pool.shared.parameters())
        return {"total": total, "active": active}


def build_model(cfg: ModelConfig) -> VidMoETransformer:
    """The model for a ModelConfig (as in ``cfg.model`` of a loaded config)."""
    return VidMoETransformer(model_config=config_to_dict(cfg))
