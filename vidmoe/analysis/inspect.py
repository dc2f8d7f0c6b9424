"""``vidmoe inspect``: what did each expert learn to do?

Runs a trained model on clips noised at a few fixed diffusion times, records every token's
routing (:class:`~vidmoe.analysis.recorder.RoutingRecorder`), relates the top-1 expert to token
attributes (moving or static, object colour and shape, diffusion time, frame, border) against
permutation and random-router nulls, and writes to the output folder:

- ``metrics.json`` (schema: :data:`vidmoe.analysis.report.METRICS_SCHEMA`, also in report.md),
- ``report.md`` with tables and the figures embedded,
- ``figures/*.png``: load heatmap, specialisation heatmap, expert x time bucket, motion lift,
  spatial vs temporal share per expert (shared pools), overlay colour legend,
- ``overlays/*.mp4|gif``: each clip beside the same clip tinted by every patch's top-1 expert.

``--ablate LAYER:EXPERT`` blocks one expert in one router and reports how the velocity error on
moving and static pixels changes, with the same clips, noise and timesteps.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import UsageError, check_writable_dir
from . import figures, report, stats
from .recorder import Grid, LayerRecord, RoutingRecorder, grid_from_config

DEFAULT_DATA = "synthetic:bouncing_shapes"
DEFAULT_TIMESTEPS = (0.125, 0.375, 0.625, 0.875)  # one per time bucket
NUM_TIME_BUCKETS = 4
OVERLAY_CLIPS = 4  # clips shown per overlay video
SCHEMA_VERSION = 1


@dataclass
class AttributeInfo:
    """How one token attribute is defined: the names of its values, its source, which null applies."""

    values: list[str]
    source: str  # ground truth | frame difference | position | diffusion time
    permutable: bool  # differs between clips, so the clip-block permutation null applies


# ---------------------------------------------------------------- token attributes


def _names(table: Sequence[str], count: int, fallback: str) -> list[str]:
    """Names of palette / shape indices 0..count-1 ("color 9" past the end of the table)."""
    return [table[i] if i < len(table) else f"{fallback} {i}" for i in range(count)]


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def clip_attributes(items: Sequence[dict], grid: Grid, motion_threshold: float = stats.MOTION_THRESHOLD
                    ) -> tuple[dict[str, np.ndarray], dict[str, AttributeInfo]]:
    """Per-clip attribute volumes (codes [clips, T', H', W']) from dataset items, and their definitions.

    Synthetic items (with ``motion_mask``) give ground-truth motion, foreground, colour and shape;
    other clips give motion estimated from frame differences against the clip's median frame.
    """
    synthetic = all("motion_mask" in item for item in items)
    motion = []
    for item in items:
        mask = _numpy(item["motion_mask"]) if synthetic else stats.estimate_motion(_numpy(item["video"]))
        motion.append(stats.moving_patches(mask, grid, motion_threshold))
    volumes = {"motion": np.stack(motion).astype(np.int64)}
    infos = {"motion": AttributeInfo(["static", "moving"], "ground truth" if synthetic else "frame difference", True)}
    if not synthetic:
        return volumes, infos
    from vidmoe.data.synthetic import PALETTE, SHAPES

    objects = [stats.patch_objects(_numpy(item["object_mask"]), grid, len(_numpy(item["colors"])))
               for item in items]  # [T', H', W'] each: 0 background, i+1 object i
    volumes["foreground"] = np.stack([o > 0 for o in objects]).astype(np.int64)
    infos["foreground"] = AttributeInfo(["background", "object"], "ground truth", True)
    for name, key, table in (("color", "colors", list(PALETTE)), ("shape", "shapes", list(SHAPES))):
        per_object = [_numpy(item[key]).astype(np.int64) for item in items]  # [max objects] palette/shape index
        count = max(len(table), 1 + max(int(p.max(initial=0)) for p in per_object))
        # code 0 is the background, code i+1 the palette / shape index i
        volumes[name] = np.stack([np.concatenate([[0], p + 1])[o] for p, o in zip(per_object, objects)])
        infos[name] = AttributeInfo(["background"] + _names(table, count, name), "ground truth", True)
    return volumes, infos


def position_attribute_infos(grid: Grid) -> dict[str, AttributeInfo]:
    """Attributes read from the token's own coordinates and diffusion time."""
    edges = np.linspace(0, 1, NUM_TIME_BUCKETS + 1)
    return {
        "time": AttributeInfo([f"t {lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])], "diffusion time", True),
        "frame": AttributeInfo([str(f) for f in range(grid[0])], "position", False),
        "border": AttributeInfo(["interior", "border"], "position", False),
    }


def token_attributes(record: LayerRecord, volumes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Codes [N] of every attribute for the tokens of one router's record."""
    clip, frame, row, col = (a.astype(np.int64) for a in (record.clip, record.frame, record.row, record.col))
    out = {name: volume[clip, frame, row, col] for name, volume in volumes.items()}
    out["time"] = stats.time_bucket(record.time.astype(np.float64), NUM_TIME_BUCKETS)
    out["frame"] = frame
    out["border"] = stats.border_grid(*record.grid[1:])[row, col].astype(np.int64)
    return out


# ---------------------------------------------------------------- statistics per router


def analyse_layer(record: LayerRecord, attributes: dict[str, np.ndarray], infos: dict[str, AttributeInfo],
                  perms: Sequence[np.ndarray], rng: np.random.Generator, slots_per_token: Optional[int],
                  expert_weights: Optional[np.ndarray] = None) -> dict:
    """Load, collapse and specialisation statistics of one router (one ``layers`` entry of metrics.json)."""
    num_experts = record.num_experts
    top1 = record.top1.astype(np.int64)
    load = stats.load_stats(record.expert, top1, num_experts, slots_per_token)
    cosine = stats.weight_cosine(expert_weights) if expert_weights is not None else {"mean": None, "max": None}
    reasons = stats.collapse_reasons(load, cosine["max"])
    entry = {"name": record.name, "kind": record.kind, "pool": None, "tokens": record.num_tokens,
             "assignments": int(len(record.expert)), **load.to_dict(),
             "router_entropy": float(record.router_entropy.astype(np.float64).mean()),
             "weight_cosine": cosine, "collapsed": bool(reasons), "collapse_reasons": reasons,
             "mi_over_h": {}, "null_mi_over_h": {}, "random_router_mi_over_h": {}, "lift": {}}
    for name, codes in attributes.items():
        info = infos[name]
        result = stats.specialisation(top1, codes, num_experts, len(info.values), record.block_size,
                                      perms if info.permutable else None, rng, len(perms))
        entry["mi_over_h"][name] = result["mi_over_h"]
        entry["null_mi_over_h"][name] = result["null"]
        entry["random_router_mi_over_h"][name] = result["random_router"]
        entry["lift"][name] = {"values": info.values, "lift": result["lift"], "null_mean": result["lift_null_mean"],
                               "null_std": result["lift_null_std"]}
    given_time = stats.specialisation(top1, attributes["motion"], num_experts, 2, record.block_size, perms, rng,
                                      len(perms), cond=attributes["time"])
    entry["motion_given_time"] = {"mi_over_h": given_time["mi_over_h"], "null": given_time["null"],
                                  "random_router": given_time["random_router"]}
    entry["motion_lift"] = [row[1] for row in entry["lift"]["motion"]["lift"]]
    # Token choice gives every token K experts (fewer after capacity drops); expert choice gives a token
    # as many as pick it, so this is where its experts spend their compute.
    per_token = np.bincount(record.token.astype(np.int64), minlength=record.num_tokens).astype(np.float64)
    entry["experts_per_token"] = {name: stats.nan_to_none(stats.mean_by_value(per_token, codes, len(infos[name].values)))
                                  for name, codes in attributes.items()}
    routed = top1 >= 0
    shares = stats.conditional_shares(top1[routed], attributes["time"][routed], num_experts, NUM_TIME_BUCKETS)
    entry["expert_time_share"] = stats.nan_to_none(shares)
    return entry


def analyse_pool(name: str, spatial: LayerRecord, temporal: LayerRecord, permutations: int,
                 rng: np.random.Generator) -> dict:
    """A shared pool: which experts the spatial vs the temporal router uses, against a block permutation null."""
    num_experts = spatial.num_experts
    s_counts = np.bincount(spatial.expert.astype(np.int64), minlength=num_experts).astype(np.float64)
    t_counts = np.bincount(temporal.expert.astype(np.int64), minlength=num_experts).astype(np.float64)
    with np.errstate(invalid="ignore"):
        spatial_share = s_counts / (s_counts + t_counts)
    expert = np.concatenate([spatial.top1, temporal.top1]).astype(np.int64)
    kind = np.concatenate([np.zeros(spatial.num_tokens, np.int64), np.ones(temporal.num_tokens, np.int64)])
    block = spatial.block_size
    perms = stats.block_permutations(len(kind) // block, permutations, rng)
    result = stats.specialisation(expert, kind, num_experts, 2, block, perms, rng, 0)
    return {"name": name, "routers": {"spatial": spatial.name, "temporal": temporal.name},
            "spatial_share": stats.nan_to_none(spatial_share), "kind_mi_over_h": result["mi_over_h"],
            "kind_null": result["null"]}


# ---------------------------------------------------------------- model and data


def router_pools(model) -> dict[str, tuple[str, np.ndarray]]:
    """Router name -> (pool name, expert weights [E, F]). Routers sharing an expert pool share the pool name."""
    by_router = {id(moe.router): (name, moe) for name, moe in model.moe_layers()}
    routers = [(name, by_router[id(module)]) for name, _, module in model.routers() if id(module) in by_router]
    members: dict[int, list[str]] = {}
    for name, (_, moe) in routers:
        members.setdefault(id(moe.experts), []).append(name)
    out = {}
    for name, (moe_name, moe) in routers:
        group = members[id(moe.experts)]
        out[name] = (_common_prefix(group) if len(group) > 1 else moe_name, _expert_weights(moe))
    return out


def _common_prefix(names: Sequence[str]) -> str:
    """'blocks.0.spatial', 'blocks.0.temporal' -> 'blocks.0'."""
    parts = [n.split(".") for n in names]
    prefix = []
    for column in zip(*parts):
        if len(set(column)) > 1:
            break
        prefix.append(column[0])
    return ".".join(prefix) or names[0]


def _expert_weights(moe) -> np.ndarray:
    """[E, F] the flattened SwiGLU weights of each expert."""
    experts = moe.experts
    w_in = experts.w_in.detach().float().cpu().flatten(1)  # [E, D*2H]
    w_out = experts.w_out.detach().float().cpu().flatten(1)  # [E, H*D]
    return torch.cat([w_in, w_out], dim=1).numpy()


def parse_ablations(specs: Union[None, str, Sequence[str]], routers: dict[str, object], num_experts: int
                    ) -> list[tuple[str, int]]:
    """'blocks.0.spatial:3' -> [('blocks.0.spatial', 3)], checked against the model."""
    if specs is None:
        return []
    out = []
    for spec in [specs] if isinstance(specs, str) else specs:
        layer, sep, expert = spec.rpartition(":")
        if not sep or not expert.strip().isdigit():
            raise UsageError(f"--ablate {spec!r} is not LAYER:EXPERT (e.g. {next(iter(routers))}:0)")
        if layer not in routers:
            raise UsageError(f"--ablate: unknown router {layer!r}; the model's routers are {', '.join(routers)}")
        e = int(expert)
        if not 0 <= e < num_experts:
            raise UsageError(f"--ablate {spec}: expert {e} out of range; the model has {num_experts} experts "
                             f"(0-{num_experts - 1})")
        out.append((layer, e))
    return out


def select_layers(names: Optional[Sequence[str]], routers: Sequence[str]) -> list[str]:
    """Routers whose overlays to draw: exact names or block prefixes ('blocks.3'); default first and last."""
    if not names:
        return list(dict.fromkeys([routers[0], routers[-1]]))
    chosen = []
    for name in names:
        matches = [r for r in routers if r == name or r.startswith(name + ".")]
        if not matches:
            raise UsageError(f"--layers: no router named {name!r}; the model's routers are {', '.join(routers)}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def load_clips(cfg, data: str, clips: int) -> list[dict]:
    """The first ``clips`` items of ``data``'s eval split, with the model's frame size and length."""
    from vidmoe.data import build_dataset

    cfg = replace(cfg, data=replace(cfg.data, source=data, eval_source=None))
    dataset = build_dataset(cfg, split="eval")
    if len(dataset) == 0:
        raise UsageError(f"--data {data}: no usable clips")
    return [dataset[i] for i in range(min(clips, len(dataset)))]


@dataclass
class _LossSums:
    """Running sums of squared velocity error over moving and static pixels."""

    moving: float = 0.0
    static: float = 0.0
    n_moving: int = 0
    n_static: int = 0

    def add(self, err: torch.Tensor, moving: torch.Tensor) -> None:
        self.moving += float(err[moving].sum())
        self.static += float(err[~moving].sum())
        self.n_moving += int(moving.sum())
        self.n_static += int((~moving).sum())

    def means(self) -> dict:
        total = self.n_moving + self.n_static
        return {"all": (self.moving + self.static) / total if total else None,
                "moving": self.moving / self.n_moving if self.n_moving else None,
                "static": self.static / self.n_static if self.n_static else None}


def run_model(model, vae, items: Sequence[dict], cfg, timesteps: Sequence[float], ablations: Sequence[tuple[str, int]],
              seed: int, batch_size: int = 4, precision: str = "auto", progress: bool = True,
              motion_threshold: float = stats.MOTION_THRESHOLD) -> tuple[dict[str, LayerRecord], _LossSums, list]:
    """Forward every clip at every timestep (fixed noise per clip), recording routing and velocity errors.

    Each ablation reruns the same inputs with one expert blocked in one router (not recorded).
    Returns (records, unablated loss sums, loss sums per ablation).
    """
    from vidmoe.data import collate
    from vidmoe.diffusion import flow_loss
    from vidmoe.precision import autocast_dtype, resolve_mixed_precision
    from vidmoe.train import model_inputs

    device = next(model.parameters()).device
    dtype = autocast_dtype(resolve_mixed_precision(precision, device.type))
    routers = {name: module for name, _, module in model.routers()}
    mc = cfg.model
    latent_size = (mc.num_frames, *mc.latent_size)
    base, ablated = _LossSums(), [_LossSums() for _ in ablations]
    batches = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    model.eval()
    bar = tqdm(total=len(batches) * len(timesteps) * (1 + len(ablations)), desc="inspect", unit="pass",
               disable=not progress)
    # fork_rng: the seeded noise (and VAE sampling) must not disturb the caller's random state
    with RoutingRecorder(model, grid=grid_from_config(mc)) as recorder, torch.no_grad(), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for clip_ids in batches:
            x0, labels, captions = model_inputs(collate([items[i] for i in clip_ids]), mc, device, vae)
            noise = torch.randn(x0.shape).to(device)  # the same noise for every timestep and ablation
            moving = _moving_latents(items, clip_ids, latent_size, motion_threshold).to(device)
            for t in timesteps:
                tt = torch.full((len(clip_ids),), float(t), device=device)

                def squared_error() -> torch.Tensor:
                    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        _, out = flow_loss(model, x0, tt, noise, labels=labels, captions=captions)
                    error = (out.sample.float() - (noise - x0).float()).square().mean(1)  # [B, T, h, w]
                    return error if out.loss_weight is None else error * out.loss_weight.view(-1, 1, 1, 1)

                recorder.set_batch(clip_ids, tt)
                base.add(squared_error(), moving)
                bar.update()
                for (name, expert), sums in zip(ablations, ablated):
                    router = routers[name]
                    previous = set(router.blocked_experts)
                    router.blocked_experts = previous | {expert}
                    try:
                        with recorder.paused():
                            sums.add(squared_error(), moving)
                    finally:
                        router.blocked_experts = previous
                    bar.update()
    bar.close()
    return recorder.records(), base, ablated


def _moving_latents(items: Sequence[dict], clip_ids: Sequence[int], size: tuple[int, int, int],
                    threshold: float) -> torch.Tensor:
    """Moving mask at the resolution the model predicts (pixels, or VAE latent pixels): bool [B, T, h, w]."""
    masks = []
    for i in clip_ids:
        item = items[i]
        mask = _numpy(item["motion_mask"]) if "motion_mask" in item else stats.estimate_motion(_numpy(item["video"]))
        masks.append(stats.moving_patches(mask, size, threshold))
    return torch.from_numpy(np.stack(masks))


# ---------------------------------------------------------------- outputs


def _overlay_grid(record: LayerRecord, clip: int, time: float) -> np.ndarray:
    """Top-1 expert grid [T', H', W'] of one clip at one diffusion time."""
    pick = (record.clip == clip) & (record.time == np.float16(time))
    grid = np.full(record.grid, -1, dtype=np.int64)
    grid[record.frame[pick], record.row[pick], record.col[pick]] = record.top1[pick]
    return grid


def _file_stem(name: str) -> str:
    return name.replace(".", "_").replace("/", "_")


def write_figures(metrics: dict, out: Path) -> dict[str, str]:
    """All report figures; returns name -> path relative to ``out``."""
    layers = metrics["layers"]
    names = [layer["name"] for layer in layers]
    fig_dir = out / "figures"
    paths = {
        "load": figures.plot_load_heatmap(fig_dir / "load.png", names, [layer["load"] for layer in layers]),
        "specialisation": figures.plot_specialisation(
            fig_dir / "specialisation.png", names, list(metrics["attributes"]),
            [[np.nan if layer["mi_over_h"][a] is None else layer["mi_over_h"][a] for a in metrics["attributes"]]
             for layer in layers]),
        "time_buckets": figures.plot_time_buckets(
            fig_dir / "time_buckets.png", names,
            [np.array(layer["expert_time_share"], dtype=np.float64) for layer in layers],
            metrics["attributes"]["time"]["values"]),
        "motion_lift": figures.plot_motion_lift(
            fig_dir / "motion_lift.png", names, [layer["motion_lift"] for layer in layers],
            [_column(layer["lift"]["motion"]["null_mean"], 1) for layer in layers],
            [_column(layer["lift"]["motion"]["null_std"], 1) for layer in layers]),
    }
    paths["legend"] = figures.plot_expert_legend(fig_dir / "legend.png", figures.expert_colors(metrics["num_experts"]))
    if metrics["pools"]:
        paths["pool_shares"] = figures.plot_pool_shares(
            fig_dir / "pool_shares.png", [p["name"] for p in metrics["pools"]],
            [p["spatial_share"] for p in metrics["pools"]])
    return {key: str(path.relative_to(out)) for key, path in paths.items()}


def _column(matrix: Optional[list], j: int) -> Optional[list]:
    return None if matrix is None else [row[j] for row in matrix]


def _clean(x):
    """NaN / inf -> None recursively (json has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def inspect(model_dir: Union[str, Path], data: str = DEFAULT_DATA, out: Union[str, Path] = "report", clips: int = 8,
            layers: Optional[Sequence[str]] = None, ablate: Union[None, str, Sequence[str]] = None, seed: int = 0,
            timesteps: Optional[Sequence[float]] = None, batch_size: int = 4, permutations: int = 20,
            precision: str = "auto", progress: bool = True) -> Path:
    """Analyse what each expert of the model in ``model_dir`` learned; returns the output folder.

    ``data``: "synthetic:NAME", a video folder or a prepared cache (its eval split is used);
    ``layers``: routers (or block prefixes such as "blocks.3") to draw overlay videos for,
    default the first and the last; all routers are analysed. ``ablate``: "ROUTER:EXPERT"
    (or a list of them). ``timesteps``: diffusion times in [0, 1] (default one per time bucket).
    ``precision``: auto | bf16 | fp16 | no (autocast for the forward passes).
    Writes metrics.json, report.md, figures/ and overlays/ (see the module docstring).
    """
    from vidmoe.generate import load_model_dir

    if clips < 1 or batch_size < 1:
        raise UsageError(f"--clips and --batch-size must be at least 1; got {clips} and {batch_size}")
    if permutations < 2:
        raise UsageError(f"--permutations must be at least 2 (the nulls need a spread); got {permutations}")
    timesteps = [float(t) for t in (timesteps or DEFAULT_TIMESTEPS)]
    if any(not 0.0 <= t <= 1.0 for t in timesteps):
        raise UsageError(f"--timesteps must lie in [0, 1] (1 is pure noise); got {timesteps}")
    check_writable_dir(out, "--out")
    model, cfg, vae = load_model_dir(model_dir)
    router_list = list(model.routers())
    if not router_list:
        raise UsageError(f"{model_dir}: the model has no MoE layers (model.ffn={cfg.model.ffn}); nothing to inspect")
    router_names = [name for name, _, _ in router_list]
    moe = cfg.model.moe
    ablations = parse_ablations(ablate, dict.fromkeys(router_names), moe.num_experts)
    overlay_layers = select_layers(layers, router_names)
    items = load_clips(cfg, data, clips)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    records, base, ablated = run_model(model, vae, items, cfg, timesteps, ablations, seed, batch_size, precision,
                                       progress)
    metrics = {
        "schema_version": SCHEMA_VERSION, "model": str(model_dir), "data": data, "clips": len(items),
        "timesteps": timesteps, "seed": seed, "permutations": permutations,
        "num_experts": moe.num_experts, "top_k": moe.top_k, "router": moe.router, "expert_pool": moe.expert_pool,
        **analyse(cfg, records, items, router_names, router_pools(model), permutations, seed),
        "loss": base.means(),
        "ablations": [{"router": name, "expert": expert, "loss": _loss_change(base.means(), sums.means())}
                      for (name, expert), sums in zip(ablations, ablated)],
        "overlay_time": min(timesteps, key=lambda t: (abs(t - 0.5), t)),  # mid noise, ties to the cleaner
    }
    metrics = _clean(metrics)
    metrics["files"] = {"report": "report.md", "figures": write_figures(metrics, out),
                        "overlays": write_overlays(records, items, overlay_layers, metrics, out, cfg.sample.fps)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    report.write_report(metrics, out)
    return out


def analyse(cfg, records: dict[str, LayerRecord], items: Sequence[dict], router_names: Sequence[str],
            pools: dict[str, tuple[str, np.ndarray]], permutations: int, seed: int) -> dict:
    """The data-dependent part of metrics.json: grid, attributes, thresholds, ``layers`` and ``pools``.

    ``pools``: router name -> (pool name, expert weights [E, F]) as from :func:`router_pools`.
    """
    moe = cfg.model.moe
    grid = grid_from_config(cfg.model)
    volumes, infos = clip_attributes(items, grid)
    infos.update(position_attribute_infos(grid))
    rng = np.random.default_rng(seed)
    num_blocks = records[router_names[0]].num_tokens // int(np.prod(grid))
    perms = stats.block_permutations(num_blocks, permutations, rng)
    slots = moe.top_k if moe.router == "token_choice" else None
    layers, shares = [], {}
    for name in router_names:
        record = records[name]
        attributes = token_attributes(record, volumes)
        pool = pools.get(name)
        entry = analyse_layer(record, attributes, infos, perms, rng, slots, pool[1] if pool else None)
        entry["pool"] = pool[0] if pool else None
        layers.append(entry)
        # every router sees the same tokens, so the attribute shares are the same for all
        shares = {a: (np.bincount(codes, minlength=len(infos[a].values)) / len(codes)).tolist()
                  for a, codes in attributes.items()}
    pool_metrics = []
    if moe.expert_pool == "shared":
        members: dict[str, dict[str, str]] = {}
        for entry in layers:
            members.setdefault(entry["pool"], {})[entry["kind"]] = entry["name"]
        for pool_name, kinds in members.items():
            if {"spatial", "temporal"} <= set(kinds):
                pool_metrics.append(analyse_pool(pool_name, records[kinds["spatial"]], records[kinds["temporal"]],
                                                 permutations, rng))
    edges = np.linspace(0, 1, NUM_TIME_BUCKETS + 1)
    mc = cfg.model
    return {
        "grid": list(grid),
        "patch_pixels": [mc.num_frames // grid[0], mc.frame_size[0] // grid[1], mc.frame_size[1] // grid[2]],
        "time_buckets": [[float(lo), float(hi)] for lo, hi in zip(edges[:-1], edges[1:])],
        "thresholds": {"motion": stats.MOTION_THRESHOLD, "object": stats.OBJECT_THRESHOLD,
                       "frame_diff": stats.FRAME_DIFF_THRESHOLD, "collapse_entropy_norm": stats.COLLAPSE_ENTROPY_NORM,
                       "collapse_top_share": stats.COLLAPSE_TOP_SHARE, "collapse_cosine": stats.COLLAPSE_COSINE},
        "attributes": {a: {"values": info.values, "shares": shares[a], "source": info.source,
                           "permutation_null": info.permutable} for a, info in infos.items()},
        "layers": layers, "pools": pool_metrics,
    }


def write_overlays(records: dict[str, LayerRecord], items: Sequence[dict], layers: Sequence[str], metrics: dict,
                   out: Path, fps: int) -> dict[str, list[str]]:
    """Overlay videos (mp4 + gif) of the first clips for each router in ``layers``; router -> paths."""
    colors = figures.expert_colors(metrics["num_experts"])
    shown = list(range(min(OVERLAY_CLIPS, len(items))))
    frames = [figures.to_uint8_frames(_numpy(items[i]["video"])) for i in shown]
    paths = {}
    for name in layers:
        grids = [_overlay_grid(records[name], i, metrics["overlay_time"]) for i in shown]
        written = figures.write_overlay(out / "overlays" / _file_stem(name), frames, grids, colors, fps=fps)
        paths[name] = [str(p.relative_to(out)) for p in written]
    return paths


def _loss_change(base: dict, ablated: dict) -> dict:
    out = {}
    for part in ("all", "moving", "static"):
        b, a = base[part], ablated[part]
        if b is None or a is None:
            out[part] = {"base": b, "ablated": a, "change": None, "relative": None}
        else:
            out[part] = {"base": b, "ablated": a, "change": a - b, "relative": (a - b) / b if b else None}
    return out


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a trained model folder (runs/NAME/model)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help=f"synthetic:NAME, a video folder or a prepared cache (default {DEFAULT_DATA})")
    parser.add_argument("--out", default="report", help="output folder (default: report)")
    parser.add_argument("--clips", type=int, default=8, help="clips from the data's eval split (default 8)")
    parser.add_argument("--layers", nargs="+", metavar="NAME",
                        help="routers (or blocks, e.g. blocks.3) to draw overlay videos for; default first and last")
    parser.add_argument("--timesteps", nargs="+", type=float, metavar="T",
                        help=f"diffusion times in [0, 1] (default {' '.join(map(str, DEFAULT_TIMESTEPS))})")
    parser.add_argument("--seed", type=int, default=0, help="noise and permutation seed")
    parser.add_argument("--ablate", action="append", metavar="LAYER:EXPERT",
                        help="block one expert in one router and report the loss change (repeatable)")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per forward pass (default 4)")
    parser.add_argument("--permutations", type=int, default=20,
                        help="permutations and random routers per null (default 20)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "no"],
                        help="autocast for the forward passes (default auto: bf16 where the hardware is fast at it)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    out = inspect(args.model, data=args.data, out=args.out, clips=args.clips, layers=args.layers, ablate=args.ablate,
                  seed=args.seed, timesteps=args.timesteps, batch_size=args.batch_size,
                  permutations=args.permutations, precision=args.precision, progress=not args.no_progress)
    print(f"wrote {out / 'report.md'} and {out / 'metrics.json'}")
    return 0
