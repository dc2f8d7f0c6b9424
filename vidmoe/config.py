"""Configuration: one dataclass per section, YAML files, dotted command-line overrides.

Every module takes the section it needs (``cfg.model``, ``cfg.data``, ...). Values are checked
when a config is built, so a typo or an impossible combination fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration that cannot be used; the message is one line that says why."""


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward options (see DESIGN.md section 2)."""

    num_experts: int = 8
    top_k: int = 2
    router: str = "token_choice"  # token_choice | expert_choice
    renormalize: bool = True  # rescale the top-K gates to sum to 1
    jitter: float = 0.0  # multiplicative noise on router inputs in training (Switch)
    balance: str = "aux_loss"  # aux_loss | bias | none
    aux_loss_coef: float = 0.01
    bias_update_rate: float = 0.001  # aux-loss-free balancing step size
    z_loss_coef: float = 0.001
    capacity_factor: Optional[float] = None  # None: dropless
    num_shared_experts: int = 0
    expert_pool: str = "split"  # split | shared
    expert_hidden: Optional[int] = None  # H per expert; None: the model's ffn_hidden
    dispatch: str = "auto"  # auto | grouped | loop


@dataclass
class ModelConfig:
    """The transformer: sizes, conditioning and feed-forward kind."""

    in_channels: int = 3
    num_frames: int = 16
    sample_size: Union[int, list[int]] = 32  # int or [H, W]
    patch_size: int = 4
    temporal_patch_size: int = 1
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    ffn: str = "moe"  # moe | dense
    ffn_hidden: int = 256  # hidden width of one expert (moe) or of the dense FFN
    dense_match: Optional[str] = None  # flops | params: size a dense FFN from the moe section
    num_classes: int = 0  # 0: no class conditioning
    text: bool = True  # built-in text encoder over a word vocabulary
    text_encoder: Optional[str] = None  # local transformers encoder folder instead
    text_max_length: int = 16
    text_layers: int = 1
    vocab: list[str] = field(default_factory=list)  # filled from the data when empty
    cond_dropout: float = 0.1  # probability of dropping class and text in training
    # Self-conditioning (Chen et al. 2022, "Analog Bits"): the network also sees an earlier x0 estimate
    # of the same clip (zeros when there is none). In sampling that is the previous step's estimate; in
    # training, with probability self_condition_prob a batch is first denoised without one (no gradient)
    # and that estimate is fed back, so the sampler's later steps can keep the layout its earlier ones chose.
    self_condition: bool = False
    self_condition_prob: float = 0.5
    cross_attention: str = "both"  # sub-blocks that attend to the text: both | spatial (as Latte)
    vae: Optional[str] = None  # local diffusers AutoencoderKL folder: train in latent space
    vae_channels: int = 4  # latent channels of that VAE
    vae_scale: int = 8  # its spatial downsampling factor
    qk_norm: bool = True
    # What the output layer predicts. x0: the clean clip, turned into the velocity the rest of
    # the code expects as (x_t - x0) / t. velocity: the velocity itself. In pixel space a token
    # holds more values than the width can carry (4x4x2x3 = 96 here), and a velocity model must
    # copy the noise through: its clips come out as speckle (Li & He 2025, "Back to Basics").
    # edm: the preconditioning of Karras et al. 2022 ("Elucidating the Design Space"), written for
    # the flow x_t = (1 - t) x0 + t noise: x0 = c_skip(t) x_t + c_out(t) F(c_in(t) x_t), so near
    # t = 0 the clip passes through a skip connection instead of through the network, near t = 1
    # it is an x0 head, and F's target has unit variance at every t.
    prediction: str = "x0"
    sigma_data: float = 0.5  # edm: root mean square of the training pixels (or latents)
    # x0 head: hidden channels of small per-frame convolutions that correct the token head's x0 at
    # full resolution from it, the noisy input and t (model.PixelRefiner); 0 leaves them out.
    refine_channels: int = 0
    # How an x0 head's estimate becomes a velocity below t = 0.05 (model.MIN_VELOCITY_T). clamped: as if t
    # were 0.05, which bounds the velocity and the loss weight 1/t^2 it implies, but leaves the target
    # noise - x0 unclamped: the head learns a shifted x0 there and part of that loss cannot be learnt
    # (what every model before session 32 was trained with). exact: the velocity (x_t - x0) / t, and the
    # training loss weighs the x0 error there by at most 1 / 0.05^2 (the output's loss_weight).
    x0_velocity: str = "clamped"
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def frame_size(self) -> tuple[int, int]:
        s = self.sample_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def latent_channels(self) -> int:
        """Channels the transformer sees: the VAE's latents, or the pixels."""
        return self.vae_channels if self.vae else self.in_channels

    @property
    def latent_size(self) -> tuple[int, int]:
        """Frame size the transformer sees."""
        f = self.vae_scale if self.vae else 1
        h, w = self.frame_size
        return h // f, w // f


@dataclass
class DataConfig:
    """Where clips come from and how they are cut."""

    source: str = "synthetic:bouncing_shapes"  # synthetic:NAME, a video folder, or a prepared cache
    eval_source: Optional[str] = None  # None: a held-out split of source (other seeds for synthetic)
    num_clips: int = 4096  # synthetic clips per epoch
    eval_clips: int = 256  # synthetic clips in the eval split
    eval_fraction: float = 0.1  # video folders: share of files held out for eval when eval_source is null
    frame_stride: int = 1
    fps: Optional[float] = None  # resample real video to this rate instead of frame_stride
    min_objects: int = 1
    max_objects: int = 3
    # Relative weights of min_objects..max_objects objects in a training clip (null: uniform). Held-out
    # clips stay uniform, so held-out loss and eval prompts do not depend on it.
    object_count_weights: Optional[list[float]] = None
    object_size: list[int] = field(default_factory=lambda: [6, 10])  # pixels at 32x32
    speed: list[float] = field(default_factory=lambda: [0.5, 1.5])  # pixels per frame at 32x32
    num_workers: int = 0
    decode_timeout: float = 30.0  # seconds one file may take to decode
    crop: str = "center"  # center | random: training crop of video files (eval and caches: center)
    seed: int = 0


@dataclass
class TrainConfig:
    """The optimisation loop, checkpoints and logging."""

    output_dir: str = "runs/default"
    # An exported model folder (runs/NAME/model, samples/bouncing-moe) to start from instead of
    # fresh weights: fine-tuning. Its model section must build the same network.
    init_from: Optional[str] = None
    max_steps: int = 1000
    time_budget_minutes: Optional[float] = None  # stop early at this wall time
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    # adamw, or muon: Muon for the hidden matrices (attention, experts, adaLN), AdamW for the rest, both
    # at train.lr (vidmoe/optim.py).
    optimizer: str = "adamw"
    # Any diffusers get_scheduler name, or warmup_stable_decay: warmup, constant, then a linear fall
    # to zero over the last decay_fraction of the run, measured in steps (max_steps) or, when it
    # ends first, in wall time (time_budget_minutes), so a budgeted run ends decayed.
    lr_schedule: str = "cosine"
    decay_fraction: float = 0.2
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    # What model/ holds at the end: the EMA of the weights (ema) or the weights themselves (raw).
    # Snapshots and sample gifs along the run always use the EMA. After a learning rate that falls to
    # zero (warmup_stable_decay), raw weights need no averaging and the EMA still carries weights
    # from before the fall.
    export_weights: str = "ema"
    mixed_precision: str = "auto"  # auto (bf16 where the hardware makes it fast) | bf16 | fp16 | no
    timestep_mean: float = 0.0  # logit-normal timestep sampling
    timestep_std: float = 1.0
    # A share of the batch drawn uniformly in (0, low_timestep_max) instead: logit-normal(1.2, 1.4)
    # alone trains below t = 0.1 under 1% of the time, and there the edges of the clip are drawn.
    low_timestep_fraction: float = 0.0
    low_timestep_max: float = 0.3
    # Soft-edge training: with probability blur_prob, a clip drawn at 0.05 <= t < blur_max_t is noised
    # from a copy blurred by a Gaussian of sigma in blur_sigma pixels (each frame), and the target is
    # still the sharp clip, so at low noise the model learns to turn soft rims back into hard edges.
    blur_prob: float = 0.0
    blur_max_t: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.3, 1.0])
    # The share of the run (0..1 of max_steps or of the time budget, as for decay_fraction) after which
    # the two options above apply: 0.8 keeps the full logit-normal for the first 80%, where the layout
    # is learnt, and trains the low-noise end during the learning-rate decay.
    low_noise_from: float = 0.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0: never
    snapshot_every: int = 0  # export the EMA model to snapshots/step-N every N steps (0: never)
    log_every: int = 10
    compile: bool = False
    max_bad_steps: int = 10  # consecutive non-finite steps before giving up
    seed: int = 0


@dataclass
class SampleConfig:
    """Generation defaults."""

    steps: int = 30
    guidance: float = 3.0
    scheduler: str = "FlowMatchEulerDiscreteScheduler"
    # Timestep shift s of the sampling schedule: t -> s t / (1 + (s - 1) t) spends more of the
    # steps near t = 1, where a clip's layout is decided. Saved with the exported model.
    shift: float = 1.0
    # Guidance only at t >= guidance_min_t (0: at every step); below it the conditional velocity alone.
    guidance_min_t: float = 0.0
    num_videos: int = 8
    fps: int = 8
    format: str = "mp4"  # mp4 | gif | webm | png
    seed: int = 0


@dataclass
class Config:
    """A whole run: model, data, training and sampling."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


_CHOICES = {
    ("moe", "router"): ("token_choice", "expert_choice"),
    ("moe", "balance"): ("aux_loss", "bias", "none"),
    ("moe", "expert_pool"): ("split", "shared"),
    ("moe", "dispatch"): ("auto", "grouped", "loop"),
    ("model", "ffn"): ("moe", "dense"),
    ("model", "dense_match"): (None, "flops", "params"),
    ("model", "prediction"): ("x0", "velocity", "edm"),
    ("model", "x0_velocity"): ("clamped", "exact"),
    ("model", "cross_attention"): ("both", "spatial"),
    ("train", "mixed_precision"): ("auto", "bf16", "fp16", "no"),
    ("train", "optimizer"): ("adamw", "muon"),
    ("sample", "format"): ("mp4", "gif", "webm", "png"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


class _Override(str):
    """A command-line value, kept as typed: a string field takes it verbatim (YAML would read `no` as false)."""

    def parse(self) -> Any:
        try:
            return yaml.safe_load(self) if self.strip() else None
        except (yaml.YAMLError, ValueError):  # ValueError: an integer longer than Python converts
            return str(self)


def _accepts_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    if isinstance(value, _Override):
        parsed = value.parse()
        keep_text = _accepts_str(tp) and parsed is not None and not isinstance(parsed, str)
        value = str(value) if keep_text else parsed
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):  # YAML 1.1 reads 3e-4 as a string
            try:
                number = float(value)
            except (ValueError, OverflowError):
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        hint = " (YAML reads yes/no/on/off as booleans: quote it, e.g. \"no\")" if isinstance(value, bool) else ""
        raise ConfigError(f"{where}: expected a string, got {value!r}{hint}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may also be numbers or null
    if unknown:
        raise ConfigError(
            f"unknown config key '{_join(where, unknown[0])}' (known keys: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name in names & set(data):
        tp = hints[name]
        key = _join(where, name)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from plain data (as read from YAML)."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), _Override(raw)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys (``model.moe.top_k=1``) in a nested dict; values are parsed as YAML."""
    for text in overrides or []:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a YAML file (not UTF-8 text)") from None
        try:
            data = yaml.safe_load(text) or {}
        except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer longer than Python converts
            raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(data, list(overrides or [])))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Raise ConfigError for combinations that cannot work."""
    sections = {"model": cfg.model, "moe": cfg.model.moe, "data": cfg.data, "train": cfg.train,
                "sample": cfg.sample}
    for (section, key), allowed in _CHOICES.items():
        value = getattr(sections[section], key)
        prefix = "model.moe" if section == "moe" else section
        _check(value in allowed, f"{prefix}.{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    m, moe = cfg.model, cfg.model.moe
    # positive first: the divisibility checks below divide by these
    for name in ("depth", "num_heads", "hidden_size", "ffn_hidden", "in_channels", "patch_size", "temporal_patch_size",
                 "vae_scale", "sigma_data"):
        _check(getattr(m, name) > 0, f"model.{name} must be positive")
    if isinstance(m.sample_size, list):
        _check(len(m.sample_size) == 2, f"model.sample_size must be an int or [H, W]; got {m.sample_size}")
    h, w = m.frame_size
    vae_factor = m.vae_scale if m.vae else 1
    for name, size in (("height", h), ("width", w)):
        _check(size > 0 and (size // vae_factor) % m.patch_size == 0 and size % vae_factor == 0,
               f"model.sample_size {name} {size} is not divisible by model.patch_size={m.patch_size}"
               + (f" after the VAE's {m.vae_scale}x downsampling" if m.vae else ""))
    _check(m.num_frames > 0 and m.num_frames % m.temporal_patch_size == 0,
           f"model.num_frames={m.num_frames} is not divisible by model.temporal_patch_size={m.temporal_patch_size}")
    _check(m.hidden_size % m.num_heads == 0,
           f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    _check((m.hidden_size // m.num_heads) % 2 == 0, "model.hidden_size / model.num_heads must be even")
    _check(m.hidden_size % 4 == 0, "model.hidden_size must be divisible by 4 (sin-cos positions)")
    _check(0.0 <= m.cond_dropout < 1.0, "model.cond_dropout must be in [0, 1)")
    _check(m.num_classes >= 0, "model.num_classes must be >= 0")
    _check(moe.num_experts >= 1, "model.moe.num_experts must be at least 1")
    _check(1 <= moe.top_k <= moe.num_experts,
           f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}")
    _check(moe.capacity_factor is None or moe.capacity_factor > 0, "model.moe.capacity_factor must be > 0 or null")
    _check(moe.num_shared_experts >= 0, "model.moe.num_shared_experts must be >= 0")
    _check(moe.jitter >= 0, "model.moe.jitter must be >= 0")
    _check(moe.expert_hidden is None or moe.expert_hidden > 0, "model.moe.expert_hidden must be positive")
    _check(m.refine_channels >= 0, "model.refine_channels must be >= 0")
    _check(0.0 <= m.self_condition_prob <= 1.0, "model.self_condition_prob must be in [0, 1]")
    _check(m.refine_channels == 0 or m.prediction == "x0", "model.refine_channels needs model.prediction=x0")
    _check(m.x0_velocity == "clamped" or m.prediction == "x0", "model.x0_velocity=exact needs model.prediction=x0")
    _check(m.ffn == "dense" or m.dense_match is None, "model.dense_match only applies when model.ffn=dense")
    d = cfg.data
    _check(1 <= d.min_objects <= d.max_objects <= 3,
           "data.min_objects and data.max_objects must satisfy 1 <= min_objects <= max_objects <= 3")
    w = d.object_count_weights
    _check(w is None or (len(w) == d.max_objects - d.min_objects + 1 and min(w) >= 0 and sum(w) > 0),
           "data.object_count_weights must give one weight >= 0 per count from min_objects to max_objects, "
           "not all zero")
    _check(len(d.object_size) == 2 and 0 < d.object_size[0] <= d.object_size[1],
           "data.object_size must be [min, max] pixels")
    _check(len(d.speed) == 2 and 0 <= d.speed[0] <= d.speed[1], "data.speed must be [min, max] pixels per frame")
    _check(d.frame_stride >= 1, "data.frame_stride must be >= 1")
    _check(d.fps is None or d.fps > 0, "data.fps must be > 0 or null")
    _check(d.num_workers >= 0, "data.num_workers must be >= 0")
    _check(d.num_clips >= 1 and d.eval_clips >= 1, "data.num_clips and data.eval_clips must be >= 1")
    _check(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)")
    _check(d.decode_timeout > 0, "data.decode_timeout must be > 0 seconds")
    _check(d.crop in ("center", "random"), f"data.crop must be one of center, random; got {d.crop!r}")
    _check(d.seed >= 0, "data.seed must be >= 0")
    t = cfg.train
    for name in ("max_steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every", "max_bad_steps"):
        _check(getattr(t, name) > 0, f"train.{name} must be positive")
    for name in ("checkpoint_every", "sample_every", "snapshot_every", "warmup_steps"):
        _check(getattr(t, name) >= 0, f"train.{name} must be >= 0")
    _check(t.lr > 0, "train.lr must be positive")
    _check(0.0 <= t.low_timestep_fraction <= 1.0, "train.low_timestep_fraction must be in [0, 1]")
    _check(0.0 < t.low_timestep_max <= 1.0, "train.low_timestep_max must be in (0, 1]")
    _check(0.0 <= t.blur_prob <= 1.0, "train.blur_prob must be in [0, 1]")
    _check(0.0 <= t.low_noise_from < 1.0, "train.low_noise_from must be in [0, 1)")
    _check(0.0 < t.blur_max_t <= 1.0, "train.blur_max_t must be in (0, 1]")
    _check(len(t.blur_sigma) == 2 and 0 < t.blur_sigma[0] <= t.blur_sigma[1],
           "train.blur_sigma must be [min, max] pixels")
    _check(t.blur_prob == 0 or not cfg.model.vae, "train.blur_prob needs a pixel-space model (model.vae is set)")
    _check(0.0 < t.decay_fraction <= 1.0, "train.decay_fraction must be in (0, 1]")
    _check(cfg.sample.shift > 0, "sample.shift must be > 0")
    _check(0.0 <= cfg.sample.guidance_min_t < 1.0, "sample.guidance_min_t must be in [0, 1)")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay must be in [0, 1)")
    _check(t.export_weights in ("ema", "raw"), f"train.export_weights must be ema or raw, not {t.export_weights!r}")
    _check(len(t.betas) == 2, "train.betas must be [beta1, beta2]")
    s = cfg.sample
    _check(s.steps >= 1 and s.num_videos >= 1 and s.fps >= 1, "sample.steps, num_videos and fps must be >= 1")
