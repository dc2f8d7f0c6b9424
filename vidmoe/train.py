"""Training: rectified flow through Accelerate, with atomic checkpoints, exact resume and a final export.

A run folder (``train.output_dir``) holds:
    checkpoint-STEP/   Accelerate state (model, optimizer, LR schedule, EMA, RNG) + trainer_state.json
                       + the resolved config; COMPLETE is written last, and the folder only appears
                       under this name by an atomic rename of .tmp-checkpoint-STEP
    model/             the export: EMA weights (save_pretrained), vidmoe_config.yaml, scheduler/, vae/
    log.jsonl          one line per log step: step, wall seconds, loss, lr, ...
    tensorboard/       the same numbers plus per-layer expert load, for TensorBoard
    samples/           a gif grid every train.sample_every steps

Data order is a function of (data.seed, epoch), so resuming skips the consumed batches by index
without decoding them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, broadcast, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .config import Config, ConfigError, config_to_dict, load_config, save_config
from .diffusion import flow_loss, gaussian_blur_frames, load_vae, make_scheduler, sample, sample_timesteps, \
    to_uint8_frames, vae_decode, vae_encode
from .errors import DataError, UsageError, check_writable_dir
from .generate import EXAMPLE_CONDITIONS_FILE, example_conditions
from .model import MIN_VELOCITY_T, build_model
from .optim import MuonAdamW, weight_decay_groups
from .precision import resolve_mixed_precision

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "vidmoe_config.yaml"
# Set to 1 to have every process write a checksum of its parameters at the end (tests compare them).
RANK_CHECKSUM_ENV = "VIDMOE_RANK_CHECKSUMS"
# Test hook: seconds to wait inside the temporary checkpoint folder before publishing it, so a test
# can kill the process while a checkpoint write is in progress.
CHECKPOINT_DELAY_ENV = "VIDMOE_TEST_CHECKPOINT_DELAY"


class TrainingDiverged(RuntimeError):
    """Training stopped: train.max_bad_steps steps in a row had a non-finite loss or gradient."""


# ----------------------------------------------------------------------------- data order


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for one epoch's shuffle."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def fused_adamw(device: torch.device) -> bool:
    """Whether AdamW should run its fused kernel: on a CPU it updated bouncing_small's 6.5M parameters in
    6.4 ms against 20 ms for torch's default per-tensor loop (18.8 ms foreach)."""
    return device.type in ("cpu", "cuda")


def batches_per_epoch(num_items: int, batch_size: int, num_processes: int) -> int:
    """Global batches in one epoch; the last incomplete one is dropped so every rank gets equal work."""
    return num_items // (batch_size * num_processes)


class EpochBatchSampler(Sampler):
    """One process's batches of one epoch: a permutation fixed by (seed, epoch), cut into global batches.

    Global batch i is ``perm[i*G:(i+1)*G]`` with G = batch_size * num_processes; rank r takes its
    slice ``[r*batch_size:(r+1)*batch_size]``. ``start`` skips the first batches by index.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, num_processes: int = 1):
        self.num_items, self.batch_size, self.seed, self.epoch = num_items, batch_size, seed, epoch
        self.start, self.rank, self.num_processes = start, rank, num_processes
        self.num_batches = batches_per_epoch(num_items, batch_size, num_processes)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(self.num_items, generator=generator)
        global_batch = self.batch_size * self.num_processes
        for i in range(self.start, self.num_batches):
            first = i * global_batch + self.rank * self.batch_size
            yield perm[first:first + self.batch_size].tolist()


# ----------------------------------------------------------------------------- checkpoints


SNAPSHOT_DIR = "snapshots"
WSD_SCHEDULE = "warmup_stable_decay"


def checkpoint_step(path: Path) -> Optional[int]:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    suffix = name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if suffix.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """Complete checkpoints sorted by step, and folders that look like checkpoints but are not complete."""
    output_dir = Path(output_dir)
    complete, incomplete = [], []
    if not output_dir.is_dir():
        return complete, incomplete
    for path in sorted(output_dir.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(TMP_PREFIX + CHECKPOINT_PREFIX):
            incomplete.append(path)
            continue
        step = checkpoint_step(path)
        if step is None:
            continue
        if (path / COMPLETE_MARKER).is_file() and (path / STATE_FILE).is_file():
            complete.append((step, path))
        else:
            incomplete.append(path)
    complete.sort()
    return complete, incomplete


def find_checkpoint(output_dir: str | Path, resume: Optional[str], report=print) -> Optional[Path]:
    """The checkpoint to resume from: ``latest`` (or None if there is none), or a given folder."""
    if resume is None:
        return None
    complete, incomplete = list_checkpoints(output_dir)
    for path in incomplete:
        report(f"ignoring {path}: incomplete checkpoint (no {COMPLETE_MARKER} marker; "
               "its save was probably interrupted)")
    if resume == "latest":
        if not complete:
            report(f"no complete checkpoint in {output_dir}; starting from step 0")
            return None
        return complete[-1][1]
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file() or not (path / STATE_FILE).is_file():
        raise UsageError(f"{path} is not a complete checkpoint folder (expected {COMPLETE_MARKER} and {STATE_FILE} "
                         "in it); pass --resume latest or a checkpoint-STEP folder of a run")
    return path


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so a rename after it publishes only whole files."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_dir(path: Path) -> None:
    """Delete a folder so that an interruption never leaves a half-deleted folder under its real name."""
    if not path.exists():
        return
    doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def publish_dir(tmp: Path, final: Path) -> None:
    """Put a finished folder in place by renames: fsync it, move an old ``final`` aside, rename, delete the old."""
    fsync_tree(tmp)
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


# ----------------------------------------------------------------------------- helpers


def model_inputs(batch: dict, model_cfg, device: torch.device, vae=None):
    """A collated batch -> (x0 [B, C, T, H, W] in the model's space, labels or None, captions or None)."""
    x0 = batch["video"].to(device, non_blocking=True)
    if vae is not None:
        x0 = vae_encode(vae, x0)
    labels = batch["label"].to(device).long() if model_cfg.num_classes > 0 else None
    captions = list(batch["caption"]) if model_cfg.text or model_cfg.text_encoder else None
    return x0, labels, captions


def load_initial_weights(model: torch.nn.Module, path: str) -> None:
    """Copy the weights of an exported model folder into ``model`` (train.init_from).

    ModelFolderError if ``path`` is not a model folder, ConfigError if its weights do not fit ``model``.
    """
    from .generate import load_model_dir

    source, _, _ = load_model_dir(path, "cpu")
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise ConfigError(f"train.init_from={path}: its weights do not fit the network this config builds "
                          f"(use that model's model section): {detail}") from None


def training_timesteps(n: int, train_cfg, device, low_noise: bool = True) -> torch.Tensor:
    """Timesteps [n]: logit-normal (train.timestep_mean/std), and with ``low_noise`` a
    train.low_timestep_fraction of them uniform in (0, train.low_timestep_max) instead."""
    t = sample_timesteps(n, train_cfg.timestep_mean, train_cfg.timestep_std, device=device)
    if low_noise and train_cfg.low_timestep_fraction > 0:
        low = torch.rand(n, device=device) < train_cfg.low_timestep_fraction
        t = torch.where(low, torch.rand(n, device=device).clamp(min=1e-4) * train_cfg.low_timestep_max, t)
    return t


def soft_edge_source(x0: torch.Tensor, t: torch.Tensor, train_cfg) -> Optional[torch.Tensor]:
    """The clips to noise under train.blur_prob (config): x0 with some low-noise clips blurred, or None.

    Not below MIN_VELOCITY_T: there a clamped x0 head's velocity (model.x0_velocity=clamped) is taken at
    t = MIN_VELOCITY_T, and the target of a blurred source, amplified by (1 - t) / t, would ask it for an
    overshooting x0 (x0 - (MIN_VELOCITY_T / t - 1) (x_t - x0)) instead of the sharp clip. An exact head
    would be asked for the sharp clip; it keeps the same rule, so the two train on the same clips.
    """
    if train_cfg.blur_prob <= 0:
        return None
    chosen = ((t >= MIN_VELOCITY_T) & (t < train_cfg.blur_max_t)
              & (torch.rand(t.shape, device=t.device) < train_cfg.blur_prob))
    if not bool(chosen.any()):
        return None
    low, high = train_cfg.blur_sigma
    sigma = low + (high - low) * torch.rand(int(chosen.sum()), device=t.device)
    source = x0.clone()
    source[chosen] = gaussian_blur_frames(x0[chosen], sigma)
    return source


def training_loss(model, x0: torch.Tensor, labels, captions, train_cfg, low_noise: bool = True):
    """Rectified-flow loss on one batch plus the MoE auxiliary losses: (total, flow loss, model output).
    ``low_noise`` False leaves out train.low_timestep_fraction and train.blur_prob (see train.low_noise_from)."""
    t = training_timesteps(x0.shape[0], train_cfg, x0.device, low_noise)
    noise = torch.randn_like(x0)
    source = soft_edge_source(x0, t, train_cfg) if low_noise else None
    per_sample, out = flow_loss(model, x0, t, noise, labels=labels, captions=captions, source=source)
    flow = per_sample.mean()
    return flow + out.aux.loss, flow, out


def wsd_factor(step: int, progress: float, warmup_steps: int, decay_fraction: float) -> float:
    """Warmup-stable-decay: a linear warmup over ``warmup_steps``, then 1 until the run's ``progress``
    (0..1) reaches 1 - decay_fraction, then a linear fall to 0 at progress 1."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warmup * min(1.0, max(0.0, (1.0 - progress) / decay_fraction))


def parameter_checksum(model: torch.nn.Module) -> dict:
    """Exact fingerprint of a model's parameters (sha256 of their bytes) and their sum, for comparisons."""
    digest = hashlib.sha256()
    total = 0.0
    for name, param in sorted(model.named_parameters()):
        data = param.detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(data.numpy().tobytes())
        total += float(data.double().sum())
    return {"sha256": digest.hexdigest(), "sum": total}


def _flat_hparams(cfg: Config) -> dict:
    """The config as flat scalars for TensorBoard's hparams table."""
    flat = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else key, value)
        elif isinstance(node, (bool, int, float, str)):
            flat[prefix] = node
        elif isinstance(node, list) and len(node) > 20:
            flat[prefix] = f"[{len(node)} items]"
        else:
            flat[prefix] = str(node)

    visit("", config_to_dict(cfg))
    return flat


def _accelerator_available() -> bool:
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def format_duration(seconds: float) -> str:
    """4m07s."""
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------- the trainer


@dataclasses.dataclass
class TrainerState:
    """What a checkpoint adds to Accelerate's state: where the run is."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of this epoch already consumed
    elapsed_seconds: float = 0.0  # training wall time of earlier sessions of this run
    global_batch: int = 0  # clips per global micro-batch when saved (to convert the position)
    skipped_steps: int = 0  # steps not applied because their loss or gradient was not finite


class Trainer:
    """One run: Accelerator, model, optimizer, LR schedule, EMA and data; ``fit()`` trains and exports."""

    def __init__(self, cfg: Config):
        from .data import build_dataset

        self.cfg, tc = cfg, cfg.train
        self.out = Path(tc.output_dir)
        self.started = time.monotonic()
        if not torch.distributed.is_initialized():
            # A second run in one Python process (a notebook, the tests) may ask for another precision.
            AcceleratorState._reset_state()
            GradientState._reset_state()
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.accelerator = acc = Accelerator(
            # Without an accelerator device, say so: Accelerate forms a CPU process group (gloo)
            # under torchrun only when told it runs on the CPU.
            cpu=not _accelerator_available(),
            mixed_precision=resolve_mixed_precision(tc.mixed_precision, device_type),
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out)),
            # We step the LR schedule once per optimizer step; Accelerate would step it once per process.
            step_scheduler_with_optimizer=False,
            # An expert that receives no token in a step has no gradient.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.is_main = acc.is_main_process
        self.budget_spent = 0.0  # share of train.time_budget_minutes used (a resumed run gets it again)
        self.low_noise_on = False  # whether train.low_noise_from has been reached (told once)
        set_seed(tc.seed)  # the same initial weights on every process

        self.dataset = build_dataset(cfg, "train")
        self._check_data()
        self.vae = load_vae(cfg.model, acc.device) if cfg.model.vae else None
        model = build_model(cfg.model).train()
        if tc.init_from:
            load_initial_weights(model, tc.init_from)
        self.counts = model.parameter_counts()
        if tc.compile:
            model.compile_regions()  # in place, so the state_dict keys stay those of the plain model
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(model, *self._optimizer_and_schedule(model))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # On CPUs diffusers' foreach EMA update took 12.6 ms a bouncing_small step, its per-tensor loop 4.9.
        self.ema = EMAModel(self.params, decay=tc.ema_decay, foreach=acc.device.type != "cpu")
        self.ema.to(acc.device)
        acc.register_for_checkpointing(self.ema)

        set_seed(tc.seed, device_specific=True)  # different noise and dropout on each process
        self.state = TrainerState(global_batch=tc.batch_size * acc.num_processes)
        self.sample_conditions = self._sample_conditions()
        self.example_conditions: Optional[dict] = None  # read at the first export
        self.last_saved_step = -1

    # -- setup

    def _check_data(self) -> None:
        """Fill the vocabulary from the captions; fail early on data the model cannot take."""
        cfg, data = self.cfg, self.dataset
        needed = cfg.train.batch_size * self.accelerator.num_processes
        if len(data) < needed:
            raise DataError(f"{cfg.data.source} gives {len(data)} clips, fewer than one batch of {needed} "
                            "(train.batch_size x processes); add clips or lower train.batch_size")
        if cfg.model.text and not cfg.model.text_encoder and not cfg.model.vocab:
            cfg.model.vocab = list(data.vocabulary())
        num_classes = int(getattr(data, "num_classes", 0) or 0)
        if cfg.model.num_classes and num_classes > cfg.model.num_classes:
            raise ConfigError(f"the data has {num_classes} classes but model.num_classes={cfg.model.num_classes}")

    def _optimizer_and_schedule(self, model: torch.nn.Module):
        tc = self.cfg.train
        fused = fused_adamw(self.accelerator.device)
        if tc.optimizer == "muon":
            optimizer = MuonAdamW.for_model(model, lr=tc.lr, weight_decay=tc.weight_decay,
                                            betas=tuple(tc.betas), fused=fused)
        else:
            optimizer = torch.optim.AdamW(weight_decay_groups(list(model.parameters()), tc.weight_decay),
                                          lr=tc.lr, betas=tuple(tc.betas), fused=fused)
        if tc.lr_schedule == WSD_SCHEDULE:
            return optimizer, LambdaLR(optimizer, lambda step: self._wsd_factor(step))
        try:
            schedule = get_scheduler(tc.lr_schedule, optimizer, num_warmup_steps=tc.warmup_steps,
                                     num_training_steps=tc.max_steps)
        except ValueError as err:
            raise ConfigError(f"train.lr_schedule: {err}") from None
        return optimizer, schedule

    def _wsd_factor(self, step: int) -> float:
        """LR factor of warmup_stable_decay after ``step`` scheduler steps, from the step and the run's time
        (the schedule's saved state holds neither: a resumed run recomputes it)."""
        tc = self.cfg.train
        return wsd_factor(step, self.progress(step), tc.warmup_steps, tc.decay_fraction)

    def progress(self, step: int) -> float:
        """The run's progress (0..1) at ``step``: of max_steps, or of the time budget when that ends first."""
        return max(step / self.cfg.train.max_steps, self.budget_spent)

    def _sample_conditions(self) -> tuple[list[str], torch.Tensor]:
        """Captions and labels of the first clips, reused by every periodic sample so they compare."""
        n = self.cfg.sample.num_videos if self.cfg.train.sample_every else 0
        items = [self.dataset[i % len(self.dataset)] for i in range(n)]
        return [item["caption"] for item in items], torch.tensor([int(item["label"]) for item in items])

    # -- checkpoints and export

    def resume_from(self, path: Path) -> None:
        acc, cfg = self.accelerator, self.cfg
        saved, current = config_to_dict(load_config(path / CONFIG_FILE).model), config_to_dict(cfg.model)
        if saved != current:
            key = next(k for k in saved if saved[k] != current.get(k))
            raise UsageError(f"{path} was trained with another model.{key}; resume with the same model section "
                             "or start a new train.output_dir")
        acc.load_state(str(path))
        self.ema.to(acc.device)  # loaded onto the CPU
        state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
        global_batch = cfg.train.batch_size * acc.num_processes
        if state.global_batch != global_batch:
            # Another batch size or process count: keep the number of clips consumed this epoch.
            state.batch_in_epoch = state.batch_in_epoch * state.global_batch // global_batch
            state.global_batch = global_batch
        self.state = state
        self.last_saved_step = state.step
        if self.is_main:
            self._truncate_log(state.step)
        self.print(f"resumed from {path} at step {state.step}")

    def save_checkpoint(self) -> None:
        """Write checkpoint-STEP atomically: a temporary folder, flushed, marked complete, renamed."""
        acc, step = self.accelerator, self.state.step
        final = self.out / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.out / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # on every process: RNG states are per process (and FSDP shards)
        acc.wait_for_everyone()
        if self.is_main:
            saved = dataclasses.replace(self.state, elapsed_seconds=self.elapsed())
            (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(saved), indent=1))
            save_config(self.cfg, tmp / CONFIG_FILE)
            (tmp / COMPLETE_MARKER).write_text(f"step {step}\n")
            time.sleep(float(os.environ.get(CHECKPOINT_DELAY_ENV, 0)))
            publish_dir(tmp, final)  # the rename is the commit; the marker also flags copies made by hand
            complete, _ = list_checkpoints(self.out)
            for _, old in complete[:-self.cfg.train.keep_checkpoints]:
                remove_dir(old)
        self.last_saved_step = step
        acc.wait_for_everyone()

    def export(self, final: Optional[Path] = None) -> Path:
        """Write model/ (or the snapshot folder ``final``) atomically: the weights (model/: those of
        train.export_weights; snapshots: the EMA), the resolved config, the scheduler config (and the VAE)."""
        acc, cfg = self.accelerator, self.cfg
        raw = final is None and cfg.train.export_weights == "raw"
        final = final or self.out / "model"
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
        with contextlib.nullcontext() if raw else self.ema_weights():
            state_dict = acc.get_state_dict(self.model)  # the full weights, gathered under FSDP
            if self.is_main:
                with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the run's RNG
                    export_model = build_model(cfg.model)
                export_model.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()})
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            export_model.save_pretrained(tmp)
            save_config(cfg, tmp / CONFIG_FILE)
            make_scheduler(cfg.sample.scheduler, shift=cfg.sample.shift).save_pretrained(tmp / "scheduler")
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae")
            info = {"step": self.state.step, "train_seconds": round(self.elapsed(), 1), "parameters": self.counts,
                    "weights": "raw" if raw else "ema"}
            (tmp / "train_info.json").write_text(json.dumps(info, indent=1))
            if self.example_conditions is None:
                self.example_conditions = example_conditions(self.dataset)
            (tmp / EXAMPLE_CONDITIONS_FILE).write_text(json.dumps(self.example_conditions, indent=1))
            publish_dir(tmp, final)
        acc.wait_for_everyone()
        return final

    @contextlib.contextmanager
    def ema_weights(self):
        """Swap the EMA weights into the model for the duration of the block."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    # -- samples

    @torch.no_grad()
    def write_samples(self) -> None:
        """A gif grid of clips from the EMA weights. Every process samples: DDP and FSDP forwards are collective."""
        from .video_io import tile_videos, write_video

        cfg = self.cfg
        captions, labels = self.sample_conditions
        shape = (len(captions), cfg.model.latent_channels, cfg.model.num_frames, *cfg.model.latent_size)
        self.model.eval()
        try:
            with self.ema_weights():
                x = sample(self.model, shape, labels=labels if cfg.model.num_classes else None,
                           captions=captions if cfg.model.text or cfg.model.text_encoder else None,
                           steps=cfg.sample.steps, guidance=cfg.sample.guidance, scheduler_name=cfg.sample.scheduler,
                           shift=cfg.sample.shift, guidance_min_t=cfg.sample.guidance_min_t,
                           generator=torch.Generator().manual_seed(cfg.sample.seed), device=self.accelerator.device)
        finally:
            self.model.train()
        if self.vae is not None:
            x = vae_decode(self.vae, x)
        if self.is_main:
            path = self.out / "samples" / f"step-{self.state.step:07d}.gif"
            write_video(path, tile_videos(to_uint8_frames(x).cpu()), fps=cfg.sample.fps)

    # -- the loop

    def batches(self) -> Iterator[dict]:
        """Batches from the saved data position on, epoch after epoch; the position is kept in self.state."""
        from .data import collate

        acc, cfg = self.accelerator, self.cfg
        epoch, start = self.state.epoch, self.state.batch_in_epoch
        while True:
            sampler = EpochBatchSampler(len(self.dataset), cfg.train.batch_size, cfg.data.seed, epoch, start,
                                        acc.process_index, acc.num_processes)
            # Its own generator: making a loader must not draw from the global RNG, or resume would diverge.
            loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                collate_fn=collate, pin_memory=acc.device.type == "cuda",
                                generator=torch.Generator().manual_seed(epoch_seed(cfg.data.seed, epoch)))
            for batch in loader:
                start += 1
                self.state.epoch, self.state.batch_in_epoch = epoch, start
                yield batch
            epoch, start = epoch + 1, 0

    def train_step(self, batches: Iterator[dict], sums: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """One optimizer step over train.grad_accum micro-batches; adds its losses to ``sums`` if it was applied.

        Returns the gradient norm before clipping and whether the step was applied. A step whose loss or
        gradient is not finite is skipped: weights, optimizer moments, EMA and router biases stay as they were.
        """
        acc, tc = self.accelerator, self.cfg.train
        step_sums: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=acc.device)
        low_noise = self.progress(self.state.step) >= tc.low_noise_from
        if low_noise and not self.low_noise_on and (tc.low_timestep_fraction > 0 or tc.blur_prob > 0):
            if tc.low_noise_from > 0:
                self.print(f"step {self.state.step}: the low-noise options start (train.low_noise_from="
                           f"{tc.low_noise_from:g})")
            self.low_noise_on = True
        for micro in range(tc.grad_accum):
            x0, labels, captions = model_inputs(next(batches), self.cfg.model, acc.device, self.vae)
            # Gradients are averaged across processes only on the last micro-batch.
            sync = micro == tc.grad_accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                loss, flow, out = training_loss(self.model, x0, labels, captions, tc, low_noise)
                acc.backward(loss / tc.grad_accum)
            total += loss.detach().float()
            losses = {"loss": flow, **{f"aux/{name}": value for name, value in out.aux.losses.items()}}
            for key, value in losses.items():
                step_sums[key] = step_sums.get(key, 0.0) + value.detach().float() / tc.grad_accum
        grad_norm = acc.clip_grad_norm_(self.params, tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf)
        # One host sync per step: a bad step must not reach AdamW at all, since its momentum and weight
        # decay move the weights even with zero gradients. The flag is summed over processes so all agree.
        bad = (~torch.isfinite(grad_norm) | ~torch.isfinite(total)).float()
        applied = not bool(acc.reduce(bad, reduction="sum"))
        if applied:
            self.optimizer.step()
            acc.unwrap_model(self.model).after_optimizer_step()
            self.ema.step(self.params)
            for key, value in step_sums.items():
                sums[key] = sums.get(key, 0.0) + value
        else:
            self.state.skipped_steps += 1
            if acc.scaler is not None:
                # fp16: the loss scaler must see the step to lower its scale; without gradients AdamW changes nothing
                self.optimizer.zero_grad(set_to_none=True)
                self.optimizer.step()
        self.lr_scheduler.step()  # skipped steps included, so the schedule still ends at max_steps
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return grad_norm, applied

    def fit(self) -> Path:
        """Train to train.max_steps (or the time budget), then checkpoint and export; returns the run folder."""
        acc, tc = self.accelerator, self.cfg.train
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            acc.init_trackers("tensorboard", config=_flat_hparams(self.cfg))
        self._describe()
        budget = tc.time_budget_minutes * 60 if tc.time_budget_minutes else None
        batches = self.batches()
        # With a time budget, tqdm's estimate for max_steps would mislead; the postfix shows the time left.
        bar_format = None if budget is None else "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
        progress = tqdm(total=tc.max_steps, initial=self.state.step, disable=not self.is_main, desc="train",
                        dynamic_ncols=True, smoothing=0.1, bar_format=bar_format)
        postfix: dict[str, str] = {}
        sums = {"loss": torch.zeros((), device=acc.device)}
        bad_streak = 0
        window_steps, window_applied, window_start = 0, 0, time.monotonic()
        stop_reason = "max_steps"
        while self.state.step < tc.max_steps:
            if budget is not None:
                self.budget_spent = self._budget_spent(budget)
                if self.budget_spent >= 1.0:
                    stop_reason = "time budget"
                    break
            grad_norm, applied = self.train_step(batches, sums)
            bad_streak = 0 if applied else bad_streak + 1
            window_steps += 1
            window_applied += applied
            step = self.state.step
            if not applied:
                self.print(f"step {step}: non-finite loss or gradient (gradient norm {float(grad_norm):g}); "
                           f"step skipped ({bad_streak} in a row, train.max_bad_steps={tc.max_bad_steps})")
            if step % tc.log_every == 0 or step == tc.max_steps:
                seconds = time.monotonic() - window_start
                clips_per_second = window_steps * tc.batch_size * tc.grad_accum * acc.num_processes / seconds
                postfix.update(self._log(sums, window_applied, grad_norm, clips_per_second))
                window_steps, window_applied, window_start = 0, 0, time.monotonic()
            if not applied and bad_streak >= tc.max_bad_steps:
                progress.close()
                acc.end_training()
                raise self._diverged(bad_streak)
            paused = time.monotonic()
            if tc.sample_every and step % tc.sample_every == 0:
                self.write_samples()
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                self.save_checkpoint()
            if tc.snapshot_every and step % tc.snapshot_every == 0:
                self.export(self.out / SNAPSHOT_DIR / f"step-{step:07d}")  # for evaluating quality over time
            window_start += time.monotonic() - paused  # clips/s counts training time only
            if budget is not None:
                postfix["left"] = format_duration(budget - (time.monotonic() - self.started))
            progress.set_postfix(postfix, refresh=False)
            progress.update(1)
        progress.close()
        if self.last_saved_step != self.state.step:
            self.save_checkpoint()
        model_dir = self.export()
        if os.environ.get(RANK_CHECKSUM_ENV) == "1":
            checksum = parameter_checksum(acc.unwrap_model(self.model))
            (self.out / f"rank-{acc.process_index}-checksum.json").write_text(json.dumps(checksum))
        acc.end_training()
        self.print(f"stopped at step {self.state.step} ({stop_reason}) after {format_duration(self.elapsed())}; "
                   f"model exported to {model_dir}")
        return self.out

    def _diverged(self, streak: int) -> TrainingDiverged:
        """The error that stops a run of bad steps; nothing is saved, so the last checkpoint is the last good one."""
        complete, _ = list_checkpoints(self.out)
        last = f"the last good checkpoint is {complete[-1][1]}" if complete else "there is no checkpoint yet"
        step = self.state.step
        return TrainingDiverged(f"{streak} steps in a row had a non-finite loss or gradient (steps {step - streak + 1}-"
                                f"{step}, train.max_bad_steps={self.cfg.train.max_bad_steps}); {last}. Lower train.lr, "
                                "raise train.warmup_steps, use train.mixed_precision=no or train.compile=false, "
                                "then continue with --resume latest")

    def _budget_spent(self, budget: float) -> float:
        """The share of the time budget spent, by process 0's clock for all, so that all processes stop
        at the same step and decay the learning rate alike."""
        spent = (time.monotonic() - self.started) / budget
        if self.accelerator.num_processes == 1:
            return spent
        value = torch.tensor([spent], dtype=torch.float32, device=self.accelerator.device)
        return float(broadcast(value, from_process=0).item())

    # -- reporting

    def print(self, message: str) -> None:
        if self.is_main:
            tqdm.write(f"vidmoe train: {message}", file=sys.stderr)

    def elapsed(self) -> float:
        """Wall seconds of this run, earlier sessions included."""
        return self.state.elapsed_seconds + time.monotonic() - self.started

    def _truncate_log(self, step: int) -> None:
        """Drop log lines that a crashed session wrote after the checkpoint we resume from (and a torn last line)."""
        path = self.out / "log.jsonl"
        if path.is_file():
            lines = path.read_text().splitlines()
            kept = [line for line in lines if (logged := _log_step(line)) is not None and logged <= step]
            tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)  # a kill now keeps the old log or the new one, never half of one

    def moe_scalars(self) -> dict[str, float]:
        """Per MoE layer: the most and least loaded expert (share x E, 1 = even) and the dropped fraction."""
        scalars = {}
        for layer, stats in self.accelerator.unwrap_model(self.model).moe_stats(reset=True).items():
            load = torch.as_tensor(stats["load"], dtype=torch.float32)
            scalars[f"moe/{layer}/max_load"] = float(load.max()) * load.numel()
            scalars[f"moe/{layer}/min_load"] = float(load.min()) * load.numel()
            scalars[f"moe/{layer}/dropped_frac"] = float(stats.get("dropped_frac", 0.0))
        return scalars

    def _log(self, sums: dict, applied: int, grad_norm: torch.Tensor, clips_per_second: float) -> dict[str, str]:
        """Average the sums of the ``applied`` steps since the last log over steps and processes; write
        TensorBoard and log.jsonl. Returns what the progress bar shows.
        """
        acc = self.accelerator
        names = sorted(sums)
        means = acc.reduce(torch.stack([sums[k] for k in names]), reduction="mean")  # one collective
        values = {k: v / applied if applied else math.nan for k, v in zip(names, means.tolist())}
        for v in sums.values():
            v.zero_()
        scalars = {**values, "grad_norm": float(grad_norm), "lr": self.lr_scheduler.get_last_lr()[0],
                   "clips_per_s": clips_per_second, "epoch": self.state.epoch,
                   "skipped_steps": self.state.skipped_steps}
        scalars.update(self.moe_scalars())  # on every process: it also resets the counters
        postfix = {"loss": f"{values['loss']:.4f}", "clips/s": f"{clips_per_second:.1f}"}
        if not self.is_main:
            return postfix
        acc.log(scalars, step=self.state.step)
        record = {"step": self.state.step, "time": round(self.elapsed(), 2),
                  **{k: v for k, v in scalars.items() if not k.startswith("moe/")}}
        with open(self.out / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        return postfix

    def _describe(self) -> None:
        cfg, acc, counts = self.cfg, self.accelerator, self.counts
        self.print(f"{counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active per token), "
                   f"{len(self.dataset)} clips from {cfg.data.source}, {acc.num_processes} process(es) on "
                   f"{acc.device.type}, mixed precision: {acc.mixed_precision}, output: {self.out}")


def _log_step(line: str) -> Optional[int]:
    """The step of a log.jsonl line, or None for a line that a kill cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def train(cfg: Config, resume: Optional[str] = None) -> Path:
    """Train from a config (``resume``: None, ``"latest"`` or a checkpoint folder); returns the run folder."""
    out = Path(cfg.train.output_dir)
    check_writable_dir(out, "train.output_dir")
    complete, _ = list_checkpoints(out)
    if resume is None and complete:
        raise UsageError(f"{out} already holds {complete[-1][1].name}; pass --resume latest to continue that run "
                         "or choose another train.output_dir")
    trainer = Trainer(cfg)
    checkpoint = find_checkpoint(out, resume, report=trainer.print)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_main and out.is_dir():
        for leftover in out.glob(f"{TMP_PREFIX}*"):  # never valid: a save or export that was interrupted
            shutil.rmtree(leftover, ignore_errors=True)
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
    return trainer.fit()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.max_steps=200 model.moe.num_experts=16")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue from the newest complete checkpoint of train.output_dir, or from a folder")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg, resume=args.resume)
    except TrainingDiverged as err:
        # Not bad input (exit 2) but a run that failed: one line, exit status 1.
        print(f"vidmoe train: error: {err}", file=sys.stderr)
        return 1
    return 0
