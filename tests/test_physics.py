"""Pixel physics: real bouncing shapes score near the ceiling, static and shuffled clips clearly worse."""

import numpy as np
import pytest

from vidmoe import physics
from vidmoe.config import DataConfig
from vidmoe.data.synthetic import render_clip

FRAMES, SIZE, CLIPS = 16, 32, 16


@pytest.fixture(scope="module")
def rendered():
    return [render_clip(i, 0, FRAMES, SIZE, SIZE, DataConfig(), "eval") for i in range(CLIPS)]


@pytest.fixture(scope="module")
def real(rendered):
    return np.stack([clip["frames"] for clip in rendered])


@pytest.fixture(scope="module")
def summaries(real):
    sets = {"real": real, "static": physics.static_clips(real), "shuffled": physics.shuffled_clips(real, seed=0)}
    return {name: physics.summarize(physics.per_clip_metrics(clips), resamples=50) for name, clips in sets.items()}


def value(summary, key):
    return summary[key]["value"]


def test_real_clips_score_near_the_ceiling(summaries):
    real = summaries["real"]
    assert value(real, "plausible") >= 0.9
    assert value(real, "count_stability") >= 0.9
    assert value(real, "color_consistency") >= 0.95
    assert value(real, "bounce_correctness") >= 0.9
    assert value(real, "motion_residual") < 1.0  # pixel rounding of centroids only
    assert value(real, "frozen") == value(real, "empty") == 0.0
    assert value(real, "flicker") <= 0.1


def test_static_and_shuffled_clips_score_clearly_worse(summaries):
    real, static, shuffled = summaries["real"], summaries["static"], summaries["shuffled"]
    assert value(static, "frozen") == 1.0 and value(static, "plausible") == 0.0
    assert value(shuffled, "motion_residual") > 4 * value(real, "motion_residual")
    assert value(shuffled, "bounce_correctness") < 0.5
    assert value(shuffled, "plausible") <= 0.2
    for name in ("static", "shuffled"):
        assert value(summaries[name], "plausible") < value(real, "plausible") - 0.5


def test_objects_are_found_where_the_ground_truth_puts_them(rendered):
    agree, close = [], []
    for clip in rendered:
        frames = physics.detect_objects(clip["frames"])
        for t, blobs in enumerate(frames):
            visible = set(np.unique(clip["object_mask"][t])) - {0}
            agree.append(len(blobs) == len(visible))
            for k in visible:
                x, y = clip["positions"][t, k - 1]
                area = int((clip["object_mask"][t] == k).sum())
                for blob in blobs:
                    if blob.area == area and abs(blob.x - x) < 3 and abs(blob.y - y) < 3:
                        close.append(np.hypot(blob.x - x, blob.y - y))
    assert np.mean(agree) >= 0.9  # occlusion may split or hide an object now and then
    assert len(close) > 100 and np.median(close) < 0.5


def test_flood_fill_matches_scipy():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    for density in (0.2, 0.45, 0.7):
        mask = rng.random((17, 23)) < density
        ours, n_ours = physics.label_components(mask, use_scipy=False)
        theirs, n_theirs = physics.label_components(mask, use_scipy=True)
        assert n_ours == n_theirs
        pairs = set(zip(ours[mask].tolist(), theirs[mask].tolist()))
        assert len(pairs) == n_ours  # the same partition, up to the numbering
        assert (ours[~mask] == 0).all()


def test_references_and_frozen_empty_detection(real):
    static = physics.static_clips(real[:2])
    assert (static == real[:2, :1]).all()
    shuffled = physics.shuffled_clips(real[:4], seed=3)
    for original, mixed in zip(real[:4], shuffled):
        assert sorted(map(bytes, original)) == sorted(map(bytes, mixed)) and not (original == mixed).all()
    gray = np.full((2, 6, 16, 16, 3), 128, dtype=np.uint8)
    scores = physics.per_clip_metrics(gray)
    assert all(s["empty"] and s["frozen"] and not s["plausible"] for s in scores)


def test_checker_compares_generated_with_real(rendered, real):
    scores = physics.per_clip_metrics(real[:6])
    expected = [clip["num_objects"] for clip in rendered[:6]]
    same = physics.checker(scores, scores, expected)
    assert same["objects_per_frame_agreement"] > 0.9 and same["motion_residual_ratio"] == pytest.approx(1.0)
    assert same["motion_residual_within_3x_real"] and same["frozen_or_empty_rare"]
    frozen = physics.per_clip_metrics(physics.static_clips(real[:6]))
    bad = physics.checker(frozen, scores)
    assert bad["agreement_basis"].startswith("count distribution") and bad["frozen_or_empty_rate"] == 1.0
    assert not bad["frozen_or_empty_rare"]


def test_bootstrap_interval_is_deterministic_and_brackets_the_value(real):
    scores = physics.per_clip_metrics(real[:8])
    a, b = physics.summarize(scores, resamples=40, seed=1), physics.summarize(scores, resamples=40, seed=1)
    assert a == b
    low, high = a["objects_per_frame"]["ci"]
    assert low <= a["objects_per_frame"]["value"] <= high


def test_soft_edges_show_up_as_fragments(rendered, real):
    """Blending every frame with itself shifted by a pixel gives shapes an in-between-colour rim, which
    falls apart into tiny pieces; real clips have hard edges and (nearly) no fragments."""
    clips = real.astype(np.float64)
    soft = ((clips + np.roll(clips, 1, axis=2) + np.roll(clips, 1, axis=3) + np.roll(clips, (1, 1), axis=(2, 3))) / 4)
    per_clip = {name: physics.per_clip_metrics(c.round().astype(np.uint8)) for name, c in (("real", clips), ("soft", soft))}
    scores = {name: physics.summarize(p, resamples=10) for name, p in per_clip.items()}
    assert value(scores["real"], "fragments_per_frame") < 0.05
    assert value(scores["soft"], "fragments_per_frame") > 1.0
    assert value(scores["soft"], "objects_per_frame") > value(scores["real"], "objects_per_frame") + 1.0

    # The checker's agreement counts fragments; its diagnostic shows what they alone cost.
    specks = real.copy()
    specks[:, :, 0, :2] = specks[:, :, -1, -2:] = (150, 150, 150)  # two 2-px pieces in every frame
    checked = physics.checker(physics.per_clip_metrics(specks), per_clip["real"],
                              [clip["num_objects"] for clip in rendered])
    assert checked["objects_per_frame_agreement"] < 0.2 and checked["agreement_without_fragments"] > 0.9


def test_agreement_by_number_of_objects_asked_for(rendered, real):
    """Erasing every object of the 3-object clips costs only those clips' agreement; the mean over the
    numbers asked for weighs each number once, however many clips ask for it."""
    expected = [clip["num_objects"] for clip in rendered]
    assert {1, 3} <= set(expected)
    broken = real.copy()
    for i, n in enumerate(expected):
        if n == 3:
            broken[i] = broken[i, :1, :1, :1]  # background colour everywhere: no object in any frame
    per_clip = physics.per_clip_metrics(broken)
    checked = physics.checker(per_clip, physics.per_clip_metrics(real), expected)
    by_count = checked["agreement_by_count"]
    assert by_count["3"] == 0.0 and by_count["1"] > 0.9
    assert checked["clips_by_count"] == {str(n): expected.count(n) for n in sorted(set(expected))}
    assert checked["agreement_mean_over_counts"] == pytest.approx(np.mean(list(by_count.values())))
    # the overall agreement weighs every clip once, so numbers asked for more often count for more
    overall = checked["objects_per_frame_agreement"]
    assert overall == pytest.approx(sum(by_count[str(n)] * expected.count(n) for n in set(expected)) / len(expected))
