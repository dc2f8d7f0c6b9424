"""Quality against training wall-clock: `vidmoe eval` on every snapshot of one or more runs, one figure.

Runs trained with ``train.snapshot_every=N`` export their EMA weights to ``snapshots/step-N``, each
with the training seconds it took (``train_info.json``). This evaluates every snapshot with the
same held-out clips, noise and seeds, and plots held-out loss and the physics checker numbers
against minutes, one line per run:

    python scripts/time_to_quality.py --runs runs/moe runs/dense_flops --names MoE dense_flops \\
        --out samples/time_to_quality

Writes ``--out``/time_to_quality.json (one row per snapshot) and time_to_quality.png. Snapshots
already in the JSON are not evaluated again, so an interrupted call can be re-run. ``--earlier
TABLE RUN`` puts a run evaluated before (whose folder may be gone) beside the new ones, its rows
taken from that table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Iterator

import torch

from vidmoe.analysis.figures import new_figure, save_figure
from vidmoe.evaluate import evaluate
from vidmoe.train import SNAPSHOT_DIR

# (key in a row, axis label, reference line from the real clips' row or None)
PANELS = (
    ("heldout_loss", "held-out loss (fixed noise)", None),
    ("objects_per_frame_agreement", "objects per frame = prompt (share of frames)", None),
    ("motion_residual_ratio", "motion residual / real (log)", 1.0),
    ("frozen_or_empty_rate", "frozen or empty clips (share)", None),
)


def snapshots(run: Path, name: str) -> list[tuple[str, Path, dict]]:
    """(key, folder, train_info) of every snapshot of a run, the final model/ last unless a snapshot has its step."""
    found, seen = [], set()
    for snap in [*sorted((run / SNAPSHOT_DIR).glob("step-*")), run / "model"]:
        if not (snap / "train_info.json").is_file():
            continue
        info = json.loads((snap / "train_info.json").read_text())
        key = f"{name}:{info['step']}"
        if key not in seen:
            seen.add(key)
            found.append((key, snap, info))
    return found


def evaluate_snapshot(name: str, snap: Path, info: dict, out: Path, args: argparse.Namespace) -> dict:
    """One row of the table: `vidmoe eval` of one snapshot (FVD left to the final models' own evals)."""
    metrics = evaluate(snap, out=out / "evals" / f"{name}-{info['step']:07d}", num_videos=args.num_videos,
                       steps=args.steps, guidance=args.guidance, clips=args.clips, shift=args.shift,
                       scheduler=args.scheduler, compute_fvd=False)
    checker = metrics["physics"]["checker"]
    return {"run": name, "step": info["step"], "minutes": info["train_seconds"] / 60,
            "heldout_loss": metrics["heldout_loss"]["mean"],
            **{k: checker[k] for k in ("objects_per_frame_agreement", "motion_residual_ratio",
                                       "frozen_or_empty_rate")}}


def evaluate_all(todo: list[tuple[str, Path, dict]], args: argparse.Namespace) -> Iterator[dict]:
    """Rows of ``evaluate_snapshot`` in the order of ``todo``; ``args.jobs`` processes at a time."""
    if args.jobs <= 1 or len(todo) <= 1:
        yield from (evaluate_snapshot(*job, args.out, args) for job in todo)
        return
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:  # one core per worker
        yield from pool.map(evaluate_snapshot, *zip(*todo), repeat(args.out), repeat(args))


def plot(rows: list[dict], path: Path, decay_start: float | None = None) -> None:
    fig = new_figure(11, 7.5)
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, label, ref) in zip(axes, PANELS):
        for name in dict.fromkeys(r["run"] for r in rows):
            mine = sorted((r for r in rows if r["run"] == name), key=lambda r: r["minutes"])
            ax.plot([r["minutes"] for r in mine], [r[key] for r in mine], marker="o", label=name)
        if ref is not None:
            ax.axhline(ref, color="grey", linestyle="--", linewidth=1, label="real clips")
        if decay_start is not None:
            ax.axvline(decay_start, color="grey", linestyle=":", linewidth=1, label="learning rate decays from here")
        if key == "motion_residual_ratio":
            ax.set_yscale("log")
        ax.set_xlabel("training wall-clock (minutes)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def earlier_rows(table: Path, run: str, parser: argparse.ArgumentParser) -> list[dict]:
    """The rows of ``run`` in an earlier table, or a parser error naming the runs it holds."""
    try:
        rows = json.loads(table.read_text())
    except (OSError, ValueError) as err:
        parser.error(f"--earlier: cannot read {table}: {err}")
    mine = [r for r in rows if r.get("run") == run]
    if not mine:
        parser.error(f"--earlier: {table} has no run {run!r} (it has {sorted({r.get('run') for r in rows})})")
    return mine


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
    parser.add_argument("--decay-start", type=float, metavar="MINUTES",
                        help="mark where the runs' learning-rate decay began (e.g. 70.4 for 20%% of 88 minutes)")
    parser.add_argument("--jobs", type=int, default=1, help="snapshots evaluated at once, one core each (default 1)")
    parser.add_argument("--earlier", nargs=2, action="append", default=[], metavar=("TABLE", "RUN"),
                        help="plot RUN's rows from an earlier time_to_quality.json first (repeatable)")
    args = parser.parse_args()
    names = args.names or [run.name for run in args.runs]
    if len(names) != len(args.runs):
        parser.error("--names needs one name per run")
    earlier = [earlier_rows(Path(table), run, parser) for table, run in args.earlier]
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "time_to_quality.json"
    done = {f"{r['run']}:{r['step']}": r for r in json.loads(table.read_text())} if table.is_file() else {}
    todo = [(name, snap, info) for run, name in zip(args.runs, names)
            for key, snap, info in snapshots(run, name) if key not in done]
    for row in evaluate_all(todo, args):
        print(json.dumps(row))
        done[f"{row['run']}:{row['step']}"] = row
        table.write_text(json.dumps(list(done.values()), indent=1))  # an interrupted call resumes
    rows = [row for run_rows in earlier for row in run_rows]
    rows += [done[key] for run, name in zip(args.runs, names) for key, _, _ in snapshots(run, name)]
    table.write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "time_to_quality.png", args.decay_start)
    print(f"wrote {table} and {args.out / 'time_to_quality.png'}")


if __name__ == "__main__":
    main()
