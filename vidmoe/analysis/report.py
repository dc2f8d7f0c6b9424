"""Write ``report.md`` from the metrics dictionary that ``vidmoe inspect`` also saves as metrics.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from . import stats

METRICS_SCHEMA = """\
metrics.json (schema_version 1; shares are fractions, entropies in nats, null means "not defined"):

- `schema_version`, `model`, `data`, `clips`, `timesteps` (list of t), `seed`, `permutations`
- `num_experts`, `top_k`, `router`, `expert_pool` ("split" | "shared")
- `grid`: [T', H', W'] tokens per clip; `patch_pixels`: [frames, rows, columns] of pixels per token
- `time_buckets`: [[low, high], ...] edges of the diffusion-time buckets (t = 1 is pure noise)
- `thresholds`: `motion`, `object`, `frame_diff`, `collapse_entropy_norm`, `collapse_top_share`, `collapse_cosine`
- `attributes`: name -> {`values`: [labels], `shares`: [share of tokens per value], `source`:
  "ground truth" | "frame difference" | "position" | "diffusion time", `permutation_null`: bool}
- `layers`: one entry per router, in model order:
  - `name` (e.g. "blocks.0.spatial"), `kind` ("spatial" | "temporal"), `pool` (MoE layer holding its experts)
  - `tokens`, `assignments`
  - `load` [E]: share of assignments per expert (sums to 1); `top1_load` [E]: share of tokens whose
    highest-gate expert it is
  - `entropy` (of `load`), `entropy_norm` (entropy / log E), `top_share`, `cv` (std / mean of the
    per-expert counts), `dead_experts` (ids with no assignment), `dropped` (share of the N*K token-choice
    slots left empty by capacity), `unrouted` (share of tokens no routed expert took), `router_entropy`
    (mean entropy of the router softmax per token)
  - `weight_cosine`: {`mean`, `max`} off-diagonal cosine of the experts' flattened weights
  - `collapsed` (bool) and `collapse_reasons` (list of strings)
  - `mi_over_h`: attribute -> MI(top-1 expert; attribute) / H(attribute)
  - `null_mi_over_h`: attribute -> {`mean`, `std`, `z`, `p`} under the clip-block permutation null
    (null for attributes that are the same in every clip: frame, border)
  - `random_router_mi_over_h`: attribute -> {`mean`, `std`, `z`, `p`} for expert ids drawn i.i.d. from the load
  - `motion_given_time`: {`mi_over_h`: MI(expert; motion | t bucket) / H(motion | t bucket), `null`, `random_router`}
  - `lift`: attribute -> {`values`, `lift` [E][V] = P(value | expert) / P(value), `null_mean`, `null_std`}
  - `motion_lift` [E]: the lift of "moving" (a copy of the `lift.motion` column)
  - `expert_time_share` [E][buckets]: P(expert | time bucket)
  - `experts_per_token`: attribute -> [V] mean number of routed experts a token with that value got
    (K for token choice without drops; under expert choice, where the experts spent their compute)
- `pools` (shared expert pools only): {`name`, `routers` {spatial, temporal}, `spatial_share` [E]
  (share of each expert's tokens that came from the spatial router), `kind_mi_over_h`, `kind_null`}
- `loss`: {`all`, `moving`, `static`} mean squared velocity error of the unablated model
- `ablations`: {`router`, `expert`, `loss`: {`all` | `moving` | `static`: {`base`, `ablated`, `change`,
  `relative`}}}: the same clips, noise and timesteps with that expert blocked in that router
- `overlay_time`: the diffusion time whose routing the overlay videos show
- `files`: {`report`, `figures` {name: path}, `overlays` {router: [paths]}} relative to the output folder
"""

NMI_NOTE = (
    "Specialisation is MI(expert; attribute) / H(attribute): the share of the attribute's uncertainty "
    "that knowing a token's top-1 expert removes (1 = the expert determines the attribute). Plain "
    "normalised mutual information is not enough: it also divides by the experts' entropy, so with 8 "
    "experts and 15% moving tokens, sending every moving token to one expert and spreading the rest "
    "gives NMI 0.45 while MI/H(motion) is 1. Every value is shown against two nulls: the attribute "
    "labels permuted between clips in whole-clip blocks (keeps the labels' spatial and temporal "
    "structure; mean ± std over the permutations, z-score and one-sided p-value), and a random router "
    "that draws expert ids i.i.d. from the observed load. The random router ignores that neighbouring "
    "tokens route alike, so its spread is narrower and its z-scores higher: read the permutation null first. "
    "Frame index and border position are the same in every clip, so only the random-router null applies to them."
)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _null_cell(observed: Optional[float], null: Optional[dict]) -> str:
    """'0.412 (null 0.010 ± 0.004, z 95)'."""
    if observed is None:
        return "–"
    if not null or null.get("mean") is None:
        return _fmt(observed)
    z = null.get("z")
    z_text = "∞" if z is None else f"{z:.1f}"
    return f"{observed:.3f} ({null['mean']:.3f} ± {null['std']:.3f}, z {z_text})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _image(title: str, path: Optional[str]) -> list[str]:
    return [f"![{title}]({path})", ""] if path else []


def _summary_section(metrics: dict) -> list[str]:
    """The few lines a reader needs first: collapse, where motion specialisation is, what ablation did."""
    layers = metrics["layers"]
    flagged = [f"`{layer['name']}`" for layer in layers if layer["collapsed"]]
    lines = ["## Summary", "", "- Collapsed routers: " + (", ".join(flagged) if flagged else "none") + "."]

    def motion_z(layer: dict) -> float:
        null = layer["null_mi_over_h"].get("motion") or {}
        return null.get("z") if null.get("z") is not None else float("-inf")

    ranked = sorted(layers, key=motion_z, reverse=True)[:3]
    lines.append("- Strongest motion specialisation (MI/H, permutation null): " + "; ".join(
        f"`{layer['name']}` {_null_cell(layer['mi_over_h'].get('motion'), layer['null_mi_over_h'].get('motion'))}"
        for layer in ranked) + ".")
    for pool in metrics.get("pools") or []:
        lines.append(f"- Shared pool `{pool['name']}`: MI(expert; spatial or temporal) / H = "
                     f"{_null_cell(pool['kind_mi_over_h'], pool['kind_null'])}.")
    for ab in metrics.get("ablations") or []:
        moving, static = ab["loss"]["moving"], ab["loss"]["static"]
        if moving["relative"] is not None and static["relative"] is not None:
            lines.append(f"- Blocking expert {ab['expert']} of `{ab['router']}` changes the loss by "
                         f"{moving['relative']:+.1%} on moving and {static['relative']:+.1%} on static pixels.")
    lines.append("")
    return lines


def _collapse_section(metrics: dict) -> list[str]:
    layers = metrics["layers"]
    flagged = [layer for layer in layers if layer["collapsed"]]
    rows = []
    for layer in layers:
        cos = layer.get("weight_cosine") or {}
        rows.append([
            f"`{layer['name']}`", layer["kind"], layer["tokens"], _fmt(layer["entropy_norm"], 2),
            _fmt(layer["top_share"], 2), _fmt(layer["cv"], 2), _fmt(layer["dropped"], 3),
            ", ".join(map(str, layer["dead_experts"])) or "none", _fmt(cos.get("mean"), 2), _fmt(cos.get("max"), 2),
            "**yes**: " + "; ".join(layer["collapse_reasons"]) if layer["collapsed"] else "no",
        ])
    lines = ["## Load and collapse", ""]
    lines.append(
        f"{len(flagged)} of {len(layers)} routers flagged as collapsed "
        f"(routing entropy / log E < {stats.COLLAPSE_ENTROPY_NORM}, top expert share > {stats.COLLAPSE_TOP_SHARE}, "
        f"or two experts' flattened weights with cosine > {stats.COLLAPSE_COSINE})."
        + ("" if not flagged else " Flagged: " + ", ".join(f"`{layer['name']}`" for layer in flagged) + ".")
    )
    lines.append("")
    lines += _table(["router", "kind", "tokens", "entropy/logE", "top share", "CV", "dropped", "dead experts",
                     "cos mean", "cos max", "collapsed"], rows)
    lines.append("")
    lines += _image("expert load", metrics["files"]["figures"].get("load"))
    return lines


def _describe_attribute(name: str, info: dict) -> str:
    """'**motion** (ground truth: static 85%, moving 15%)'."""
    if len(info["values"]) > 8:
        shares = f"{len(info['values'])} values"
    else:
        shares = ", ".join(f"{v} {s:.0%}" for v, s in zip(info["values"], info["shares"]))
    return f"**{name}** ({info['source']}: {shares})"


def _specialisation_section(metrics: dict) -> list[str]:
    attrs = list(metrics["attributes"])
    lines = ["## Specialisation", "", NMI_NOTE, ""]
    lines.append("Attributes: " + "; ".join(_describe_attribute(name, info)
                                            for name, info in metrics["attributes"].items()) + ".")
    lines.append("")
    lines.append("MI/H per router and attribute, with the permutation null (random-router null for frame "
                 "and border) as (mean ± std, z):")
    lines.append("")
    rows = []
    for layer in metrics["layers"]:
        row = [f"`{layer['name']}`"]
        for a in attrs:
            null = layer["null_mi_over_h"].get(a) or layer["random_router_mi_over_h"].get(a)
            row.append(_null_cell(layer["mi_over_h"].get(a), null))
        rows.append(row)
    lines += _table(["router"] + attrs, rows)
    lines.append("")
    lines += _image("specialisation", metrics["files"]["figures"].get("specialisation"))
    return lines


def _motion_section(metrics: dict) -> list[str]:
    lines = ["### Motion", ""]
    lines.append("Moving vs static tokens: MI/H with both nulls, and conditioned on the diffusion-time bucket "
                 "(MI(expert; motion | t bucket) / H(motion | t bucket)), which removes any effect of routing "
                 "that only follows the noise level.")
    lines.append("")
    rows = []
    for layer in metrics["layers"]:
        cond = layer["motion_given_time"]
        rows.append([
            f"`{layer['name']}`", _null_cell(layer["mi_over_h"].get("motion"), layer["null_mi_over_h"].get("motion")),
            _fmt((layer["null_mi_over_h"].get("motion") or {}).get("p")),
            _null_cell(layer["mi_over_h"].get("motion"), layer["random_router_mi_over_h"].get("motion")),
            _null_cell(cond["mi_over_h"], cond["null"]),
        ])
    lines += _table(["router", "MI/H (permutation null)", "p", "MI/H (random-router null)", "MI/H given t (null)"],
                    rows)
    lines.append("")
    num_experts = metrics["num_experts"]
    lines.append("Motion lift P(moving | expert) / P(moving) per expert (1 = no preference; "
                 "the largest possible is 1 / P(moving)):")
    lines.append("")
    rows = [[f"`{layer['name']}`"] + [_fmt(v, 2) for v in layer["motion_lift"]] for layer in metrics["layers"]]
    lines += _table(["router"] + [str(e) for e in range(num_experts)], rows)
    lines.append("")
    lines += _image("motion lift", metrics["files"]["figures"].get("motion_lift"))
    if metrics["router"] == "expert_choice":
        lines += _experts_per_token(metrics)
    lines += ["### Diffusion time", "", "P(expert | time bucket) per router:", ""]
    lines += _image("expert by time bucket", metrics["files"]["figures"].get("time_buckets"))
    return lines


def _experts_per_token(metrics: dict) -> list[str]:
    """Expert choice only: how many experts moving and static, object and background tokens got."""
    attrs = metrics["attributes"]
    columns = [(a, i, v) for a in ("motion", "foreground") if a in attrs for i, v in enumerate(attrs[a]["values"])]
    lines = ["Experts per token: under expert choice a token gets as many experts as pick it (on average "
             f"{metrics['top_k']}), so this shows where the experts spend their compute. (Every clip has one "
             "diffusion time and each expert picks within the clip, so per time bucket the mean is "
             f"{metrics['top_k']} by construction.)", ""]
    rows = [[f"`{layer['name']}`"] + [_fmt(layer["experts_per_token"][a][i], 2) for a, i, _ in columns]
            for layer in metrics["layers"]]
    return lines + _table(["router"] + [f"{a}: {v}" for a, _, v in columns], rows) + [""]


def _pool_section(metrics: dict) -> list[str]:
    pools = metrics.get("pools") or []
    if not pools:
        return []
    lines = ["## Shared expert pools", "",
             "Each block's spatial and temporal routers choose from one pool; the share of each expert's tokens "
             "that came from the spatial router shows whether experts became spatial or temporal specialists.", ""]
    rows = [[f"`{p['name']}`", _null_cell(p["kind_mi_over_h"], p["kind_null"]),
             " ".join(_fmt(s, 2) for s in p["spatial_share"])] for p in pools]
    lines += _table(["pool", "MI(expert; kind) / H(kind)", "spatial share per expert"], rows)
    lines.append("")
    lines += _image("spatial vs temporal share", metrics["files"]["figures"].get("pool_shares"))
    return lines


def _overlay_section(metrics: dict) -> list[str]:
    overlays = metrics["files"].get("overlays") or {}
    if not overlays:
        return []
    t = metrics.get("overlay_time")
    lines = ["## Overlays", "",
             f"Each clip (left) beside the same clip with every patch tinted by its top-1 expert (right), at t = {t}.",
             ""]
    lines += _image("expert colours", metrics["files"]["figures"].get("legend"))
    for router, paths in overlays.items():
        gif = next((p for p in paths if p.endswith(".gif")), None)
        links = ", ".join(f"[{Path(p).suffix[1:]}]({p})" for p in paths)
        lines += [f"`{router}` ({links})", ""] + _image(router, gif)
    return lines


def _ablation_section(metrics: dict) -> list[str]:
    ablations = metrics.get("ablations") or []
    if not ablations:
        return []
    lines = ["## Ablation", "",
             "The same clips, noise and timesteps with one expert blocked in one router "
             "(`router.blocked_experts`); mean squared velocity error per pixel, split by moving and static pixels.",
             ""]
    rows = []
    for ab in ablations:
        row = [f"`{ab['router']}`", str(ab["expert"])]
        for part in ("moving", "static", "all"):
            c = ab["loss"][part]
            row.append("–" if c["base"] is None else
                       f"{c['base']:.4f} → {c['ablated']:.4f} ({c['change']:+.4f}, {c['relative']:+.1%})")
        rows.append(row)
    lines += _table(["router", "expert", "moving", "static", "all"], rows)
    lines.append("")
    return lines


def _method_section(metrics: dict) -> list[str]:
    th = metrics["thresholds"]
    return ["## Method", "",
            "- Tokens: every clip is noised with fixed noise at t = "
            f"{', '.join(map(str, metrics['timesteps']))} and run "
            "through the model in eval mode; forward hooks on the routers record each token's experts and gates. "
            "The top-1 expert (highest gate) is used for specialisation; `load` counts every assignment.",
            f"- A patch is **moving** when at least {th['motion']:.0%} of its pixels (over the frames it covers) move: "
            "ground-truth motion masks for synthetic data; for real video, a pixel moves when it differs by more "
            f"than {th['frame_diff']} (0..1 scale) from the clip's per-pixel median over time.",
            f"- A patch belongs to the object covering most of it when that object covers at least {th['object']:.0%} "
            "of it (colour and shape of that object); otherwise it is background, a value of its own.",
            "- Time buckets: " + ", ".join(f"[{lo:g}, {hi:g})" for lo, hi in metrics["time_buckets"])
            + " (the last includes t = 1); border = the outer ring of patches.",
            f"- Nulls use {metrics['permutations']} permutations / random routers each.",
            ""]


def write_report(metrics: dict, out_dir: Path) -> Path:
    """Write ``out_dir``/report.md from ``metrics`` (paths in it are relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    head = [
        "# Expert specialisation report", "",
        f"Model `{metrics['model']}` on `{metrics['data']}`: {metrics['clips']} clips × {len(metrics['timesteps'])} "
        f"diffusion times, seed {metrics['seed']}. {metrics['num_experts']} experts, top-{metrics['top_k']} "
        f"{metrics['router']}, {metrics['expert_pool']} expert pool; {len(metrics['layers'])} routers: "
        + ", ".join(f"`{layer['name']}`" for layer in metrics["layers"]) + ".", "",
        f"Loss of the model on these tokens: all {_fmt(metrics['loss']['all'], 4)}, moving "
        f"{_fmt(metrics['loss']['moving'], 4)}, static {_fmt(metrics['loss']['static'], 4)}.", "",
    ]
    sections = [head, _summary_section(metrics), _collapse_section(metrics), _specialisation_section(metrics),
                _motion_section(metrics), _pool_section(metrics), _ablation_section(metrics),
                _overlay_section(metrics), _method_section(metrics), ["## metrics.json", "", METRICS_SCHEMA]]
    path = out_dir / "report.md"
    path.write_text("\n".join(line for section in sections for line in section) + "\n")
    return path
