"""Rectified flow: the training loss, timestep sampling, and sampling with classifier-free guidance.

Convention (the model's): x_t = (1 - t) * x0 + t * noise with t in [0, 1], t = 1 pure noise; the
model predicts the velocity v = dx_t/dt = noise - x0. diffusers' flow-matching schedulers use the
same path with sigma = t, but label their steps ``timesteps = sigma * num_train_timesteps``; the
sampling loop divides by ``num_train_timesteps`` before calling the model.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .config import ConfigError
from .errors import UsageError

# Short names for the flow schedulers a user is likely to want; any diffusers scheduler class
# name is accepted as well.
SCHEDULER_ALIASES = {
    "euler": "FlowMatchEulerDiscreteScheduler",
    # Each step jumps to the x0 estimate and re-noises it with fresh noise to the next level
    # (diffusers' stochastic_sampling). It forgets the errors of earlier steps instead of
    # integrating them: an undertrained model's objects come out whole instead of in fragments.
    "euler-stochastic": "FlowMatchEulerDiscreteScheduler",
    "heun": "FlowMatchHeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# Settings an alias implies, over those of a saved scheduler config.
SCHEDULER_SETTINGS = {"euler": {"stochastic_sampling": False}, "euler-stochastic": {"stochastic_sampling": True}}
DEFAULT_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


def sample_timesteps(n: int, mean: float = 0.0, std: float = 1.0, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Logit-normal timesteps [n] in (0, 1) (SD3): sigmoid of a normal draw, mid noise levels favoured."""
    draw_device = generator.device if generator is not None else device
    t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=draw_device))
    return t if device is None else t.to(device)


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t [B] broadcast over the other dimensions."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def flow_loss(model: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
              labels: Optional[torch.Tensor] = None, captions: Optional[Sequence[str]] = None,
              source: Optional[torch.Tensor] = None):
    """Velocity-matching loss per sample [B] (mean over C, T, H, W, times the output's loss_weight) and the
    model's output.

    ``source`` (default ``x0``) is the clip that is noised; the target is still the velocity
    (x_t - x0) / t that leads from x_t to ``x0``. With x_t = (1 - t) source + t noise that is
    noise - x0 + (1 - t) / t (source - x0): a model that predicts x0 must undo the difference.
    """
    x_t = add_noise(x0 if source is None else source, t, noise)
    out = model(x_t, t, labels=labels, captions=captions)
    target = noise - x0
    if source is not None:
        shape = (-1, *([1] * (x0.dim() - 1)))
        target = target + ((1 - t) / t).view(shape).to(x0.dtype) * (source - x0)
    per_sample = F.mse_loss(out.sample.float(), target.float(), reduction="none").flatten(1).mean(1)
    weight = getattr(out, "loss_weight", None)
    return (per_sample if weight is None else per_sample * weight), out


def gaussian_blur_frames(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each clip of [B, C, T, H, W] blurred frame by frame by a Gaussian of its own ``sigma`` [B] pixels.

    The kernel spans 3 sigma (at least 3 taps); borders are reflected, so a flat frame stays flat.
    """
    b, c, t, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / sigma.float().to(x.device)[:, None]) ** 2)  # [B, K]
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.dtype)
    # One depthwise pass per axis; every (clip, channel, frame) is a channel of the convolution.
    planes = rearrange(x, "b c t h w -> 1 (b c t) h w")
    weights = kernel.repeat_interleave(c * t, dim=0)  # [B*C*T, K]
    planes = F.pad(planes, (radius, radius, radius, radius), mode="reflect")
    planes = F.conv2d(planes, weights[:, None, None, :], groups=b * c * t)  # along W
    planes = F.conv2d(planes, weights[:, None, :, None], groups=b * c * t)  # along H
    return rearrange(planes, "1 (b c t) h w -> b c t h w", b=b, c=c)


def scheduler_class(name: Optional[str] = None):
    """The diffusers scheduler class for a name: an alias above or a diffusers class name."""
    import diffusers

    name = name or DEFAULT_SCHEDULER
    class_name = SCHEDULER_ALIASES.get(name.lower(), name)
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise UsageError(f"unknown scheduler '{name}'; use one of {', '.join(SCHEDULER_ALIASES)} or a diffusers "
                         f"flow scheduler class name such as {DEFAULT_SCHEDULER}")
    return cls


def make_scheduler(name: Optional[str] = None, config: Optional[dict] = None, shift: Optional[float] = None):
    """A flow-matching scheduler by name, from a saved scheduler config when one is given.

    ``shift`` replaces the config's timestep shift (default: the config's, else 1).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls = scheduler_class(name)
    base = dict(config) if config else dict(FlowMatchEulerDiscreteScheduler().config)
    if shift is not None:
        base["shift"] = shift
    base.update(SCHEDULER_SETTINGS.get((name or "").lower(), {}))
    init_keys = inspect.signature(cls.__init__).parameters
    if "use_flow_sigmas" in init_keys:
        # Multistep solvers (DPM-Solver++, UniPC) follow the flow path only when told to.
        base.update(use_flow_sigmas=True, prediction_type="flow_prediction",
                    flow_shift=base.get("shift", 1.0), final_sigmas_type="zero")
    elif "FlowMatch" not in cls.__name__:
        raise UsageError(f"scheduler '{name}' is not a flow-matching scheduler; use one of "
                         f"{', '.join(SCHEDULER_ALIASES)} or a FlowMatch* class name")
    return cls.from_config({k: v for k, v in base.items() if k in init_keys})


def guided_velocity(model: Callable, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor],
                    captions: Optional[Sequence[str]], guidance: float,
                    estimates: Optional[dict] = None) -> torch.Tensor:
    """The velocity at (x, t), with classifier-free guidance from one batched forward pass.

    ``estimates`` (for a self-conditioned model): the previous call's x0 estimates, "cond" and "uncond"
    (each [B, ...]; a missing one is zeros), given to the model and replaced by this call's.
    """
    b = x.shape[0]
    self_cond = {}
    if estimates is not None:
        previous = [estimates.get(branch, torch.zeros_like(x)) for branch in ("cond", "uncond")]
        self_cond = {"self_cond": previous[0] if guidance == 1.0 else torch.cat(previous)}
    if guidance == 1.0:
        out = model(x, t, labels=labels, captions=captions, **self_cond)
        if estimates is not None:
            estimates["cond"] = out.x0.float()
        return out.sample.float()
    drop = torch.tensor([False] * b + [True] * b, device=x.device)
    out = model(torch.cat([x, x]), torch.cat([t, t]),
                labels=None if labels is None else torch.cat([labels, labels]),
                captions=None if captions is None else list(captions) * 2, drop=drop, **self_cond)
    if estimates is not None:
        estimates["cond"], estimates["uncond"] = out.x0.float().split(b)
    v = out.sample.float()
    cond, uncond = v[:b], v[b:]
    return uncond + guidance * (cond - uncond)


def self_conditioned(model: Any) -> bool:
    """Whether ``model`` (a VidMoETransformer, or a wrapper of one) takes its previous x0 estimate."""
    cfg = getattr(getattr(model, "module", model), "cfg", None)
    return bool(getattr(cfg, "self_condition", False))


def _module_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def sample(model: Callable, shape: Sequence[int], labels: Optional[torch.Tensor] = None,
           captions: Optional[Sequence[str]] = None, steps: int = 30, guidance: float = 3.0,
           scheduler_name: Optional[str] = None, generator: Optional[torch.Generator] = None, *,
           noise: Optional[torch.Tensor] = None, scheduler_config: Optional[dict] = None, shift: Optional[float] = None,
           guidance_min_t: float = 0.0, device: Optional[torch.device | str] = None,
           init: Optional[torch.Tensor] = None, start_t: float = 1.0) -> torch.Tensor:
    """Integrate the flow from noise (t = 1) to data (t = 0); returns x0 float [B, C, T, H, W].

    ``shift`` replaces the schedule's timestep shift (that of ``scheduler_config``, else 1).
    ``guidance`` applies at t >= ``guidance_min_t`` only; below it the conditional velocity is used alone
    (a guidance interval: guidance settles the layout at high noise, and left on at low noise it
    breaks hard edges into fragments).
    ``generator`` also draws a stochastic scheduler's noise; a list of generators, one per clip,
    makes each clip's draws independent of the others in the batch.
    ``noise`` overrides the draw from ``generator`` (drawn on the generator's device, then moved,
    so a CPU generator gives the same clips on any device).
    ``init`` (clean clips, the shape of the noise) with ``start_t`` < 1: start from them noised to the
    first level t0 <= start_t at which a step of the schedule starts, (1 - t0) init + t0 noise, and skip the
    steps before it (what the sampler keeps of a given layout: scripts/count_from_noise.py).
    """
    device = torch.device(device) if device is not None else _module_device(model)
    if noise is None:
        if isinstance(generator, list):
            raise ValueError("pass noise when generator is a list")
        noise = torch.randn(tuple(shape), generator=generator,
                            device=generator.device if generator is not None else "cpu")
    x = noise.to(device=device, dtype=torch.float32)
    if labels is not None:
        labels = labels.to(device)
    scheduler = make_scheduler(scheduler_name, scheduler_config, shift)
    scheduler.set_timesteps(steps, device=device)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    # The model's t is the scheduler's sigma. Multistep solvers round their timestep labels to
    # integers, so read sigma itself where the schedule lists one per timestep (plus the final 0).
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        noise_levels = sigmas[:-1]
    else:
        noise_levels = scheduler.timesteps / float(scheduler.config.num_train_timesteps)
    # A second-order scheduler (Heun) lists `order` levels per step: a start may only fall on a step's first.
    order = getattr(scheduler, "order", 1)
    begin = next((i for i in range(0, len(noise_levels), order) if float(noise_levels[i]) <= start_t + 1e-6),
                 len(noise_levels))
    if init is not None:
        if begin == len(noise_levels):
            raise ValueError(f"start_t={start_t} is below every noise level of the schedule")
        t0 = float(noise_levels[begin])
        x = (1 - t0) * init.to(device=device, dtype=torch.float32) + t0 * x
    if begin and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)  # else the scheduler finds its place from the first timestep it is given
    estimates = {} if self_conditioned(model) else None  # each step's x0 estimates, fed to the next
    for timestep, level in zip(scheduler.timesteps[begin:], noise_levels[begin:]):
        t = level.to(device=device, dtype=torch.float32).expand(x.shape[0])
        v = guided_velocity(model, x, t, labels, captions, guidance if float(level) >= guidance_min_t else 1.0,
                            estimates)
        x = scheduler.step(v, timestep, x, return_dict=False, **step_kwargs)[0]
    return x


def to_uint8_frames(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1], [B, C, T, H, W] -> uint8 [B, T, H, W, C]."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous()  # [B, C, T, H, W] -> [B, T, H, W, C]


# Latent space: a frozen diffusers AutoencoderKL applied frame by frame.


def load_vae(model_cfg, device: torch.device | str = "cpu"):
    """The frozen AutoencoderKL of a latent-space model, checked against the config."""
    from diffusers import AutoencoderKL

    path = Path(model_cfg.vae)
    if not path.is_dir():
        raise ConfigError(f"model.vae: {path} is not a folder holding a diffusers AutoencoderKL")
    try:
        vae = AutoencoderKL.from_pretrained(path)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ConfigError(f"model.vae: cannot load an AutoencoderKL from {path}: {str(err).splitlines()[0]}") from None
    check_vae(vae, model_cfg)
    return vae.to(device).eval().requires_grad_(False)


def check_vae(vae, model_cfg) -> None:
    """ConfigError unless the VAE's channels and downsampling are those the config sizes the model for."""
    channels = vae.config.latent_channels
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if channels != model_cfg.vae_channels or scale != model_cfg.vae_scale:
        raise ConfigError(f"model.vae has {channels} latent channels and downsamples {scale}x, but the config says "
                          f"model.vae_channels={model_cfg.vae_channels}, model.vae_scale={model_cfg.vae_scale}; "
                          "set them to match the VAE")
    if vae.config.in_channels != model_cfg.in_channels:
        raise ConfigError(f"model.vae takes {vae.config.in_channels}-channel frames but model.in_channels="
                          f"{model_cfg.in_channels}")


@torch.no_grad()
def vae_encode(vae, video: torch.Tensor) -> torch.Tensor:
    """Pixels [B, C, T, H, W] in [-1, 1] -> scaled latents [B, c, T, h, w], one frame at a time."""
    b, _, t = video.shape[:3]
    frames = video.transpose(1, 2).flatten(0, 1).to(vae.dtype)  # [B, C, T, H, W] -> [B*T, C, H, W]
    z = vae.encode(frames).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = (z - shift) * vae.config.scaling_factor
    return z.unflatten(0, (b, t)).transpose(1, 2).float()  # [B*T, c, h, w] -> [B, c, T, h, w]


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, c, T, h, w] -> pixels [B, C, T, H, W] in about [-1, 1]."""
    b, _, t = latents.shape[:3]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.transpose(1, 2).flatten(0, 1) / vae.config.scaling_factor + shift  # -> [B*T, c, h, w]
    frames = vae.decode(z.to(vae.dtype)).sample
    return frames.unflatten(0, (b, t)).transpose(1, 2).float()  # [B*T, C, H, W] -> [B, C, T, H, W]
