"""Bouncing shapes: ground truth agrees with the pixels, determinism, splits, items, captions and labels."""

import numpy as np
import pytest
import torch

from vidmoe.config import ConfigError, load_config
from vidmoe.data import build_dataset, collate
from vidmoe.data.synthetic import (
    BACKGROUND, COLOR_NAMES, MAX_OBJECTS, PALETTE, SHAPES, caption_for, render_clip, shape_extents, shape_mask,
)
from vidmoe.text import words


def data_cfg(*overrides):
    return load_config(None, list(overrides)).data


def clips(count, size=32, frames=12, *overrides):
    cfg = data_cfg(*overrides)
    return [render_clip(i, 0, frames, size, size, cfg) for i in range(count)]


def test_shapes_dtypes_and_absent_slots():
    clip = render_clip(3, 0, 5, 16, 24, data_cfg("data.min_objects=1", "data.max_objects=1"))
    assert clip["frames"].shape == (5, 16, 24, 3) and clip["frames"].dtype == np.uint8
    assert clip["object_mask"].shape == (5, 16, 24) and clip["motion_mask"].dtype == bool
    assert clip["positions"].shape == (5, MAX_OBJECTS, 2) and clip["bounces"].shape == (5, MAX_OBJECTS)
    assert clip["num_objects"] == 1
    assert np.isnan(clip["positions"][:, 1:]).all() and not clip["bounces"][:, 1:].any()
    assert list(clip["colors"][1:]) == [-1, -1] and list(clip["shapes"][1:]) == [-1, -1]
    assert set(np.unique(clip["object_mask"])) <= {0, 1}


def test_pixels_are_the_object_mask_painted_with_the_palette():
    for clip in clips(20):
        lut = np.array([BACKGROUND] + [PALETTE[COLOR_NAMES[c]] for c in clip["colors"][:clip["num_objects"]]])
        np.testing.assert_array_equal(clip["frames"], lut[clip["object_mask"]])
        # the background is static: a pixel no object ever covers keeps one colour all clip long
        never = (clip["object_mask"] == 0).all(axis=0)
        assert (clip["frames"][:, never] == BACKGROUND).all()


def test_mask_centroid_is_the_position():
    checked = 0
    for clip in clips(40):
        for k in range(clip["num_objects"]):
            shape, size = int(clip["shapes"][k]), float(clip["sizes"][k])
            # a triangle's pixel-sampled centroid drifts further: its rows of different widths round differently
            tolerance = 0.5 if SHAPES[shape] != "triangle" else 0.65
            for t in range(len(clip["frames"])):
                x, y = clip["positions"][t, k]
                visible = clip["object_mask"][t] == k + 1
                if visible.sum() != shape_mask(shape, size, x, y, 32, 32).sum():
                    continue  # partly covered by a later object
                rows, cols = np.nonzero(visible)
                assert abs(cols.mean() + 0.5 - x) <= tolerance and abs(rows.mean() + 0.5 - y) <= tolerance
                checked += 1
    assert checked > 200


def test_motion_mask_is_empty_on_the_background_and_covers_every_change():
    for clip in clips(20, 32, 12, "data.speed=[0.0, 1.5]"):
        mask, motion, frames = clip["object_mask"], clip["motion_mask"], clip["frames"]
        background_both = (mask[1:] == 0) & (mask[:-1] == 0)
        assert not (motion[1:] & background_both).any()
        changed = (frames[1:] != frames[:-1]).any(-1)
        assert not (changed & ~motion[1:]).any()
        # a moving object's pixels are moving pixels
        speed = np.linalg.norm(clip["velocities"], axis=-1)  # [T, O]
        for k in range(clip["num_objects"]):
            if (speed[:, k] > 0).all():
                assert motion[mask == k + 1].all()


def test_still_objects_make_no_motion():
    for clip in clips(10, 16, 6, "data.speed=[0.0, 0.0]"):
        assert (clip["object_mask"] > 0).any() and not clip["motion_mask"].any()
        assert not clip["bounces"].any()


def test_velocity_is_constant_between_bounces_and_flips_at_walls():
    seen = 0
    for clip in clips(30, 16, 24):
        for k in range(clip["num_objects"]):
            pos, vel, hit = clip["positions"][:, k], clip["velocities"][:, k], clip["bounces"][:, k]
            for t in range(1, len(pos)):
                if not hit[t]:
                    np.testing.assert_allclose(vel[t], vel[t - 1], atol=1e-6)
                    np.testing.assert_allclose(pos[t] - pos[t - 1], vel[t], atol=1e-4)
                    continue
                seen += 1
                flipped = np.sign(vel[t]) != np.sign(vel[t - 1])
                assert flipped.any()
                np.testing.assert_allclose(np.abs(vel[t]), np.abs(vel[t - 1]), atol=1e-6)
                # at t-1 or t the shape's edge is within one step of the wall it bounced off
                left, right, top, bottom = shape_extents(int(clip["shapes"][k]), float(clip["sizes"][k]))
                gaps = np.stack([pos[t - 1:t + 1, 0] - left, 16 - right - pos[t - 1:t + 1, 0],
                                 pos[t - 1:t + 1, 1] - top, 16 - bottom - pos[t - 1:t + 1, 1]])  # [4 walls, 2 times]
                step = np.abs(vel[t]).max() + 1e-6
                assert (gaps.min(axis=1) <= step).any()
                # ... and the pixels show it: the object's mask reaches the border region of that frame pair
                masks = clip["object_mask"][t - 1:t + 1] == k + 1
                margin = int(np.ceil(step)) + 1
                border = np.zeros((16, 16), bool)
                border[:margin] = border[-margin:] = True
                border[:, :margin] = border[:, -margin:] = True
                assert (masks & border).any()
    assert seen > 10


def test_objects_stay_inside_the_frame():
    for clip in clips(30, 16, 20):
        for k in range(clip["num_objects"]):
            left, right, top, bottom = shape_extents(int(clip["shapes"][k]), float(clip["sizes"][k]))
            x, y = clip["positions"][:, k, 0], clip["positions"][:, k, 1]
            assert (x - left >= -1e-5).all() and (x + right <= 16 + 1e-5).all()
            assert (y - top >= -1e-5).all() and (y + bottom <= 16 + 1e-5).all()


def test_deterministic_by_seed_and_index_with_disjoint_splits():
    cfg = data_cfg()
    a = render_clip(7, 3, 6, 16, 16, cfg)
    b = render_clip(7, 3, 6, 16, 16, cfg)
    for key in ("frames", "object_mask", "motion_mask", "bounces"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["caption"] == b["caption"]
    assert not np.array_equal(a["frames"], render_clip(7, 4, 6, 16, 16, cfg)["frames"])
    assert not np.array_equal(a["frames"], render_clip(8, 3, 6, 16, 16, cfg)["frames"])
    train = {render_clip(i, 0, 2, 16, 16, cfg)["frames"].tobytes() for i in range(50)}
    held_out = {render_clip(i, 0, 2, 16, 16, cfg, split="eval")["frames"].tobytes() for i in range(50)}
    assert not train & held_out


def test_object_count_weights_shape_the_training_split_only():
    counts = lambda cfg, split: np.bincount(  # noqa: E731
        [render_clip(i, 0, 2, 16, 16, cfg, split=split)["num_objects"] for i in range(600)], minlength=4)[1:]
    uniform, weighted = data_cfg(), data_cfg("data.object_count_weights=[1, 0, 3]")
    train = counts(weighted, "train")
    assert train[1] == 0 and 0.65 < train[2] / train.sum() < 0.85  # 3 of 4 clips hold three objects
    assert (counts(uniform, "train") > 150).all()
    # held-out clips, and so held-out loss and the eval's prompts, are the same with or without weights
    for i in range(20):
        a, b = (render_clip(i, 0, 3, 16, 16, cfg, split="eval") for cfg in (uniform, weighted))
        np.testing.assert_array_equal(a["frames"], b["frames"])
    with pytest.raises(ConfigError, match="object_count_weights"):
        data_cfg("data.object_count_weights=[1, 2]")


def test_any_frame_count_and_size():
    cfg = data_cfg()
    for frames, height, width in ((1, 8, 8), (3, 9, 13), (16, 64, 48)):
        clip = render_clip(0, 0, frames, height, width, cfg)
        assert clip["frames"].shape == (frames, height, width, 3)
        assert (clip["object_mask"] > 0).any()


def test_captions_labels_and_vocabulary():
    cfg = load_config(None, ["model.sample_size=16", "model.num_frames=4", "data.num_clips=30"])
    dataset = build_dataset(cfg)
    assert dataset.num_classes == len(SHAPES) == 3
    vocab = set(dataset.vocabulary())
    for i in range(30):
        clip = render_clip(i, 0, 4, 16, 16, cfg.data)
        n = clip["num_objects"]
        assert clip["label"] == clip["shapes"][0]
        assert clip["caption"].endswith(" bouncing")
        assert clip["caption"].count(" and ") == (n > 1) and clip["caption"].count(",") == max(0, n - 2)
        for c, s in zip(clip["colors"][:n], clip["shapes"][:n]):
            assert f"{COLOR_NAMES[c]} {SHAPES[s]}" in clip["caption"]
        assert set(words(clip["caption"])) <= vocab
    orange, red = COLOR_NAMES.index("orange"), COLOR_NAMES.index("red")
    assert caption_for([orange], [0]) == "an orange circle bouncing"
    assert caption_for([red, orange, red], [1, 2, 0]) == "a red square, an orange triangle and a red circle bouncing"


def test_items_batches_and_epochs():
    cfg = load_config(None, ["model.sample_size=16", "model.num_frames=4", "model.in_channels=1",
                             "data.num_clips=6", "data.eval_clips=3"])
    train, held_out = build_dataset(cfg), build_dataset(cfg, "eval")
    assert (len(train), len(held_out)) == (6, 3)
    batch = collate([train[i] for i in range(4)])
    assert batch["video"].shape == (4, 1, 4, 16, 16) and batch["video"].dtype == torch.float32
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert batch["label"].dtype == torch.long and batch["num_objects"].shape == (4,)
    assert batch["object_mask"].shape == (4, 4, 16, 16) and batch["positions"].shape == (4, 4, 3, 2)
    first = train[0]["video"]
    train.set_epoch(1)
    assert not torch.equal(train[0]["video"], first)
    held_out.set_epoch(1)
    assert torch.equal(held_out[0]["video"], build_dataset(cfg, "eval")[0]["video"])
    with pytest.raises(IndexError):
        train[6]
