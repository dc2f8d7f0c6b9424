"""Routing statistics, the recorder, figures, overlays and the report, without a trained model."""

import json

import av
import numpy as np
import pytest
import torch

from vidmoe.analysis import figures, report, stats
from vidmoe.analysis.inspect import analyse, clip_attributes, write_figures, write_overlays
from vidmoe.analysis.recorder import LayerRecord, RoutingRecorder, top1_of
from vidmoe.config import MoEConfig, load_config

E = 8


def _motion_labels(rng, num_blocks=40, block=64, share=0.15):
    """Block-structured motion labels: each block (clip) has its own moving region."""
    labels = np.zeros((num_blocks, block), dtype=np.int64)
    for b in range(num_blocks):
        start = rng.integers(0, block)
        labels[b, (start + np.arange(int(share * block))) % block] = 1
    return labels.ravel()


def test_perfect_motion_routing_gives_mi_over_h_one_and_lift_one_over_p():
    rng = np.random.default_rng(0)
    moving = _motion_labels(rng)
    expert = np.where(moving == 1, 0, rng.integers(1, E, size=len(moving)))
    assert stats.mi_over_h(expert, moving) == pytest.approx(1.0, abs=1e-9)
    lift = stats.lift(expert, moving, E, 2)
    p_moving = moving.mean()
    assert lift[0, 1] == pytest.approx(1 / p_moving)
    assert np.allclose(lift[1:, 1], 0.0)
    # the report's claim: plain NMI is far from 1 for the same perfect routing
    assert stats.nmi(expert, moving) == pytest.approx(0.45, abs=0.03)


def test_perfect_routing_is_far_outside_both_nulls():
    rng = np.random.default_rng(1)
    moving = _motion_labels(rng)
    expert = np.where(moving == 1, 0, rng.integers(1, E, size=len(moving)))
    perms = stats.block_permutations(40, 20, rng)
    result = stats.specialisation(expert, moving, E, 2, 64, perms, rng, 20)
    assert result["mi_over_h"] == pytest.approx(1.0)
    assert result["null"]["mean"] < 0.2 and result["null"]["p"] == pytest.approx(1 / 21)
    assert result["random_router"]["mean"] < 0.05
    assert result["null"]["z"] is None or result["null"]["z"] > 10
    assert result["lift"][0][1] == pytest.approx(1 / moving.mean())


def test_random_routing_lies_inside_the_null_spread():
    rng = np.random.default_rng(2)
    moving = _motion_labels(rng)
    expert = rng.integers(0, E, size=len(moving))
    perms = stats.block_permutations(40, 20, rng)
    result = stats.specialisation(expert, moving, E, 2, 64, perms, rng, 20)
    for null in (result["null"], result["random_router"]):
        assert abs(result["mi_over_h"] - null["mean"]) < 3 * null["std"]
    assert result["mi_over_h"] < 0.05


def test_block_permutation_moves_whole_blocks():
    attr = np.repeat(np.arange(5), 3)  # block b is all b
    out = stats.permute_blocks(attr, 3, np.array([4, 3, 2, 1, 0]))
    assert out.tolist() == np.repeat([4, 3, 2, 1, 0], 3).tolist()
    perms = stats.block_permutations(5, 10, np.random.default_rng(0))
    assert all(not np.array_equal(p, np.arange(5)) for p in perms)


def test_motion_given_time_removes_routing_that_only_follows_time():
    rng = np.random.default_rng(3)
    n = 8000
    time = rng.integers(0, 4, size=n)
    moving = (rng.random(n) < np.array([0.05, 0.1, 0.3, 0.6])[time]).astype(np.int64)  # motion share varies with t
    by_time = time * 2  # experts follow the noise level only
    assert stats.mi_over_h(by_time, moving) > 0.05
    assert stats.mi_over_h(by_time, moving, cond=time) == pytest.approx(0.0, abs=1e-9)
    by_motion = moving + 2 * time
    assert stats.mi_over_h(by_motion, moving, cond=time) == pytest.approx(1.0)


def test_load_stats_and_collapse_flags():
    top1 = np.zeros(100, dtype=np.int64)
    collapsed = stats.load_stats(np.zeros(200, dtype=np.int64), top1, 4, slots_per_token=2)
    assert collapsed.load.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert collapsed.entropy == 0.0 and collapsed.entropy_norm == 0.0 and collapsed.top_share == 1.0
    assert collapsed.dead_experts == [1, 2, 3] and collapsed.dropped == 0.0
    assert len(stats.collapse_reasons(collapsed, None)) == 2

    assigned = np.arange(180) % 4  # 180 of 200 slots: 10% dropped by capacity
    top1 = np.r_[np.arange(90) % 4, -np.ones(10, dtype=np.int64)]
    balanced = stats.load_stats(assigned, top1, 4, slots_per_token=2)
    assert balanced.load.sum() == pytest.approx(1.0) and balanced.entropy_norm == pytest.approx(1.0)
    assert balanced.cv == pytest.approx(0.0) and balanced.dropped == pytest.approx(0.1)
    assert balanced.unrouted == pytest.approx(0.1)
    assert stats.collapse_reasons(balanced, 0.1) == []

    weights = np.random.default_rng(0).normal(size=(4, 50))
    assert stats.weight_cosine(weights)["max"] < 0.9
    same = np.repeat(weights[:1], 4, axis=0)
    cos = stats.weight_cosine(same)
    assert cos["mean"] == pytest.approx(1.0) and cos["max"] == pytest.approx(1.0)
    assert any("cosine" in r for r in stats.collapse_reasons(balanced, cos["max"]))


def test_patch_pooling_and_motion_estimate():
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[:, 0:2, 0:1] = True  # 2 of 16 pixels of patch (0, 0): 12.5%
    mask[:, 4:8, 4:6] = True  # 8 of 16 pixels of patch (1, 1): 50%
    moving = stats.moving_patches(mask, (2, 2, 2), threshold=0.25)
    assert moving[:, 0, 0].tolist() == [False, False] and moving[:, 1, 1].tolist() == [True, True]
    assert moving.sum() == 2

    objects = np.zeros((1, 8, 8), dtype=np.uint8)  # patches of 4x4 pixels
    objects[0, :4, :4] = 2  # object 1 fills patch (0, 0)
    objects[0, 4:6, 4:6] = 1  # object 0 covers a quarter of patch (1, 1): at the threshold
    objects[0, 0, 4:6] = 1  # and an eighth of patch (0, 1): below it, so background
    assert stats.patch_objects(objects, (1, 2, 2), 2).tolist() == [[[2, 0], [0, 1]]]

    video = -np.ones((3, 6, 8, 8), dtype=np.float32)  # dark clip with a bright pixel moving right
    for t in range(6):
        video[:, t, 3, t] = 1.0
    estimate = stats.estimate_motion(video)
    assert estimate.sum() == 6 and all(estimate[t, 3, t] for t in range(6))
    assert stats.time_bucket(np.array([0.0, 0.24, 0.25, 0.99, 1.0]), 4).tolist() == [0, 0, 1, 3, 3]
    assert stats.border_grid(3, 4).sum() == 10


class _ToyModel(torch.nn.Module):
    """Two MoE feed-forwards on a [B, T', H', W'] token grid: enough model for the recorder."""

    def __init__(self):
        super().__init__()
        from vidmoe.moe import MoEFeedForward

        cfg = MoEConfig(num_experts=4, top_k=2)
        self.a = MoEFeedForward(16, 8, cfg)
        self.b = MoEFeedForward(16, 8, cfg)

    def routers(self):
        return [("blocks.0.spatial", "spatial", self.a.router), ("blocks.0.temporal", "temporal", self.b.router)]

    def forward(self, x):
        return self.b(self.a(x)[0])[0]


def test_recorder_collects_coordinates_top1_and_removes_hooks():
    torch.manual_seed(0)
    model = _ToyModel().eval()
    grid = (2, 3, 4)
    seen = []
    model.a.router.register_forward_hook(lambda m, i, out: seen.append(out))
    with RoutingRecorder(model, grid=grid) as rec, torch.no_grad():
        for clips, t in (([0, 1], 0.1), ([2], 0.9)):
            rec.set_batch(clips, t)
            model(torch.randn(len(clips), *grid, 16))
    model(torch.randn(1, *grid, 16))  # after exit: not recorded
    assert len(model.a.router._forward_hooks) == 1 and len(model.b.router._forward_hooks) == 0
    records = rec.records()
    assert set(records) == {"blocks.0.spatial", "blocks.0.temporal"}
    r = records["blocks.0.spatial"]
    assert r.kind == "spatial" and r.num_experts == 4 and r.num_tokens == 3 * 24 and len(r.expert) == 2 * 3 * 24
    assert r.top1.dtype == np.int16 and r.gate.dtype == np.float16
    assert r.clip.tolist() == [0] * 24 + [1] * 24 + [2] * 24
    assert r.time[:48].tolist() == [np.float16(0.1)] * 48 and r.time[48] == np.float16(0.9)
    # token n of the first pass sits at (b, t, y, x) = unravel(n, (B, T', H', W'))
    b, f, y, x = np.unravel_index(np.arange(48), (2,) + grid)
    assert r.frame[:48].tolist() == f.tolist() and r.row[:48].tolist() == y.tolist()
    assert r.col[:48].tolist() == x.tolist()
    out = seen[0]
    expected = out.probs.argmax(-1).numpy()  # renormalised top-2 gates keep the softmax order
    assert r.top1[:48].tolist() == expected.tolist()
    assert r.token[:96].max() == 47 and r.token[96:].min() == 48  # each pass's assignments point at its tokens


def test_top1_prefers_highest_gate_and_marks_unrouted():
    top1, gate = top1_of(np.array([0, 0, 2]), np.array([3, 1, 2]), np.array([0.3, 0.7, 0.5], np.float32), 3)
    assert top1.tolist() == [1, -1, 2] and gate.tolist() == pytest.approx([0.7, 0.0, 0.5])


def _synthetic_items(num_clips, frames=4, size=8):
    """Dataset-like items: one object moving right along a row."""
    items = []
    for c in range(num_clips):
        obj = np.zeros((frames, size, size), dtype=np.uint8)
        for t in range(frames):
            obj[t, 2 * (c % 3): 2 * (c % 3) + 2, t: t + 2] = 1
        video = np.where(obj[None] > 0, 1.0, -1.0).astype(np.float32).repeat(3, 0)
        items.append({"video": torch.from_numpy(video), "motion_mask": torch.from_numpy(obj > 0),
                      "object_mask": torch.from_numpy(obj), "colors": torch.tensor([c % 8, -1, -1]),
                      "shapes": torch.tensor([c % 3, -1, -1])})
    return items


def _fake_records(items, cfg, names, times, rng):
    """LayerRecords whose first router sends moving tokens to expert 0, the others route at random."""
    from vidmoe.analysis.recorder import grid_from_config

    grid = grid_from_config(cfg.model)
    volumes, _ = clip_attributes(items, grid)
    n_clip = int(np.prod(grid))
    clip = np.repeat(np.tile(np.arange(len(items)), len(times)), n_clip)
    time = np.repeat(np.repeat(times, len(items)), n_clip)
    f, y, x = (np.tile(a, len(items) * len(times)) for a in np.unravel_index(np.arange(n_clip), grid))
    moving = volumes["motion"][clip, f, y, x]
    records = {}
    for i, name in enumerate(names):
        top1 = np.where(moving == 1, 0, rng.integers(1, 4, size=len(clip))) if i == 0 else rng.integers(0, 4, len(clip))
        records[name] = LayerRecord(
            name=name, kind=name.rsplit(".", 1)[1], num_experts=4, grid=grid, clip=clip.astype(np.int16),
            frame=f.astype(np.int16), row=y.astype(np.int16), col=x.astype(np.int16), time=time.astype(np.float16),
            top1=top1.astype(np.int16), top1_gate=np.ones(len(clip), np.float16),
            router_entropy=np.ones(len(clip), np.float16), token=np.arange(len(clip), dtype=np.int32),
            expert=top1.astype(np.int16), gate=np.ones(len(clip), np.float16))
    return records


def _tiny_config(**moe):
    overrides = ["model.num_frames=4", "model.sample_size=8", "model.patch_size=2", "model.moe.num_experts=4",
                 "model.moe.top_k=1"] + [f"model.moe.{k}={v}" for k, v in moe.items()]
    return load_config(None, overrides)


def _metrics(cfg, records, items, names, pools, times):
    moe = cfg.model.moe
    return json.loads(json.dumps({
        "schema_version": 1, "model": "m", "data": "d", "clips": len(items), "timesteps": list(times), "seed": 0,
        "permutations": 6, "num_experts": moe.num_experts, "top_k": moe.top_k, "router": moe.router,
        "expert_pool": moe.expert_pool, **analyse(cfg, records, items, names, pools, 6, 0),
        "loss": {"all": 1.0, "moving": 2.0, "static": 0.5}, "ablations": [], "overlay_time": times[0],
    }, allow_nan=False))


@pytest.mark.slow
def test_analysis_figures_overlays_and_report(tmp_path):
    rng = np.random.default_rng(0)
    cfg = _tiny_config(expert_pool="shared")
    items = _synthetic_items(6)
    names = ["blocks.0.spatial", "blocks.0.temporal", "blocks.1.spatial", "blocks.1.temporal"]
    times = [0.125, 0.625]
    records = _fake_records(items, cfg, names, times, rng)
    weights = rng.normal(size=(4, 40))
    pools = {name: (name.rsplit(".", 1)[0], weights) for name in names}
    metrics = _metrics(cfg, records, items, names, pools, times)

    first = metrics["layers"][0]
    assert first["mi_over_h"]["motion"] == pytest.approx(1.0)
    p_moving = metrics["attributes"]["motion"]["shares"][1]
    assert first["motion_lift"][0] == pytest.approx(1 / p_moving)
    assert first["null_mi_over_h"]["motion"]["mean"] < 0.5
    assert metrics["layers"][1]["mi_over_h"]["motion"] < 0.2
    assert metrics["attributes"]["color"]["values"][1] == "red"  # the data module's palette names
    for layer in metrics["layers"]:
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert layer["null_mi_over_h"]["frame"] is None and layer["random_router_mi_over_h"]["frame"] is not None
    assert [p["name"] for p in metrics["pools"]] == ["blocks.0", "blocks.1"]

    metrics["files"] = {"report": "report.md", "figures": write_figures(metrics, tmp_path),
                        "overlays": write_overlays(records, items, [names[0]], metrics, tmp_path, fps=4)}
    assert set(metrics["files"]["figures"]) == {"load", "specialisation", "time_buckets", "motion_lift", "legend",
                                                "pool_shares"}
    from matplotlib.image import imread

    for path in metrics["files"]["figures"].values():
        image = imread(tmp_path / path)
        assert image.ndim == 3 and image.shape[0] > 50
    paths = metrics["files"]["overlays"][names[0]]
    assert sorted(p.rsplit(".", 1)[1] for p in paths) == ["gif", "mp4"]
    for path in paths:
        with av.open(str(tmp_path / path)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(decoded) == 4 and decoded[0].shape[0] >= 128
        # the right half is tinted: it differs from the plain clip on the left
        scale = decoded[0].shape[1] // 17  # each row is clip (8 px) | gap (1 px) | tinted clip (8 px)
        left, right = decoded[0][:, :8 * scale].astype(int), decoded[0][:, 9 * scale:17 * scale].astype(int)
        assert np.abs(left - right).mean() > 5

    text = report.write_report(metrics, tmp_path).read_text()
    for name in names:
        assert f"`{name}`" in text
    assert "NMI 0.45" in text and "metrics.json" in text and "figures/load.png" in text
    assert "Shared expert pools" in text and "overlays/blocks_0_spatial.gif" in text


def test_tint_colours_each_patch_by_its_expert():
    frames = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    top1 = np.array([[[0, 1], [1, -1]]])  # [T'=1, 2, 2]
    colors = figures.expert_colors(2)
    out = figures.tint(frames, top1, colors, alpha=1.0)
    assert (out[:, 0, 0] == colors[0]).all() and (out[:, 0, 3] == colors[1]).all()
    assert (out[:, 3, 3] == figures.UNROUTED_COLOR).all()
    assert len({tuple(c) for c in figures.expert_colors(12)}) == 12
