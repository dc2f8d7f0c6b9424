"""Count agreement by the number of objects asked for, from `vidmoe eval` folders (also those written
before `vidmoe eval` reported it).

`vidmoe eval` asks for the captions of the first held-out clips; with 16 clips of the bouncing shapes
those ask for 1, 2 and 3 objects 6, 7 and 3 times, while the generator draws each number equally often.
This recomputes, from each folder's physics_clips.json, the agreement of the clips asked for each
number and the mean over the numbers, one column per model (mean over its folders):

    python scripts/count_breakdown.py "EMA=results/x0exact/ema-seed*" "dense=results/dense2e3/ema-seed*"

The prompts are rebuilt from the held-out clips named in each metrics.json, at the sizes of --config.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from statistics import mean

from vidmoe import physics
from vidmoe.config import load_config
from vidmoe.evaluate import _conditions, heldout_items


def expected_counts(cfg, data: str, clips: int) -> list[int]:
    """The number of objects each of the first ``clips`` generated clips was asked for."""
    items = heldout_items(cfg, data, clips)
    _, _, expected = _conditions(cfg, items, clips)
    if expected is None:
        raise SystemExit(f"{data}: its held-out clips carry no object count")
    return expected


def breakdown(folder: Path, cfg, cache: dict) -> dict[int, float]:
    metrics = json.loads((folder / "metrics.json").read_text())
    generation = metrics["physics"]["generation"]
    if generation["conditions"].startswith("none"):
        raise SystemExit(f"{folder}: an unconditional evaluation has no object count to agree with")
    key = (metrics["data"], generation["num_videos"])
    if key not in cache:
        cache[key] = expected_counts(cfg, *key)
    generated = json.loads((folder / "physics_clips.json").read_text())["generated"]
    return physics.count_agreement_by_count(generated, cache[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("columns", nargs="+", metavar="NAME=PATTERN", help="a model's name and a glob of its eval folders")
    parser.add_argument("--config", default="configs/bouncing_small.yaml", help="frame size and data settings")
    args = parser.parse_args()
    cfg, cache, names, columns = load_config(args.config), {}, [], []
    for column in args.columns:
        name, sep, pattern = column.partition("=")
        folders = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "physics_clips.json").is_file())
        if not sep or not folders:
            parser.error(f"{column!r}: not NAME=PATTERN, or no eval folder with physics_clips.json matches")
        names.append(f"{name} ({len(folders)})")
        columns.append([breakdown(folder, cfg, cache) for folder in folders])
    numbers = sorted({n for column in columns for seed in column for n in seed})
    print("| count agreement (mean over eval folders) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for n in numbers:
        print(f"| asked for {n} object{'s' if n > 1 else ''} | "
              + " | ".join(f"{mean(seed[n] for seed in column):.3f}" for column in columns) + " |")
    print("| mean over the numbers asked for | "
          + " | ".join(f"{mean(mean(seed.values()) for seed in column):.3f}" for column in columns) + " |")


if __name__ == "__main__":
    main()
