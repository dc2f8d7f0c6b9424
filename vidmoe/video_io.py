"""Reading and writing video files through PyAV, and frame grids for looking at clips.

Frames are uint8 arrays [T, H, W, C] everywhere. Reading never raises anything but
``VideoReadError`` for a bad file, so data loaders can skip it with one line saying why.
"""

from __future__ import annotations

import math
import time
import contextlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Sequence

import av
import numpy as np
import torch

# Containers PyAV reads that hold moving pictures; images and subtitles are left out on purpose.
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".avi", ".webm", ".mkv", ".mov", ".mpg", ".mpeg", ".gif", ".ts", ".m2ts",
    ".mts", ".flv", ".wmv", ".ogv", ".3gp", ".vob", ".mxf",
})

# suffix -> (codec, pixel format, encoder options)
_WRITERS = {
    ".mp4": ("libx264", "yuv420p", {"crf": "18"}),
    ".mkv": ("libx264", "yuv420p", {"crf": "18"}),
    ".mov": ("libx264", "yuv420p", {"crf": "18"}),
    ".webm": ("libvpx-vp9", "yuv420p", {"crf": "24", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
    # constant quality 2 (FFmpeg's -q:v 2), given in lambda units: 2 * FF_QP2LAMBDA
    ".avi": ("mpeg4", "yuv420p", {"flags": "+qscale", "global_quality": str(2 * 118)}),
    ".gif": ("gif", "rgb8", {}),
}
_MIN_SHORT_SIDE = 128  # players blur or refuse tiny mp4/webm, so those are upscaled to this by default


class VideoReadError(Exception):
    """A file that cannot be used as video; ``reason`` says why in a few words."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class VideoInfo:
    """What a cheap pass over a file's packets tells: frame count, timestamps, rate and size."""

    num_frames: int
    times: np.ndarray  # float64 [N] seconds from the first frame, presentation order
    pts: Optional[np.ndarray]  # int64 [N] stream timestamps (None when the container lacks them)
    fps: float
    width: int
    height: int


def _timed_out(path, timeout: float) -> VideoReadError:
    return VideoReadError(path, f"decoding took longer than {timeout:g} s (data.decode_timeout)")


def _deadline_check(path, deadline: float, timeout: float) -> None:
    if time.monotonic() > deadline:
        raise _timed_out(path, timeout)


def _open(path, timeout: float):
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(path, "file not found")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "empty file (0 bytes)")
    try:
        # timeout makes FFmpeg give up on I/O that blocks (network mounts); decoding is bounded separately
        return av.open(str(path), timeout=timeout)
    except av.ExitError:  # FFmpeg's interrupt callback fired: the time limit, not a bad file
        raise _timed_out(path, timeout) from None
    except Exception as err:  # any other FFmpeg failure here means "not a video we can read"
        raise VideoReadError(path, f"not a readable video ({_short(err)})") from None


def _short(err: Exception) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.splitlines()[0]


def _video_stream(container, path):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoReadError(path, f"no video stream (streams: {', '.join(kinds)})")
    # several video streams (multi-angle files, cover art): the first one is the clip
    return container.streams.video[0]


def _fps(stream, times: np.ndarray) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    if len(times) > 1 and times[-1] > 0:
        return (len(times) - 1) / float(times[-1])
    return 0.0


@contextlib.contextmanager
def _reading(path, timeout: float) -> Iterator["av.container.InputContainer"]:
    """An open container whose failures all become VideoReadError (a timeout included); closed on exit."""
    container = _open(path, timeout)
    try:
        yield container
    except VideoReadError:
        raise
    except av.ExitError:
        raise _timed_out(path, timeout) from None
    except Exception as err:
        raise VideoReadError(path, f"decode error ({_short(err)})") from None
    finally:
        container.close()


def probe_video(path, timeout: float = 30.0) -> VideoInfo:
    """Count frames and read their timestamps from packets, decoding only the first frame.

    Raises VideoReadError when the file does not open, has no video stream, no decodable frame
    or takes longer than ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    with _reading(path, timeout) as container:
        stream = _video_stream(container, path)
        stamps = []
        first = None
        for packet in container.demux(stream):
            _deadline_check(path, deadline, timeout)
            if packet.size == 0 or packet.is_discard:  # flush marker / edit-list leftovers: not shown
                continue
            stamps.append(packet.pts if packet.pts is not None else packet.dts)
            if first is None:
                frames = stream.codec_context.decode(packet)
                first = frames[0] if frames else None
        if not stamps:
            raise VideoReadError(path, "no video frames")
        if first is None:  # decoders with delay return frames only when flushed
            frames = stream.codec_context.decode(None)
            first = frames[0] if frames else None
        if first is None:
            raise VideoReadError(path, "no decodable frame")
        if any(s is None for s in stamps):
            pts = None
            rate = _fps(stream, np.zeros(0))
            times = np.arange(len(stamps), dtype=np.float64) / (rate or 25.0)
        else:
            pts = np.sort(np.asarray(stamps, dtype=np.int64))
            times = (pts - pts[0]).astype(np.float64) * float(stream.time_base)
            if np.any(np.diff(pts) == 0):
                pts = None  # repeated timestamps cannot say which frame a seek landed on
        return VideoInfo(len(stamps), times, pts, _fps(stream, times), first.width, first.height)


# Colour conversion and scaling (libswscale) on one thread. By default PyAV sizes a pool of swscale slice
# threads from the CPU count; in a DataLoader worker forked after the parent had decoded, a conversion hung
# for good in swscale freeing that pool (pthread_cond_destroy; seen once, in a CI run of
# test_two_workers_give_the_same_batches_as_none). With one thread no pool is made. Measured on 2 cores: a
# 64x64 frame converts 8x faster so (no pool set up per frame), a 1280x720 one 0.36 against 0.30-0.34 ms.
SWS_THREADS = 1


def _rgb(frame) -> np.ndarray:
    """uint8 [H, W, 3] of a decoded frame."""
    return frame.to_ndarray(format="rgb24", threads=SWS_THREADS)


def _frames(path, timeout: float, seek_pts: Optional[int] = None, rate: Optional[list] = None) -> Iterator:
    """Decoded frames of the first video stream in presentation order, within the time limit.

    ``rate``, when given, receives the stream's frame rate as its first item before any frame.
    """
    deadline = time.monotonic() + timeout
    with _reading(path, timeout) as container:
        stream = _video_stream(container, path)
        if rate is not None:
            rate.append(_fps(stream, np.zeros(0)))
        if seek_pts is not None:
            container.seek(int(seek_pts), stream=stream, backward=True, any_frame=False)
        size = None
        for packet in container.demux(stream):
            _deadline_check(path, deadline, timeout)
            for frame in packet.decode():
                size = size or (frame.width, frame.height)
                # streams may change resolution midway; clips need one size, the first frame's
                yield frame if (frame.width, frame.height) == size else frame.reformat(*size, threads=SWS_THREADS)


def iter_frames(path, timeout: float = 30.0) -> Iterator[tuple[np.ndarray, Optional[float]]]:
    """(uint8 [H, W, 3], time in seconds or None) per frame, in presentation order, one at a time."""
    for frame in _frames(path, timeout):
        yield _rgb(frame), frame.time


def decode_video(path, timeout: float = 30.0) -> tuple[np.ndarray, np.ndarray, float]:
    """All frames -> (uint8 [T, H, W, 3], times float64 [T] seconds from the first frame, fps)."""
    arrays, stamps, rate = [], [], []
    for frame in _frames(path, timeout, rate=rate):
        arrays.append(_rgb(frame))
        stamps.append(frame.time)
    if not arrays:
        raise VideoReadError(path, "no decodable frame")
    fps = rate[0]
    if any(s is None for s in stamps):
        times = np.arange(len(arrays), dtype=np.float64) / (fps or 25.0)
    else:
        times = np.asarray(stamps, dtype=np.float64) - stamps[0]
    if not fps and len(times) > 1 and times[-1] > 0:
        fps = (len(times) - 1) / float(times[-1])
    return np.stack(arrays), times, fps


def read_video(path, timeout: float = 30.0) -> tuple[np.ndarray, float]:
    """Decode a whole file -> (frames uint8 [T, H, W, 3], fps); VideoReadError on anything wrong."""
    frames, _, fps = decode_video(path, timeout)
    return frames, fps


def read_frames(path, indices: Sequence[int], info: Optional[VideoInfo] = None, timeout: float = 30.0) -> np.ndarray:
    """Frames at the given presentation-order indices (repeats allowed) -> uint8 [len(indices), H, W, 3].

    With ``info`` from probe_video the reader seeks to the key frame before the first wanted frame
    instead of decoding from the start; it falls back to decoding from the start when the
    container's timestamps do not line up.
    """
    indices = [int(i) for i in indices]
    wanted = set(indices)
    got = None
    if info is not None and info.pts is not None and min(indices) > 0:
        got = _read_by_pts(path, wanted, info.pts, timeout)
    if got is None:
        got = {}
        for i, frame in enumerate(_frames(path, timeout)):
            if i in wanted:
                got[i] = _rgb(frame)
            if len(got) == len(wanted):
                break
    missing = wanted - set(got)
    if missing:
        raise VideoReadError(path, f"file ended before frame {min(missing)} (truncated or damaged)")
    return np.stack([got[i] for i in indices])


def _read_by_pts(path, wanted: set[int], pts: np.ndarray, timeout: float) -> Optional[dict]:
    index_of = {int(p): i for i, p in enumerate(pts)}
    first = min(wanted)
    got: dict[int, np.ndarray] = {}
    for frame in _frames(path, timeout, seek_pts=pts[first]):
        i = index_of.get(frame.pts)
        if i is None or (not got and i > first):
            return None  # landed somewhere we cannot place: decode from the start instead
        if i in wanted:
            got[i] = _rgb(frame)
        if len(got) == len(wanted):
            return got
    return None


def _as_uint8_frames(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be [T, H, W, C] with C = 1 or 3, got shape {tuple(frames.shape)}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames


def default_upscale(height: int, width: int, suffix: str) -> int:
    """write_video's factor when none is given: short side at least 128 px for H.264 and VP9, else 1."""
    codec = _WRITERS[suffix.lower()][0]
    if codec not in ("libx264", "libvpx-vp9"):
        return 1
    factor = max(1, math.ceil(_MIN_SHORT_SIDE / min(height, width)))
    if codec == "libx264" and (height % 2 or width % 2) and factor > 1:
        factor += factor % 2  # an even factor makes the size even without padding
    return factor


def write_video(path, frames, fps: float = 8, upscale: Optional[int] = None) -> Path:
    """Write uint8 frames [T, H, W, C] (C = 1 or 3, numpy or torch) to a file; the suffix picks the format.

    .mp4/.mkv/.mov: H.264 yuv420p; .webm: VP9; .avi: MPEG-4 part 2; .gif. ``upscale`` is an integer
    nearest-neighbour factor; None upscales mp4/webm/mkv/mov so the short side is at least 128 px.
    H.264 in yuv420p needs even sizes: an odd height or width left after upscaling is padded by
    repeating the last row or column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _WRITERS:
        raise ValueError(f"cannot write {path.name}: use one of {', '.join(sorted(_WRITERS))}")
    codec, pix_fmt, options = _WRITERS[suffix]
    frames = _as_uint8_frames(frames)
    if upscale is None:
        upscale = default_upscale(frames.shape[1], frames.shape[2], suffix)
    if upscale < 1:
        raise ValueError(f"upscale must be a positive integer, got {upscale}")
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)  # [T, H*k, W*k, 3]
    if codec == "libx264":
        pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
        frames = np.pad(frames, pad, mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = dict(options)
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode(None))
    return path


def tile_videos(videos, cols: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """Tile clips [N, T, H, W, C] into one clip [T, H', W', C] (a grid of cols columns, black gaps)."""
    if isinstance(videos, torch.Tensor):
        videos = videos.detach().cpu().numpy()
    videos = np.asarray(videos)
    n, t, h, w, c = videos.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((t, rows * (h + pad) - pad, cols * (w + pad) - pad, c), dtype=videos.dtype)
    for k in range(n):
        y, x = (k // cols) * (h + pad), (k % cols) * (w + pad)
        out[:, y:y + h, x:x + w] = videos[k]
    return out


def save_frame_grid(path, videos, pad: int = 1) -> Path:
    """PNG of clips [N, T, H, W, C] uint8: one row per clip, one column per frame."""
    from torchvision.io import write_png

    videos = np.asarray(videos.detach().cpu().numpy() if isinstance(videos, torch.Tensor) else videos)
    if videos.dtype != np.uint8 or videos.ndim != 5:
        raise ValueError(f"videos must be uint8 [N, T, H, W, C], got {videos.dtype} {videos.shape}")
    rows = [tile_videos(clip[:, None], cols=clip.shape[0], pad=pad)[0] for clip in videos]  # each [H, T*(W+pad), C]
    grid = tile_videos(np.stack(rows)[:, None], cols=1, pad=pad)[0]  # [N*(H+pad), W', C]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(torch.from_numpy(np.ascontiguousarray(grid)).permute(2, 0, 1), str(path))  # [C, H, W]
    return path
