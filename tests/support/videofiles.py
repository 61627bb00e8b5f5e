"""Write video files with PyAV (its wheels bundle libx264): Kinetics-like clips for benchmarks, and
the awkward files a decoder must survive (variable frame rate, no frame count, a header that
promises more frames than the file holds, no timestamps at all).

Frames are a pure function of (seed, index): a textured background panned like a hand-held
camera, a moving square, a new shot every `shot_s` seconds (where the encoder places extra keyframes)
and a little sensor noise, so that H.264 spends a realistic number of bits on them.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def render_frame(
    index: int, width: int, height: int, *, seed: int = 0, fps: float = 30.0, shot_s: float = 5.0
) -> np.ndarray:
    """Frame `index`: uint8 (height, width, 3) RGB."""
    shot = int(index / (fps * shot_s))
    rng = np.random.default_rng((seed, shot))
    freq = rng.uniform(0.05, 0.3, size=(2, 3)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(2, 3)).astype(np.float32)
    t = index / fps
    dx, dy = 40 * np.sin(0.7 * t + phase[0, 0]), 25 * np.sin(0.45 * t + phase[1, 0])  # camera pan
    # A separable texture: the outer product of a row and a column pattern costs no per-pixel sin.
    rows = np.cos((np.arange(height, dtype=np.float32)[:, None] + dy) * freq[1] + phase[1])
    cols = np.sin((np.arange(width, dtype=np.float32)[:, None] + dx) * freq[0] + phase[0])
    image = 127 + 60 * rows[:, None, :] * cols[None, :, :]
    cx = int(width * (0.5 + 0.35 * np.sin(1.3 * t + phase[0, 1])))
    cy = int(height * (0.5 + 0.35 * np.cos(0.9 * t + phase[1, 1])))
    r = max(1, int(0.12 * min(width, height)))
    image[max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] = rng.uniform(0, 255, size=3)
    noise = np.random.default_rng((seed, index)).integers(-8, 9, size=(height, width, 1), dtype=np.int8)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def write_video(
    path: str | Path,
    frames: int,
    *,
    width: int = 340,
    height: int = 256,
    fps: int = 30,
    seed: int = 0,
    pts_ms: list[int] | None = None,
    codec: str = "libx264",
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    audio: bool = False,
) -> Path:
    """Encode `frames` frames of `render_frame` into `path` (the container follows the suffix).

    Args:
        pts_ms: presentation times in milliseconds, one per frame (a variable frame rate);
            None gives a constant `fps`.
        options: encoder options (libx264 defaults otherwise: keyframes every 250 frames and at
            shot changes, 3 B-frames), e.g. {"g": "30", "bf": "0"}.
        container_options: muxer options, e.g. {"movflags": "faststart"} (index before the data).
        audio: add a silent AAC track, interleaved with the video as in downloaded clips.
    """
    import av

    path = Path(path)
    if pts_ms is not None and len(pts_ms) != frames:
        raise ValueError(f"write_video: pts_ms has {len(pts_ms)} entries for {frames} frames")
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        sound = container.add_stream("aac", rate=48000) if audio else None
        samples = 48000 // fps
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(render_frame(i, width, height, seed=seed, fps=fps), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
            if sound is not None:
                chunk = av.AudioFrame.from_ndarray(
                    np.zeros((1, samples), dtype=np.float32), format="fltp", layout="mono"
                )
                chunk.sample_rate, chunk.pts = 48000, i * samples
                for packet in sound.encode(chunk):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        for packet in sound.encode() if sound is not None else ():
            container.mux(packet)
    return path


def variable_rate_pts_ms(frames: int, seed: int = 0) -> list[int]:
    """Presentation times of a variable-frame-rate phone clip: gaps of 20-80 ms."""
    gaps = np.random.default_rng(seed).integers(20, 81, size=frames)
    return np.concatenate([[0], np.cumsum(gaps[:-1])]).tolist()


def truncate(path: str | Path, fraction: float) -> Path:
    """Cut a file to `fraction` of its bytes, as an interrupted download leaves it. With the index
    at the front (faststart), the header still lists every frame."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path
