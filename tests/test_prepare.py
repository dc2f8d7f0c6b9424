"""``vidmoe prepare``: synthetic clips to a video folder, a folder to a cache, and its errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers_video import pattern, write_broken_files

from vidmoe.cli import main
from vidmoe.config import load_config
from vidmoe.data import CachedClipDataset, VideoFolderDataset, build_dataset
from vidmoe.data.prepare import prepare
from vidmoe.data.synthetic import SHAPES, render_clip
from vidmoe.video_io import probe_video, read_video, write_video

SMALL = ["model.sample_size=16", "model.num_frames=6"]


def test_synthetic_clips_become_a_decodable_captioned_folder(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["prepare", "--data", "synthetic:bouncing_shapes", "--num-clips", "8", "--out", str(out), *SMALL]) == 0
    assert "wrote 8 clips" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    truth = np.load(out / "ground_truth.npz")
    assert truth["object_mask"].shape == (8, 6, 16, 16) and truth["positions"].shape == (8, 6, 3, 2)
    cfg = load_config(None, SMALL)
    for i, row in enumerate(rows):
        clip = render_clip(i, 0, 6, 16, 16, cfg.data)
        assert row["text"] == clip["caption"] == truth["caption"][i]
        assert row["file_name"] == truth["file_name"][i] == f"{SHAPES[clip['label']]}/clip_{i:06d}.mp4"
        frames, fps = read_video(out / row["file_name"])
        assert frames.shape == (6, 16 * int(truth["upscale"]), 16 * int(truth["upscale"]), 3) and fps == 8
        np.testing.assert_array_equal(truth["object_mask"][i], clip["object_mask"])
    # the folder reads back as training data, with the template captions and shape labels
    ds = VideoFolderDataset(out, 6, (16, 16), split="eval", eval_fraction=None)
    assert len(ds) == 8 and {s.caption for s in ds.sources} == {r["text"] for r in rows}
    for source in ds.sources:
        assert ds.classes[source.label] == source.name.split("/")[0]
    item = ds[0]["video"]
    original = render_clip(0, 0, 6, 16, 16, cfg.data)["frames"]
    assert np.abs((item.permute(1, 2, 3, 0).numpy() + 1) * 127.5 - original).mean() < 8  # lossy, but close


def test_folder_becomes_a_cache_that_training_reads(tmp_path, capsys):
    videos = tmp_path / "videos"
    write_video(videos / "a.mp4", pattern(10, 24, 24), upscale=1)
    write_video(videos / "b.avi", pattern(9, 16, 20, seed=1), upscale=1)
    (videos / "a.txt").write_text("first clip")
    (videos / "empty.mp4").write_bytes(b"")
    cache = tmp_path / "cache"
    summary = prepare(str(videos), cache, cfg=load_config(None, SMALL))
    assert (summary.clips, summary.frames) == (2, 19) and summary.skipped[0][1] == "empty file (0 bytes)"
    assert "cached 2 clips (19 frames)" in summary.text() and "1 empty file" in summary.text()
    cfg = load_config(None, SMALL + [f"data.source={cache}", "data.eval_fraction=0.0"])
    ds = build_dataset(cfg)
    assert isinstance(ds, CachedClipDataset) and len(ds) == 2
    assert ds[0]["video"].shape == (3, 6, 16, 16) and ds[0]["caption"] == "first clip"
    assert np.load(cache / "frames.npy", mmap_mode="r").shape == (19, 16, 16, 3)
    with pytest.raises(Exception, match="--overwrite"):
        prepare(str(videos), cache, cfg=load_config(None, SMALL))
    prepare(str(videos), cache, cfg=load_config(None, SMALL), overwrite=True)
    assert main(["prepare", "--data", str(videos), "--out", str(tmp_path / "c2"), *SMALL]) == 0
    assert "cached 2 clips" in capsys.readouterr().out


def test_prepare_refuses_to_replace_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "keep.txt").parent.mkdir()
    (mine / "keep.txt").write_text("precious")
    args = ["prepare", "--data", "synthetic:bouncing_shapes", "--num-clips", "2", "--out", str(mine), *SMALL]
    assert main(args) == 2 and main(args + ["--overwrite"]) == 2
    assert (mine / "keep.txt").read_text() == "precious"
    assert "not written by 'vidmoe prepare'" in capsys.readouterr().err


@pytest.mark.slow
def test_folder_of_broken_files_exits_2_with_one_line(tmp_path):
    write_broken_files(tmp_path / "bad")
    result = subprocess.run([sys.executable, "-m", "vidmoe", "prepare", "--data", str(tmp_path / "bad"),
                             "--out", str(tmp_path / "cache"), *SMALL], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("vidmoe prepare: error: no usable clip in") and "6 video files" in lines[0]
    assert not (tmp_path / "cache").exists()


def test_probe_of_prepared_clip_matches_the_requested_rate(tmp_path):
    out = prepare("synthetic:bouncing_shapes", tmp_path / "s", 1, load_config(None, SMALL), fps=12)
    assert out.clips == 1
    assert probe_video(next((tmp_path / "s").rglob("*.mp4"))).fps == 12
