"""Quality against training wall-clock: `vidmoe eval` on every snapshot of one or more runs, one figure.

Runs trained with ``train.snapshot_every=N`` export their EMA weights to ``snapshots/step-N``, each
with the training seconds it took (``train_info.json``). This evaluates every snapshot with the
same held-out clips, noise and seeds, and plots held-out loss and the physics checker numbers
against minutes, one line per run:

    python scripts/time_to_quality.py --runs runs/moe runs/dense_flops --names MoE dense_flops \\
        --out samples/time_to_quality

Writes ``--out``/time_to_quality.json (one row per snapshot) and time_to_quality.png. Snapshots
already in the JSON are not evaluated again, so an interrupted call can be re-run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vidmoe.analysis.figures import new_figure
from vidmoe.evaluate import evaluate
from vidmoe.train import SNAPSHOT_DIR

# (key in a row, axis label, reference line from the real clips' row or None)
PANELS = (
    ("heldout_loss", "held-out loss (fixed noise)", None),
    ("objects_per_frame_agreement", "objects per frame = prompt (share of frames)", None),
    ("motion_residual_ratio", "motion residual / real (log)", 1.0),
    ("frozen_or_empty_rate", "frozen or empty clips (share)", None),
)


def snapshot_rows(run: Path, name: str, out: Path, done: dict, args) -> list[dict]:
    rows = []
    snapshots = sorted((run / SNAPSHOT_DIR).glob("step-*"))
    seen = set()
    for snap in [*snapshots, run / "model"]:  # model/ adds the last step when no snapshot fell on it
        if not (snap / "train_info.json").is_file():
            continue
        info = json.loads((snap / "train_info.json").read_text())
        key = f"{name}:{info['step']}"
        if key in seen:
            continue
        seen.add(key)
        if key in done:
            rows.append(done[key])
            continue
        metrics = evaluate(snap, out=out / "evals" / f"{name}-{info['step']:07d}", num_videos=args.num_videos,
                           steps=args.steps, guidance=args.guidance, clips=args.clips, shift=args.shift,
                           scheduler=args.scheduler)
        checker = metrics["physics"]["checker"]
        row = {"run": name, "step": info["step"], "minutes": info["train_seconds"] / 60,
               "heldout_loss": metrics["heldout_loss"]["mean"],
               **{k: checker[k] for k in ("objects_per_frame_agreement", "motion_residual_ratio",
                                          "frozen_or_empty_rate")}}
        print(json.dumps(row))
        rows.append(row)
        done[key] = row
    return rows


def plot(rows: list[dict], path: Path) -> None:
    fig = new_figure(11, 7.5)
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, label, ref) in zip(axes, PANELS):
        for name in dict.fromkeys(r["run"] for r in rows):
            mine = sorted((r for r in rows if r["run"] == name), key=lambda r: r["minutes"])
            ax.plot([r["minutes"] for r in mine], [r[key] for r in mine], marker="o", label=name)
        if ref is not None:
            ax.axhline(ref, color="grey", linestyle="--", linewidth=1, label="real clips")
        if key == "motion_residual_ratio":
            ax.set_yscale("log")
        ax.set_xlabel("training wall-clock (minutes)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, type=Path, help="run folders (with snapshots/)")
    parser.add_argument("--names", nargs="+", help="one name per run (default: the folder names)")
    parser.add_argument("--out", type=Path, default=Path("time_to_quality"))
    parser.add_argument("--num-videos", type=int, default=16)
    parser.add_argument("--clips", type=int, default=32, help="held-out clips for the loss and the real reference")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--shift", type=float, help="sampling timestep shift (default: each model's own)")
    parser.add_argument("--scheduler", help="sampling scheduler (default: each model's own)")
    args = parser.parse_args()
    names = args.names or [run.name for run in args.runs]
    if len(names) != len(args.runs):
        parser.error("--names needs one name per run")
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "time_to_quality.json"
    done = {f"{r['run']}:{r['step']}": r for r in json.loads(table.read_text())} if table.is_file() else {}
    rows = []
    for run, name in zip(args.runs, names):
        rows += snapshot_rows(run, name, args.out, done, args)
        table.write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "time_to_quality.png")
    print(f"wrote {table} and {args.out / 'time_to_quality.png'}")


if __name__ == "__main__":
    main()
