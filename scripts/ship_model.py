"""Copy an exported model folder with its weights stored in fp16: half the size, for shipping.

    python scripts/ship_model.py runs/moe/model samples/bouncing-moe [--scheduler euler-stochastic --shift 3]
    python scripts/ship_model.py runs/moe/model samples/bouncing-moe --weights runs/moe/checkpoint-5680

``--weights`` takes the raw weights of the run's final checkpoint instead of the folder's EMA weights
(what ``train.export_weights=raw`` exports, for a run that exported the EMA).

``--scheduler``, ``--shift``, ``--guidance`` and ``--guidance-min-t`` set the copy's sampling defaults
(its ``sample`` section and saved scheduler), so `vidmoe generate` and `vidmoe.generate()` use them
without flags.

`vidmoe generate` and every other loader read the weights back into fp32, so the only change is
the rounding of each weight to fp16 (relative error below 5e-4; this script reports the largest
difference in the model's output on one random input). A 30-step sampling run amplifies it: on
the shipped bouncing model, 0.5% of the pixels of a clip differed by more than 8 levels of 255
from the fp32 model's clip with the same seed. Evaluate the copy itself, not the original.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from vidmoe.config import save_config
from vidmoe.diffusion import make_scheduler
from vidmoe.errors import UsageError
from vidmoe.generate import (CONFIG_FILE, EXAMPLE_CONDITIONS_FILE, example_conditions, load_model_dir,
                             resolve_guidance_min_t, resolve_model_dir)
from vidmoe.train import STATE_FILE

# Copied as they are; the config, scheduler and train_info.json are rewritten below.
KEEP = ("vae", EXAMPLE_CONDITIONS_FILE)


def raw_weights_into(model: torch.nn.Module, checkpoint: Path, info: dict) -> dict:
    """Load a checkpoint's raw weights into ``model``; the export's train_info, marked raw.
    UsageError unless the checkpoint is of the step the model folder was exported at."""
    state, weights = checkpoint / STATE_FILE, checkpoint / "model.safetensors"
    if not (state.is_file() and weights.is_file()):
        raise UsageError(f"--weights {checkpoint}: not a checkpoint folder (no {STATE_FILE} and model.safetensors)")
    step = json.loads(state.read_text())["step"]
    if step != info["step"]:
        raise UsageError(f"--weights {checkpoint}: a checkpoint of step {step}, but the model folder was exported "
                         f"at step {info['step']}")
    model.load_state_dict(load_file(weights))
    return {**info, "weights": "raw"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="exported model folder (runs/NAME/model)")
    parser.add_argument("dst", type=Path, help="new folder (replaced if it exists)")
    parser.add_argument("--scheduler", help="sampling scheduler of the copy (default: the model's)")
    parser.add_argument("--shift", type=float, help="sampling timestep shift of the copy (default: the model's)")
    parser.add_argument("--guidance", type=float, help="guidance scale of the copy (default: the model's)")
    parser.add_argument("--guidance-min-t", type=float,
                        help="the copy guides only at t >= this (default: the model's sample.guidance_min_t)")
    parser.add_argument("--weights", type=Path, metavar="CHECKPOINT",
                        help="the raw weights of this checkpoint-STEP folder of the run, at the step SRC was exported")
    args = parser.parse_args()
    src = resolve_model_dir(args.src)
    model, cfg, _ = load_model_dir(src, "cpu")
    s = cfg.sample
    info = json.loads((src / "train_info.json").read_text())
    try:  # checked before anything is written
        s.guidance_min_t = resolve_guidance_min_t(cfg, args.guidance_min_t)
        if args.weights:
            info = raw_weights_into(model, args.weights, info)
    except UsageError as err:
        parser.error(str(err))  # one line, exit status 2
    m = cfg.model
    x = torch.randn(2, m.latent_channels, m.num_frames, *m.latent_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    labels = torch.zeros(2, dtype=torch.long) if m.num_classes else None
    with torch.no_grad():
        before = model(x, t, labels=labels).sample
    if args.dst.exists():
        shutil.rmtree(args.dst)
    model.half().save_pretrained(args.dst)
    for name in KEEP:
        path = src / name
        if path.is_dir():
            shutil.copytree(path, args.dst / name)
        elif path.is_file():
            shutil.copy2(path, args.dst / name)
    s.scheduler, s.shift, s.guidance = (args.scheduler or s.scheduler, s.shift if args.shift is None else args.shift,
                                        s.guidance if args.guidance is None else args.guidance)
    (args.dst / "train_info.json").write_text(json.dumps(info, indent=1))
    save_config(cfg, args.dst / CONFIG_FILE)
    if not (src / EXAMPLE_CONDITIONS_FILE).is_file():  # exported before trainers wrote it: the same, from the data
        from vidmoe.data import build_dataset

        examples = example_conditions(build_dataset(cfg))
        (args.dst / EXAMPLE_CONDITIONS_FILE).write_text(json.dumps(examples, indent=1))
    make_scheduler(s.scheduler, shift=s.shift).save_pretrained(args.dst / "scheduler")
    with torch.no_grad():
        after = load_model_dir(args.dst, "cpu")[0](x, t, labels=labels).sample
    size = sum(f.stat().st_size for f in args.dst.rglob("*") if f.is_file())
    print(f"wrote {args.dst} ({size / 1e6:.1f} MB); largest output change from fp16 weights: "
          f"{(before - after).abs().max():.2e} (output std {before.std():.2f})")


if __name__ == "__main__":
    main()
