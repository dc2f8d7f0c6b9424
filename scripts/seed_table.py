"""One markdown table from `vidmoe eval` runs over several eval seeds: the checker numbers per model.

The README's tables report each model as the mean over eval seeds 0-3 (one `vidmoe eval --seed S`
folder per seed). This reads those folders and prints the rows the README quotes, one column per model:

    python scripts/seed_table.py "EMA=results/lr2e3/ema-seed*" "raw=results/lr2e3/raw-seed*"

Each argument is NAME=PATTERN, PATTERN a glob of eval folders (each holding metrics.json). With
``--json FILE`` the same numbers are also written as JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from statistics import mean

# (row label, how to read it from one metrics.json, format)
ROWS = [
    ("checker: count agreement (bar 0.85)", lambda m: m["physics"]["checker"]["objects_per_frame_agreement"], ".3f"),
    # absent from unconditional evals (no prompt count to agree with)
    ("... without fragments", lambda m: m["physics"]["checker"].get("agreement_without_fragments"), ".3f"),
    # the mean of the agreements of 1-, 2- and 3-object prompts (absent from evals before session 33)
    ("... mean over objects asked for", lambda m: m["physics"]["checker"].get("agreement_mean_over_counts"), ".3f"),
    ("fragments per frame", lambda m: m["physics"]["generated"]["fragments_per_frame"]["value"], ".2f"),
    ("checker: residual / real (limit 3)", lambda m: m["physics"]["checker"]["motion_residual_ratio"], ".2f"),
    ("checker: frozen or empty clips", lambda m: m["physics"]["checker"]["frozen_or_empty_rate"], ".3f"),
    ("held-out loss, all t", lambda m: m["heldout_loss"]["mean"], ".4f"),
]


def read_column(pattern: str) -> list[dict]:
    """The metrics of the eval folders matching ``pattern``, in sorted folder order."""
    files = sorted(Path(p) / "metrics.json" for p in glob.glob(pattern) if (Path(p) / "metrics.json").is_file())
    return [json.loads(f.read_text()) for f in files]


def summarize(metrics: list[dict]) -> dict:
    """Per row: the mean over seeds (None if a folder lacks the number) and the per-seed values, in folder order."""
    table = {}
    for label, read, _ in ROWS:
        values = [read(m) for m in metrics]
        table[label] = {"mean": None if None in values else mean(values), "per_seed": values}
    table["agreement_basis"] = sorted({m["physics"]["checker"]["agreement_basis"] for m in metrics})
    return table


def markdown(names: list[str], tables: list[dict], seeds: int) -> str:
    """The table: one row per metric (the count agreement's row also lists each seed), a column per model."""
    lines = [f"| (mean over {seeds} eval seeds) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for label, _, fmt in ROWS:
        cells = ["-" if t[label]["mean"] is None else format(t[label]["mean"], fmt) for t in tables]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if label.startswith("checker: count"):
            per_seed = ["/".join(format(v, ".2f").lstrip("0") for v in t[label]["per_seed"]) for t in tables]  # never None
            lines.append("| ... per seed | " + " | ".join(per_seed) + " |")
    for name, t in zip(names, tables):
        if t["agreement_basis"] != ["prompt object count"]:  # unconditional: nothing to count against
            lines.append(f"\n{name}: the count agreement here is {' / '.join(t['agreement_basis'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("columns", nargs="+", metavar="NAME=PATTERN", help="a model's name and a glob of its eval folders")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    names, tables, counts = [], [], set()
    for column in args.columns:
        name, sep, pattern = column.partition("=")
        if not sep or not name or not pattern:
            parser.error(f"{column!r} is not NAME=PATTERN")
        metrics = read_column(pattern)
        if not metrics:
            parser.error(f"{name}: no eval folder with metrics.json matches {pattern!r}")
        names.append(name)
        tables.append(summarize(metrics))
        counts.add(len(metrics))
    if len(counts) > 1:
        parser.error(f"the columns have different numbers of eval folders ({sorted(counts)}): compare like with like")
    print(markdown(names, tables, counts.pop()))
    if args.json:
        args.json.write_text(json.dumps(dict(zip(names, tables)), indent=1) + "\n")


if __name__ == "__main__":
    main()
