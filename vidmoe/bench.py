"""``vidmoe bench``: speed of the MoE layer, the training step, generation, a peer model and data loading.

Every comparison is measured side by side in one run, because these machines are noisy: each
candidate runs once or twice to warm up, then the candidates take turns (A B C A B C ...) for
``repeats`` rounds so that machine noise hits them equally, and the median is reported next to
the ratios; each target also says in how many rounds its ratio was met. Sections:

- ``moe_layer``: forward + backward of one MoE feed-forward (grouped dispatch, per-expert loop,
  the same experts under expert choice) against dense SwiGLUs matched in FLOPs and in parameters;
- ``model_step``: a whole training step (forward, flow loss + MoE aux loss, backward, gradient
  clipping, AdamW) of the MoE model, the same under expert choice, and the two dense baselines, with
  peak memory;
- ``generation``: one guided denoising step and one whole clip, for the same three models;
- ``peer``: the same training step for diffusers' ``LatteTransformer3DModel`` at the same size;
- ``data``: clips/s from a prepared cache, from decoding the video folder, and from the synthetic
  renderer, next to the clips/s the training step consumes;
- ``compile`` (only when named in ``--sections``): the MoE training step eager against
  ``train.compile=true``, how long the first, compiling step takes, and the compiled MoE step
  against the compiled ``dense_flops`` step.

``--size tiny`` runs everything at the size of ``configs/tiny.yaml`` in seconds (the tests use it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from .config import Config, MoEConfig, ModelConfig, load_config
from .errors import UsageError, check_writable_dir
from .precision import autocast_dtype, cpu_has_fast_bf16, resolve_mixed_precision

SECTIONS = ("moe_layer", "model_step", "generation", "peer", "data")
# Asked for by name only: compiling costs about a minute before the first step.
OPTIONAL_SECTIONS = ("compile",)
# The dense baselines are the MoE config with these overrides (as configs/dense_flops.yaml and
# configs/dense_params.yaml are for configs/bouncing_small.yaml).
MODEL_VARIANTS = {
    "moe": [],
    "dense_flops": ["model.ffn=dense", "model.dense_match=flops"],
    "dense_params": ["model.ffn=dense", "model.dense_match=params"],
}
# model_step also times the configs' MoE under expert choice, whose experts run as one batched product.
STEP_VARIANTS = {**MODEL_VARIANTS, "moe_expert_choice": ["model.moe.router=expert_choice"]}
GUIDANCE = 3.0


@dataclass
class BenchSize:
    """The sizes one bench run measures at."""

    name: str
    tokens: int  # moe_layer: N
    dim: int  # D
    experts: int  # E
    top_k: int  # K
    hidden: int  # H
    config: str  # the model of model_step, generation and peer
    batch_size: int
    sample_steps: int  # generation: steps of one whole clip
    data_clips: int
    repeats: int
    warmup: int


SIZES = {
    "full": BenchSize("full", tokens=8192, dim=256, experts=8, top_k=2, hidden=512,
                      config="configs/bouncing_small.yaml", batch_size=8, sample_steps=30, data_clips=16,
                      repeats=5, warmup=2),
    "tiny": BenchSize("tiny", tokens=256, dim=32, experts=4, top_k=2, hidden=32,
                      config="configs/tiny.yaml", batch_size=2, sample_steps=3, data_clips=2,
                      repeats=2, warmup=1),
}


# ----------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds of every run of every candidate: warm-up rounds, then ``repeats`` round-robin rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _rss_bytes() -> int:
    import psutil  # a dependency of accelerate

    return psutil.Process().memory_info().rss


def _release_free_memory() -> None:
    """Hand freed heap back to the OS (glibc), so an RSS rise measures what a step needs, not old garbage."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory a block adds: the allocator's peak on CUDA; on the CPU, RSS sampled every millisecond."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ("torch.cuda.max_memory_allocated minus memory_allocated before" if device.type == "cuda" else
                       "peak process RSS (psutil, sampled every 1 ms by a thread) minus RSS before, after malloc_trim")
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_memory()
        self.base = self.high = _rss_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.001):
            self.high = max(self.high, _rss_bytes())

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self.stop.set()
        self.thread.join()
        self.peak_bytes = max(self.high, _rss_bytes()) - self.base

    @property
    def megabytes(self) -> float:
        return self.peak_bytes / 2**20


def _autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load_average() -> Optional[list[float]]:
    """1, 5 and 15 minute load averages: how busy the machine was besides the bench."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def describe_machine(device: torch.device, precision: str) -> dict:
    """What the numbers were measured on, for the JSON and the table header."""
    fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "fast_bf16": bool(fast_bf16),
        "precision": precision,
        "load_average": _load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------- models and batches


def find_config_path(size: BenchSize) -> Path:
    from .demo import find_config

    return find_config(size.config)


def _load_config(size: BenchSize, overrides: list[str]) -> Config:
    from .data.synthetic import vocabulary

    cfg = load_config(find_config_path(size), ['train.mixed_precision="no"', *overrides])
    if cfg.model.text and not cfg.model.vocab:
        cfg.model.vocab = vocabulary()  # the trainer fills it from the data; the bench has no dataset
    return cfg


def model_configs(size: BenchSize) -> dict[str, Config]:
    """The MoE config of this size and its FLOP- and parameter-matched dense baselines."""
    return {name: _load_config(size, overrides) for name, overrides in MODEL_VARIANTS.items()}


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Add small noise to every weight: an untrained model's zero-initialised gates would skip no work
    but route every token alike, which a trained model does not."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param) * scale)


def _batch(cfg: Config, batch_size: int, device: torch.device, seed: int = 0):
    """Random clips in the model's space with labels and captions as training sees them."""
    from .data.synthetic import COLOR_NAMES, SHAPES, caption_for

    generator = torch.Generator().manual_seed(seed)
    m = cfg.model
    x0 = torch.randn(batch_size, m.latent_channels, m.num_frames, *m.latent_size, generator=generator).to(device)
    labels = (torch.randint(m.num_classes, (batch_size,), generator=generator).to(device)
              if m.num_classes else None)
    captions = None
    if m.text or m.text_encoder:
        picks = torch.randint(len(COLOR_NAMES) * len(SHAPES), (batch_size,), generator=generator).tolist()
        captions = [caption_for([p % len(COLOR_NAMES)], [p // len(COLOR_NAMES)]) for p in picks]
    return x0, labels, captions


def _optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    from .train import fused_adamw

    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                             fused=fused_adamw(next(model.parameters()).device))


def training_step(model, cfg: Config, batch, device: torch.device, precision: str) -> Callable[[], None]:
    """One training step of a vidmoe model as the trainer runs it at the start of a run (flow loss + aux
    loss, clip, AdamW): the low-noise options only if train.low_noise_from puts them there, as it does
    not in the bouncing configs (their last 20% adds a blur to some clips)."""
    from .train import training_loss

    x0, labels, captions = batch
    low_noise = cfg.train.low_noise_from == 0
    optimizer = _optimizer(model, cfg)
    params = list(model.parameters())
    model.train()

    def step() -> None:
        with _autocast(device, precision):
            loss, _, _ = training_loss(model, x0, labels, captions, cfg.train, low_noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_optimizer_step()

    return step


# ----------------------------------------------------------------------------- sections


def bench_moe_layer(size: BenchSize, device: torch.device, precision: str, repeats: int, warmup: int) -> dict:
    """Forward + backward of one MoE layer (grouped, loop, expert choice) against FLOP- and parameter-matched
    dense SwiGLUs."""
    from .layers import SwiGLU
    from .model import dense_hidden_for
    from .moe import MoEFeedForward, grouped_mm_supported

    moe_cfg = MoEConfig(num_experts=size.experts, top_k=size.top_k, num_shared_experts=0, expert_pool="split")
    model_cfg = ModelConfig(hidden_size=size.dim, ffn_hidden=size.hidden, moe=moe_cfg)
    widths = {f"dense_{match}": dense_hidden_for(model_cfg, match) for match in ("flops", "params")}
    torch.manual_seed(0)
    layers = {
        "grouped": MoEFeedForward(size.dim, size.hidden, moe_cfg),
        "loop": MoEFeedForward(size.dim, size.hidden, replace(moe_cfg, dispatch="loop")),
        # the same experts routed by expert choice: N * K / E rows each, one batched product
        "expert_choice": MoEFeedForward(size.dim, size.hidden, replace(moe_cfg, router="expert_choice")),
        **{name: SwiGLU(size.dim, hidden) for name, hidden in widths.items()},
    }
    layers["loop"].load_state_dict(layers["grouped"].state_dict())  # same weights, same routing
    layers["expert_choice"].load_state_dict(layers["grouped"].state_dict())
    x = torch.randn(size.tokens, size.dim, device=device)
    grad = torch.randn(size.tokens, size.dim, device=device)

    def run(layer: torch.nn.Module) -> Callable[[], None]:
        layer.to(device).train()

        def fn() -> None:
            layer.zero_grad(set_to_none=True)
            inp = x.detach().requires_grad_(True)
            with _autocast(device, precision):
                out = layer(inp)
            if isinstance(out, tuple):
                y, aux = out
                ((y.float() * grad).sum() + aux.loss).backward()
            else:
                (out.float() * grad).sum().backward()

        return fn

    times = interleaved({name: run(layer) for name, layer in layers.items()}, repeats, warmup, device)
    med = {name: _median(t) for name, t in times.items()}
    experts = layers["grouped"].experts
    w_in, w_out = experts.w_in, experts.w_out
    dtype = autocast_dtype(precision) or x.dtype
    return {
        "shape": {"N": size.tokens, "D": size.dim, "E": size.experts, "K": size.top_k, "H": size.hidden},
        "dense_hidden": widths,
        "grouped_kernel": ("torch._grouped_mm"
                           if layers["grouped"]._use_grouped_mm(x.device)
                           and grouped_mm_supported(x.to(dtype), w_in.to(dtype), w_out.to(dtype))
                           else "one matmul per sorted expert segment"),
        "grouped_s": med["grouped"],
        "loop_s": med["loop"],
        "dense_flops_s": med["dense_flops"],
        "dense_params_s": med["dense_params"],
        "grouped_over_dense_flops": med["grouped"] / med["dense_flops"],
        "loop_over_grouped": med["loop"] / med["grouped"],
        "expert_choice_s": med["expert_choice"],
        "expert_choice_over_dense_flops": med["expert_choice"] / med["dense_flops"],
        "samples": times,
    }


def bench_model_step(size: BenchSize, device: torch.device, precision: str, repeats: int, warmup: int) -> dict:
    """A whole training step of the MoE model and its dense baselines, with peak memory and parameter counts."""
    from .model import build_model

    configs = {name: _load_config(size, overrides) for name, overrides in STEP_VARIANTS.items()}
    steps, models, counts = {}, {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device)
        counts[name] = model.parameter_counts()
        models[name] = model
        steps[name] = training_step(model, cfg, _batch(cfg, size.batch_size, device), device, precision)
    times = interleaved(steps, repeats, warmup, device)
    memory = {}
    for name, step in steps.items():  # after the warm-up, so optimizer state already exists
        with PeakMemory(device) as peak:
            step()
        memory[name] = peak.megabytes
    per_model = {
        name: {
            "step_s": _median(times[name]),
            "clips_per_s": size.batch_size / _median(times[name]),
            "peak_memory_mb": round(memory[name], 1),
            "params_total": counts[name]["total"],
            "params_active": counts[name]["active"],
            "overrides": STEP_VARIANTS[name],
        }
        for name in steps
    }
    moe = per_model["moe"]["step_s"]
    return {
        "config": str(find_config_path(size)),
        "batch_size": size.batch_size,
        "memory_method": PeakMemory(device).method,
        "models": per_model,
        "moe_s": moe,
        "dense_flops_s": per_model["dense_flops"]["step_s"],
        "dense_params_s": per_model["dense_params"]["step_s"],
        "moe_over_dense_flops": moe / per_model["dense_flops"]["step_s"],
        "moe_over_dense_params": moe / per_model["dense_params"]["step_s"],
        "moe_expert_choice_over_dense_flops": (per_model["moe_expert_choice"]["step_s"]
                                               / per_model["dense_flops"]["step_s"]),
        "samples": times,
    }


def bench_compile(size: BenchSize, device: torch.device, precision: str, repeats: int, warmup: int) -> dict:
    """The MoE training step eager against ``train.compile`` (each sub-block's attention part compiled),
    and the compiled MoE step against the compiled ``dense_flops`` step."""
    from .model import build_model

    configs = model_configs(size)
    steps, first_steps = {}, {}
    for name, cfg_name, compiled in (("eager", "moe", False), ("compiled", "moe", True),
                                     ("dense_flops_compiled", "dense_flops", True)):
        cfg = configs[cfg_name]
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device)
        if compiled:
            model.compile_regions()
        steps[name] = training_step(model, cfg, _batch(cfg, size.batch_size, device), device, precision)
        if compiled:
            started = time.monotonic()
            steps[name]()  # compiles forward and backward
            first_steps[name] = time.monotonic() - started
    times = interleaved(steps, repeats, warmup, device)
    eager, compiled, dense = (_median(times[name]) for name in ("eager", "compiled", "dense_flops_compiled"))
    return {"config": str(find_config_path(size)), "batch_size": size.batch_size, "eager_s": eager,
            "compiled_s": compiled, "compiled_over_eager": compiled / eager,
            "first_step_s": first_steps["compiled"], "dense_flops_compiled_s": dense,
            "compiled_moe_over_dense_flops": compiled / dense, "samples": times}


def bench_generation(size: BenchSize, device: torch.device, precision: str, repeats: int, warmup: int) -> dict:
    """One guided denoising step (a batch-2 forward) and one whole clip, for the three models (random weights)."""
    from .diffusion import guided_velocity, sample
    from .model import build_model

    configs = model_configs(size)
    one_step, whole_clip = {}, {}
    for seed, (name, cfg) in enumerate(configs.items()):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        _perturb(model, seed)
        model.to(device).eval()
        x, labels, captions = _batch(cfg, 1, device, seed)
        t = torch.full((1,), 0.5, device=device)

        def step(model=model, x=x, labels=labels, captions=captions, t=t) -> None:
            with torch.no_grad(), _autocast(device, precision):
                guided_velocity(model, x, t, labels, captions, GUIDANCE)

        def clip(model=model, x=x, labels=labels, captions=captions) -> None:
            with _autocast(device, precision):
                sample(model, x.shape, labels=labels, captions=captions, steps=size.sample_steps, guidance=GUIDANCE,
                       noise=x, device=device)

        one_step[name], whole_clip[name] = step, clip
    step_times = interleaved(one_step, repeats, warmup, device)
    clip_times = interleaved(whole_clip, repeats, min(warmup, 1), device)
    per_model = {name: {"step_s": _median(step_times[name]), "clip_s": _median(clip_times[name])}
                 for name in configs}
    moe = per_model["moe"]
    return {
        "config": str(find_config_path(size)),
        "clip_steps": size.sample_steps,
        "guidance": GUIDANCE,
        "models": per_model,
        "moe_step_over_dense_flops": moe["step_s"] / per_model["dense_flops"]["step_s"],
        "moe_clip_over_dense_flops": moe["clip_s"] / per_model["dense_flops"]["clip_s"],
        "moe_clip_over_dense_params": moe["clip_s"] / per_model["dense_params"]["clip_s"],
        "samples": {"step": step_times, "clip": clip_times},
    }


def latte_config(model_cfg: ModelConfig) -> dict:
    """diffusers LatteTransformer3DModel arguments matching a vidmoe model's width, depth, heads, patch and frames.

    Latte as its authors configure it (ada_norm_single, GELU feed-forward of 4x width, cross-attention
    to text in the spatial blocks), with text tokens of the model's width and no learned sigma.
    Latte has no temporal patches: with ``temporal_patch_size`` pt > 1 it sees T / pt frames of
    pt * C channels (``fold_time``), so both models get the same tokens from the same patch values.
    """
    height, width = model_cfg.latent_size
    if height != width:
        raise UsageError(f"the Latte comparison needs square frames; model.sample_size gives {height}x{width}")
    d, pt = model_cfg.hidden_size, model_cfg.temporal_patch_size
    return dict(num_attention_heads=model_cfg.num_heads, attention_head_dim=d // model_cfg.num_heads,
                in_channels=model_cfg.latent_channels * pt, out_channels=model_cfg.latent_channels * pt,
                num_layers=model_cfg.depth, sample_size=height, patch_size=model_cfg.patch_size,
                video_length=model_cfg.num_frames // pt, cross_attention_dim=d, caption_channels=d,
                activation_fn="gelu-approximate", attention_bias=True, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6)


def latte_matched_overrides(model_cfg: ModelConfig) -> list[str]:
    """Our MoE model with Latte's compute per token: text cross-attention in the spatial sub-blocks
    only, and experts narrowed so top-k SwiGLU experts (3 matrices of D x H each) cost what Latte's
    GELU feed-forward (2 matrices of D x 4D) does: H = 8D / (3k), a multiple of 16."""
    from .model import multiple_of_16

    moe = model_cfg.moe
    hidden = multiple_of_16(8 * model_cfg.hidden_size / (3 * (moe.top_k + moe.num_shared_experts)))
    return ["model.cross_attention=spatial", f"model.moe.expert_hidden={hidden}"]


def latte_dense_overrides(model_cfg: ModelConfig) -> list[str]:
    """Our backbone without MoE at Latte's compute per token: cross-attention in the spatial sub-blocks
    only and one dense SwiGLU of hidden 8D / 3 (3 matrices of D x H = Latte's 2 of D x 4D)."""
    from .model import multiple_of_16

    hidden = multiple_of_16(8 * model_cfg.hidden_size / 3)
    return ["model.cross_attention=spatial", "model.ffn=dense", "model.dense_match=null",
            f"model.ffn_hidden={hidden}"]


# What the dense backbone at Latte's compute still has that Latte has not, taken away one at a time
# (each variant keeps the removals before it): without all of them, what is left between the two is
# the code, not the model.
LATTE_DENSE_REMOVALS = (("ours_dense_latte_matched", []),
                        ("ours_dense_latte_matched_no_qk_norm", ["model.qk_norm=false"]),
                        ("ours_dense_latte_matched_no_qk_norm_no_refine", ["model.refine_channels=0"]))


def latte_dense_variants(size: BenchSize, cfg: Config) -> dict[str, Config]:
    """The dense backbone at Latte's compute, then with each of LATTE_DENSE_REMOVALS taken away in turn."""
    overrides, variants = latte_dense_overrides(cfg.model), {}
    for name, removal in LATTE_DENSE_REMOVALS:
        overrides = overrides + removal
        variants[name] = _load_config(size, overrides)
    return variants


def latte_matched_config(size: BenchSize, cfg: Config) -> Config:
    return _load_config(size, latte_matched_overrides(cfg.model))


def fold_time(x: torch.Tensor, temporal_patch: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, pt*C, T/pt, H, W]: a temporal patch of pt frames becomes pt channel groups."""
    return rearrange(x, "b c (t pt) h w -> b (pt c) t h w", pt=temporal_patch)


def latte_step(model, cfg: Config, batch, device: torch.device, precision: str) -> Callable[[], None]:
    """The same rectified-flow training step for Latte (it takes t in diffusers' 0..1000 units)."""
    from .diffusion import add_noise, sample_timesteps

    x0 = fold_time(batch[0], cfg.model.temporal_patch_size)
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(x0.shape[0], cfg.model.text_max_length, cfg.model.hidden_size, generator=generator).to(device)
    optimizer = _optimizer(model, cfg)
    params = list(model.parameters())
    model.train()

    def step() -> None:
        t = sample_timesteps(x0.shape[0], cfg.train.timestep_mean, cfg.train.timestep_std, device=device)
        noise = torch.randn_like(x0)
        with _autocast(device, precision):
            out = model(add_noise(x0, t, noise), timestep=t * 1000, encoder_hidden_states=text).sample
        loss = F.mse_loss(out.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_peer(size: BenchSize, device: torch.device, precision: str, repeats: int, warmup: int) -> dict:
    """Our training step against diffusers' Latte at the same width, depth, heads, patch and frames."""
    from diffusers import LatteTransformer3DModel

    from .model import build_model

    configs = model_configs(size)
    cfg = configs["moe"]
    latte_args = latte_config(cfg.model)
    torch.manual_seed(0)
    latte = LatteTransformer3DModel(**latte_args).to(device)
    ours = build_model(cfg.model).to(device)
    dense = build_model(configs["dense_flops"].model).to(device)
    matched_cfg = latte_matched_config(size, cfg)
    matched = build_model(matched_cfg.model).to(device)
    batch = _batch(cfg, size.batch_size, device)
    steps = {
        "ours": training_step(ours, cfg, batch, device, precision),
        "ours_dense_flops": training_step(dense, configs["dense_flops"], batch, device, precision),
        "ours_latte_matched": training_step(matched, matched_cfg, batch, device, precision),
        "latte": latte_step(latte, cfg, batch, device, precision),
    }
    # Where the matched model's time goes: the same backbone with a dense feed-forward, then without
    # qk-norm and the refining convolutions in turn (Latte has neither).
    for name, variant_cfg in latte_dense_variants(size, cfg).items():
        steps[name] = training_step(build_model(variant_cfg.model).to(device), variant_cfg, batch, device, precision)
    times = interleaved(steps, repeats, warmup, device)
    med = {name: _median(t) for name, t in times.items()}
    return {
        "config": str(find_config_path(size)),
        "batch_size": size.batch_size,
        "latte_config": latte_args,
        "latte_params": sum(p.numel() for p in latte.parameters()),
        "ours_params": ours.parameter_counts(),
        "latte_s": med["latte"],
        "ours_s": med["ours"],
        "ours_dense_flops_s": med["ours_dense_flops"],
        "ours_over_latte": med["ours"] / med["latte"],
        "dense_flops_over_latte": med["ours_dense_flops"] / med["latte"],
        "ours_latte_matched_s": med["ours_latte_matched"],
        "ours_latte_matched_params": matched.parameter_counts(),
        "ours_latte_matched_overrides": latte_matched_overrides(cfg.model),
        "ours_latte_matched_over_latte": med["ours_latte_matched"] / med["latte"],
        "ours_dense_latte_matched_overrides": latte_dense_overrides(cfg.model),
        **{key: value for name, _ in LATTE_DENSE_REMOVALS
           for key, value in ((f"{name}_s", med[name]), (f"{name}_over_latte", med[name] / med["latte"]))},
        "samples": times,
    }


def bench_data(size: BenchSize, device: torch.device, precision: str, repeats: int, warmup: int,
               train_clips_per_s: Optional[float] = None) -> dict:
    """Clips/s from a prepared cache, from decoding the same video folder, and from the synthetic renderer."""
    from torch.utils.data import DataLoader

    from .data import build_dataset, collate
    from .data.prepare import prepare

    cfg = _load_config(size, [])
    with tempfile.TemporaryDirectory(prefix="vidmoe-bench-") as tmp:
        folder, cache = Path(tmp) / "videos", Path(tmp) / "cache"
        prepare("synthetic:bouncing_shapes", folder, num_clips=size.data_clips, cfg=cfg)
        prepare(str(folder), cache, cfg=cfg)
        datasets = {name: build_dataset(replace(cfg, data=replace(cfg.data, source=source, num_clips=size.data_clips)))
                    for name, source in (("cache", str(cache)), ("decode", str(folder)),
                                         ("synthetic", "synthetic:bouncing_shapes"))}

        def read_all(dataset) -> Callable[[], None]:
            def fn() -> None:
                for _ in DataLoader(dataset, batch_size=size.batch_size, collate_fn=collate, num_workers=0):
                    pass
            return fn

        times = interleaved({name: read_all(ds) for name, ds in datasets.items()}, repeats, warmup, device)
    rates = {name: len(datasets[name]) / _median(t) for name, t in times.items()}
    return {
        "clips": {name: len(ds) for name, ds in datasets.items()},
        "cache_clips_per_s": rates["cache"],
        "decode_clips_per_s": rates["decode"],
        "synthetic_clips_per_s": rates["synthetic"],
        "train_clips_per_s": train_clips_per_s,
        "cache_over_train": rates["cache"] / train_clips_per_s if train_clips_per_s else None,
        "num_workers": 0,
        "samples": times,
    }


# ----------------------------------------------------------------------------- targets and the table


@dataclass
class Target:
    """A speed goal: ``section.key`` compared with a limit. ``pair`` names the two candidates of the
    section's samples whose time ratio the key is, so the ratio can also be read in every repeat."""

    section: str
    key: str
    text: str
    op: str  # "<=", ">=", ">"
    limit: float
    goal: Optional[float] = None
    pair: Optional[tuple[str, str]] = None


TARGETS = [
    Target("moe_layer", "grouped_over_dense_flops", "MoE layer grouped / dense FLOP-matched", "<=", 1.3, 1.1,
           pair=("grouped", "dense_flops")),
    Target("moe_layer", "loop_over_grouped", "MoE layer per-expert loop / grouped (loop slower)", ">", 1.0,
           pair=("loop", "grouped")),
    Target("model_step", "moe_over_dense_flops", "training step MoE / dense_flops", "<=", 1.15,
           pair=("moe", "dense_flops")),
    Target("model_step", "moe_over_dense_params", "training step MoE / dense_params", "<=", 0.6,
           pair=("moe", "dense_params")),
    Target("peer", "ours_over_latte", "training step ours / Latte at equal size", "<=", 1.0, pair=("ours", "latte")),
    Target("peer", "ours_latte_matched_over_latte", "... ours at Latte's compute per token / Latte", "<=", 1.0,
           pair=("ours_latte_matched", "latte")),
    Target("data", "cache_over_train", "cache clips/s / clips/s training consumes", ">=", 10.0),
]


def _compare(value: float, op: str, limit: float) -> bool:
    return {"<=": value <= limit, ">=": value >= limit, ">": value > limit}[op]


def repeat_ratios(samples: dict[str, list[float]], pair: tuple[str, str]) -> list[float]:
    """The time ratio of two candidates in each round of ``interleaved``, where both ran back to back.
    Their lowest and highest bound the ratio of the medians (each time is at least the lowest ratio times
    its partner, so each median is too), and how many meet a target says how close the call was."""
    num, den = (samples.get(name) for name in pair)
    return [a / b for a, b in zip(num, den)] if num and den else []


def check_targets(sections: dict) -> list[dict]:
    out = []
    for target in TARGETS:
        section = sections.get(target.section, {})
        value = section.get(target.key)
        row = {"section": target.section, "key": target.key, "text": target.text, "op": target.op,
               "limit": target.limit, "goal": target.goal, "measured": value,
               "met": None if value is None else _compare(value, target.op, target.limit)}
        if target.goal is not None and value is not None:
            row["goal_met"] = _compare(value, target.op, target.goal)
        ratios = repeat_ratios(section.get("samples", {}), target.pair) if target.pair and value is not None else []
        if ratios:
            row["repeat_range"] = [min(ratios), max(ratios)]
            row["met_in_repeats"] = sum(_compare(r, target.op, target.limit) for r in ratios)
            row["repeats"] = len(ratios)
        out.append(row)
    return out


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:9.1f} ms" if seconds < 10 else f"{seconds:9.2f} s "


def format_table(result: dict) -> str:
    """The human-readable summary: machine, one line per measured candidate, ratios, targets."""
    m = result["machine"]
    lines = [f"vidmoe bench ({result['size']}): {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, "
             f"device {m['device']}, fast bf16: {'yes' if m['fast_bf16'] else 'no'}, precision {m['precision']}",
             f"median of {result['repeats']} interleaved repeats; load average {m['load_average']} at the start, "
             f"{m.get('load_average_end')} at the end", ""]
    s = result["sections"]

    def measured(name: str) -> bool:
        return name in s and "skipped" not in s[name]

    row = "{:<11} {:<34} {:>12}  {}".format
    lines.append(row("section", "candidate", "median", "notes"))
    if measured("moe_layer"):
        r = s["moe_layer"]
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        lines += [row("moe_layer", "sorted dispatch (auto)", _ms(r["grouped_s"]),
                      f"fwd+bwd, {shape}, {r['grouped_kernel']}"),
                  row("", "per-expert loop (dispatch=loop)", _ms(r["loop_s"]),
                      f"{r['loop_over_grouped']:.2f}x grouped"),
                  row("", "expert choice (batched experts)", _ms(r["expert_choice_s"]),
                      f"{r['expert_choice_over_dense_flops']:.2f}x dense FLOP-matched"),
                  row("", f"dense FLOP-matched (H={r['dense_hidden']['dense_flops']})", _ms(r["dense_flops_s"]),
                      f"grouped is {r['grouped_over_dense_flops']:.2f}x this"),
                  row("", f"dense param-matched (H={r['dense_hidden']['dense_params']})", _ms(r["dense_params_s"]), "")]
    if measured("model_step"):
        r = s["model_step"]
        for name, v in r["models"].items():
            lines.append(row("model_step" if name == "moe" else "", f"{name} (batch {r['batch_size']})",
                             _ms(v["step_s"]),
                             f"{v['clips_per_s']:.1f} clips/s, peak +{v['peak_memory_mb']:.0f} MB, "
                             f"{v['params_total'] / 1e6:.2f}M params ({v['params_active'] / 1e6:.2f}M active)"))
        lines.append(row("", "", "", f"moe/dense_flops {r['moe_over_dense_flops']:.2f}, "
                                     f"moe/dense_params {r['moe_over_dense_params']:.2f}, "
                                     f"moe_expert_choice/dense_flops {r['moe_expert_choice_over_dense_flops']:.2f}"))
    if measured("generation"):
        r = s["generation"]
        for name, v in r["models"].items():
            lines.append(row("generation" if name == "moe" else "", f"{name} step | clip ({r['clip_steps']} steps)",
                             _ms(v["step_s"]), f"whole clip {_ms(v['clip_s']).strip()}"))
    if measured("peer"):
        r = s["peer"]
        lines += [row("peer", "ours (MoE)", _ms(r["ours_s"]), f"{r['ours_params']['total'] / 1e6:.2f}M params"),
                  row("", "ours (dense_flops)", _ms(r["ours_dense_flops_s"]), ""),
                  row("", "ours (MoE, Latte's compute)", _ms(r["ours_latte_matched_s"]),
                      f"{r['ours_latte_matched_params']['total'] / 1e6:.2f}M params "
                      f"({r['ours_latte_matched_params']['active'] / 1e6:.2f}M active): "
                      + " ".join(r["ours_latte_matched_overrides"])),
                  row("", "ours (dense, Latte's compute)", _ms(r["ours_dense_latte_matched_s"]),
                      f"{r['ours_dense_latte_matched_over_latte']:.2f}x Latte: "
                      + " ".join(r["ours_dense_latte_matched_overrides"])),
                  row("", "... and no qk-norm", _ms(r["ours_dense_latte_matched_no_qk_norm_s"]),
                      f"{r['ours_dense_latte_matched_no_qk_norm_over_latte']:.2f}x Latte"),
                  row("", "... and no refining convolutions", _ms(r["ours_dense_latte_matched_no_qk_norm_no_refine_s"]),
                      f"{r['ours_dense_latte_matched_no_qk_norm_no_refine_over_latte']:.2f}x Latte"),
                  row("", "diffusers Latte", _ms(r["latte_s"]), f"{r['latte_params'] / 1e6:.2f}M params; "
                                                                 f"ours/Latte {r['ours_over_latte']:.2f}, "
                                                                 f"matched/Latte {r['ours_latte_matched_over_latte']:.2f}")]
    if measured("compile"):
        r = s["compile"]
        lines += [row("compile", f"moe eager (batch {r['batch_size']})", _ms(r["eager_s"]), ""),
                  row("", "moe, train.compile=true", _ms(r["compiled_s"]),
                      f"{r['compiled_over_eager']:.2f}x eager; first step {r['first_step_s']:.0f} s (compiling)"),
                  row("", "dense_flops, train.compile=true", _ms(r["dense_flops_compiled_s"]),
                      f"compiled MoE/dense_flops {r['compiled_moe_over_dense_flops']:.2f}")]
    if measured("data"):
        r = s["data"]
        train = r["train_clips_per_s"]
        lines += [row("data", "prepared cache", f"{r['cache_clips_per_s']:.0f} clips/s", ""),
                  row("", "decode video folder", f"{r['decode_clips_per_s']:.0f} clips/s", ""),
                  row("", "synthetic renderer", f"{r['synthetic_clips_per_s']:.0f} clips/s", ""),
                  row("", "training step consumes", "-" if train is None else f"{train:.1f} clips/s",
                      "" if train is None else f"cache is {r['cache_over_train']:.0f}x that")]
    lines += [row(name, "skipped", "-", section["skipped"]) for name, section in s.items() if "skipped" in section]
    lines += ["", "targets:"]
    for t in result["targets"]:
        value = "not measured" if t["measured"] is None else f"{t['measured']:.2f}"
        met = {None: "-", True: "met", False: "NOT met"}[t["met"]]
        goal = f" (goal {t['op']} {t['goal']}: {'met' if t.get('goal_met') else 'not met'})" if "goal_met" in t else ""
        spread = ""
        if "repeat_range" in t:
            low, high = t["repeat_range"]
            spread = f"; repeats {low:.2f}-{high:.2f}, met in {t['met_in_repeats']} of {t['repeats']}"
        lines.append(f"  {t['text']:<48} {value:>12}  {t['op']} {t['limit']:<5} {met}{goal}{spread}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry points


def _resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def run_bench(sections: Optional[list[str]] = None, size: str = "full", device: Optional[str] = None,
              repeats: Optional[int] = None, precision: str = "auto", out: Optional[str | Path] = None,
              progress: Callable[[str], None] = print) -> dict:
    """Run the chosen sections (all by default); returns the result that ``--out`` writes as JSON."""
    sections = list(sections or SECTIONS)
    known = SECTIONS + OPTIONAL_SECTIONS
    unknown = [s for s in sections if s not in known]
    if unknown:
        raise UsageError(f"unknown bench section '{unknown[0]}'; choose from {', '.join(known)}")
    if size not in SIZES:
        raise UsageError(f"--size must be one of {', '.join(SIZES)}")
    bench_size = SIZES[size]
    repeats = repeats or bench_size.repeats
    if repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if out is not None:
        if Path(out).is_dir():
            raise UsageError(f"--out {out} is a folder; give the JSON file to write, e.g. {Path(out) / 'bench.json'}")
        check_writable_dir(Path(out).parent, "--out")
    dev = _resolve_device(device)
    resolved = resolve_mixed_precision(precision, dev.type)
    result = {"size": size, "repeats": repeats, "warmup": bench_size.warmup, "sections_run": sections,
              "machine": describe_machine(dev, resolved), "sections": {}}
    runners = {"moe_layer": bench_moe_layer, "model_step": bench_model_step, "generation": bench_generation,
               "peer": bench_peer, "compile": bench_compile}
    ordered = [s for s in known if s in sections]
    for i, name in enumerate(ordered, 1):
        progress(f"[bench {i}/{len(ordered)}] {name} ...")
        started, load = time.monotonic(), _load_average()
        try:
            if name == "data":
                step = result["sections"].get("model_step", {}).get("models", {}).get("moe")
                section = bench_data(bench_size, dev, resolved, repeats, bench_size.warmup,
                                     step["clips_per_s"] if step else None)
            else:
                section = runners[name](bench_size, dev, resolved, repeats, bench_size.warmup)
        except UsageError as err:  # one section that cannot run here must not lose the others
            progress(f"[bench {i}/{len(ordered)}] {name} skipped: {err}")
            section = {"skipped": str(err)}
        section["wall_s"] = round(time.monotonic() - started, 2)
        section["load_average"] = {"start": load, "end": _load_average()}  # other work on the machine
        result["sections"][name] = section
        progress(f"[bench {i}/{len(ordered)}] {name} done in {section['wall_s']:.1f} s")
    result["targets"] = check_targets(result["sections"])
    result["machine"]["load_average_end"] = _load_average()
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--out", default="bench.json", help="JSON file to write (default: bench.json)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS + OPTIONAL_SECTIONS)} "
                             f"(default: all but {','.join(OPTIONAL_SECTIONS)})")
    parser.add_argument("--size", choices=tuple(SIZES), default="full",
                        help="full: the reported sizes; tiny: configs/tiny.yaml sizes, seconds (default: full)")
    parser.add_argument("--repeats", type=int, help="timed rounds per candidate (default: 5 full, 2 tiny)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "no"), default="auto",
                        help="auto: bf16 where the hardware makes it fast, else fp32 (default: auto)")


def main(args: argparse.Namespace) -> int:
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    result = run_bench(sections, size=args.size, device=args.device, repeats=args.repeats,
                       precision=args.precision, out=args.out,
                       progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return 0
