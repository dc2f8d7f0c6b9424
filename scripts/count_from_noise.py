"""Where a model loses the object count: sample from held-out clips noised to t0 instead of from pure noise.

At t0 = 1 this is ordinary generation (the eval's prompts, sampler and guidance); at t0 < 1 the sampler
starts from the real clip's layout noised to t0 and runs only the steps below it; t0 = 0 scores the real
clips themselves. Prints count agreement by the number of objects asked for, with and without fragments,
and for pairs and trios the share of frames with fewer and with more whole objects than asked for.

    python scripts/count_from_noise.py --model samples/bouncing-moe --clips 48 --levels 1 0.7 0.5 0.3 0.1 0
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import numpy as np
import torch

from vidmoe import physics
from vidmoe.evaluate import DEFAULT_DATA, _conditions, heldout_items, to_uint8_clips
from vidmoe.generate import generate, load_model_dir


@functools.lru_cache(maxsize=2)
def _prepared(model_dir, clips: int, data: str):
    """The model's config and the held-out clips, loaded once for every level."""
    _, cfg, vae = load_model_dir(model_dir)
    if vae is not None:
        raise SystemExit("count_from_noise.py: latent models are not supported (it noises pixels)")
    items = heldout_items(cfg, data, clips)
    if _conditions(cfg, items, len(items))[2] is None:
        raise SystemExit("count_from_noise.py: needs a captioned model and data with object counts (bouncing shapes)")
    return cfg, items


def clips_from_noise(model_dir, t0: float, clips: int = 48, seed: int = 0, data: str = DEFAULT_DATA,
                     scheduler: str | None = None) -> tuple[np.ndarray, list[int]]:
    """uint8 clips [N, T, H, W, 3] sampled from the first held-out clips noised to t0, and the counts asked for.

    t0 = 1 is ``vidmoe generate`` with the eval's prompts (the same clips), t0 = 0 the real clips.
    """
    cfg, items = _prepared(model_dir, clips, data)
    captions, labels, expected = _conditions(cfg, items, len(items))
    if t0 <= 0:
        return to_uint8_clips(items), expected
    real = torch.stack([item["video"] for item in items]).float()
    videos = generate(model_dir, prompt=captions, label=labels, num_videos=len(items), seed=seed,
                      scheduler=scheduler, init=None if t0 >= 1 else real, start_t=min(t0, 1.0))
    return videos.numpy(), expected


def count_from_noise(model_dir, levels, clips: int = 48, seed: int = 0, data: str = DEFAULT_DATA,
                     scheduler: str | None = None) -> dict[float, dict]:
    """{t0: count agreement overall, by number asked for (with and without fragments), fewer/more shares}."""
    results = {}
    for t0 in levels:
        videos, expected = clips_from_noise(model_dir, t0, clips, seed, data, scheduler)
        per_clip = physics.per_clip_metrics(videos)
        entry = {"all": physics.count_agreement(per_clip, expected),
                 "by_count": physics.count_agreement_by_count(per_clip, expected),
                 "by_count_without_fragments": physics.count_agreement_by_count(per_clip, expected, fragments=False)}
        for n in (2, 3):
            off = [np.array(c["counts"]) - np.array(c["fragment_counts"]) - n
                   for c, e in zip(per_clip, expected) if e == n]
            if off:
                off = np.concatenate(off)
                entry[f"{n}_fewer"], entry[f"{n}_more"] = float(np.mean(off < 0)), float(np.mean(off > 0))
        results[float(t0)] = entry
        print(f"t0={t0:g}: {entry['all']:.3f}", file=sys.stderr, flush=True)
    return results


def table(results: dict[float, dict]) -> str:
    def cell(entry, key, n):
        value = entry[key].get(n)
        return "-" if value is None else f"{value:.2f}"

    lines = ["| start at t0 | count agreement | 1 / 2 / 3 objects | ... without fragments | pairs: fewer / more | "
             "trios: fewer / more |", "|---|---|---|---|---|---|"]
    for t0, e in results.items():
        label = "real clips" if t0 <= 0 else ("pure noise (generation)" if t0 >= 1 else f"{t0:g}")
        by = " / ".join(cell(e, "by_count", n) for n in (1, 2, 3))
        clean = " / ".join(cell(e, "by_count_without_fragments", n) for n in (1, 2, 3))
        pairs = f"{e.get('2_fewer', float('nan')):.2f} / {e.get('2_more', float('nan')):.2f}"
        trios = f"{e.get('3_fewer', float('nan')):.2f} / {e.get('3_more', float('nan')):.2f}"
        lines.append(f"| {label} | {e['all']:.3f} | {by} | {clean} | {pairs} | {trios} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an exported model folder (runs/NAME/model, samples/bouncing-moe)")
    parser.add_argument("--levels", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3, 0.1, 0.0],
                        help="noise levels to start from: 1 = pure noise, 0 = the real clips")
    parser.add_argument("--clips", type=int, default=48, help="the first N held-out clips (their captions are the prompts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--scheduler", default=None, help="default: the model's sample.scheduler")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if any(not 0 <= t <= 1 for t in args.levels):
        parser.error("--levels must lie in [0, 1]")
    results = count_from_noise(args.model, args.levels, args.clips, args.seed, args.data, args.scheduler)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
