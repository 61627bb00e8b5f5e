"""The video loader's case: one training clip of a Kinetics-like file, as one loader worker makes it.

A clip is what `VideoFolder` returns in training: `num_frames` frames by jittered uniform
sampling, scaled, cropped, flipped and normalised. The paths:
- "old": the loader before frame-accurate decoding, unchanged: every frame of the video decoded
  to RGB, the clip's frames picked, then resized and cropped in float32.
- "old decode": the same full decode, with today's transforms (uint8 resize, float crop only),
  so that its row against the backends' isolates decoding.
- "pyav", "torchcodec": only the clip's frames decoded, today's transforms.
A worker is one core: the timed call runs on one pinned CPU with one torch thread, so FFmpeg's
automatic thread count is one as well.

The files are generated once per machine (libx264 defaults: a keyframe every 250 frames and at
each shot change, every 5 s here; 3 B-frames) and kept in the temporary directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.support.videofiles import write_video
from vivit.data import backend_unavailable_reason, decode, open_video, read_frames, train_transform
from vivit_kernels import uniform_frame_indices

from .core import Case

OLD, OLD_DECODE = "old", "old decode"
LOADER_BACKENDS = (OLD, OLD_DECODE, "pyav", "torchcodec")
CLIP = "train clip"
# Kinetics-like: 340 x 256 H.264 at 30 fps; a trimmed 10-s clip and a 5-min source video.
LOADER_SHAPES = {
    "10s": dict(seconds=10, width=340, height=256, fps=30, num_frames=32, size=224),
    "5min": dict(seconds=300, width=340, height=256, fps=30, num_frames=32, size=224),
}
# --benchmark-disable: tiny files that still span several keyframes.
LOADER_SMOKE = {
    "10s": dict(seconds=1, width=64, height=48, fps=30, num_frames=8, size=32),
    "5min": dict(seconds=3, width=64, height=48, fps=30, num_frames=8, size=32),
}


def loader_video(shape: dict) -> Path:
    """The generated file of `shape`, written on first use (atomically: workers may share it)."""
    directory = Path(tempfile.gettempdir()) / "vivit-bench-videos"
    directory.mkdir(exist_ok=True)
    name = f"kinetics-like-{shape['width']}x{shape['height']}-{shape['fps']}fps-{shape['seconds']}s.mp4"
    path = directory / name
    if not path.is_file():
        partial = directory / f".{name}.{os.getpid()}.mp4"
        write_video(
            partial, shape["seconds"] * shape["fps"], width=shape["width"], height=shape["height"], fps=shape["fps"]
        )
        partial.replace(path)
    return path


def loader_skip_reason(spec: dict) -> str | None:
    # Every case's file is written, and every decoder's clips checked against the old path, with PyAV.
    backends = ["pyav"] if spec["backend"] in (OLD, OLD_DECODE) else ["pyav", spec["backend"]]
    return next(filter(None, map(backend_unavailable_reason, backends)), None)


def float_train_transform(frames: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The training transform of the old loader: the whole clip to float32, resized, then cropped."""
    short = max(size, round(size * float(torch.empty(1, dtype=torch.float64).uniform_(1.0, 1.25, generator=generator))))
    clip = frames.permute(3, 0, 1, 2).float().div_(255.0)  # (C, T, H, W)
    H, W = clip.shape[-2:]
    out_hw = (max(short, round(H * short / min(H, W))), max(short, round(W * short / min(H, W))))
    if out_hw != (H, W):
        clip = F.interpolate(
            clip.permute(1, 0, 2, 3), size=out_hw, mode="bilinear", align_corners=False, antialias=True
        ).permute(1, 0, 2, 3)
    top = int(torch.randint(clip.shape[-2] - size + 1, (1,), generator=generator))
    left = int(torch.randint(clip.shape[-1] - size + 1, (1,), generator=generator))
    clip = clip[:, :, top : top + size, left : left + size]
    if bool(torch.rand(1, generator=generator) < 0.5):
        clip = clip.flip(-1)
    return (clip - 0.5) / 0.5


def old_clip(path: Path, shape: dict, seed: int, transform: Callable | None = None) -> torch.Tensor:
    """The full-decode path: decode every frame, pick the clip's, then `transform` (default: today's)."""
    frames = decode(path)
    generator = torch.Generator().manual_seed(seed)
    indices = uniform_frame_indices(len(frames), shape["num_frames"], jitter=True, generator=generator)
    return (transform or train_transform)(frames[indices], shape["size"], generator)


def clip_fn(backend: str, path: Path, shape: dict) -> Callable[[int], torch.Tensor]:
    """seed -> the training clip (C, T, size, size) of `path` through `backend`."""
    if backend == OLD:
        return lambda seed: old_clip(path, shape, seed, float_train_transform)
    if backend == OLD_DECODE:
        return lambda seed: old_clip(path, shape, seed)

    def clip(seed: int) -> torch.Tensor:
        generator = torch.Generator()

        def choose(count: int) -> torch.Tensor:
            generator.manual_seed(seed)
            return uniform_frame_indices(count, shape["num_frames"], jitter=True, generator=generator)

        frames, _ = read_frames(path, choose, backend)
        return train_transform(frames, shape["size"], generator)

    return clip


_OLD_CLIPS: dict[tuple, torch.Tensor] = {}  # the backends share the old path's (slow) reference clips


def check_against_old(spec: dict, seeds=(0, 1)) -> None:
    """Raise AssertionError unless `spec`'s backend makes the full decode's clips, bit for bit
    (with today's transforms; the old float32 transform is within a uint8 step of them)."""
    if spec["backend"] in (OLD, OLD_DECODE):
        return
    path = loader_video(spec["shape"])
    new = clip_fn(spec["backend"], path, spec["shape"])
    for seed in seeds:
        key = (path, tuple(sorted(spec["shape"].items())), seed)
        if key not in _OLD_CLIPS:
            _OLD_CLIPS[key] = old_clip(path, spec["shape"], seed)
        if not torch.equal(new(seed), _OLD_CLIPS[key]):
            raise AssertionError(
                f"loader {spec['backend']}: the clip of seed {seed} of {path.name} differs from the full decode's"
            )


@contextmanager
def one_worker():
    """This thread on one CPU with one torch thread (decoder threads it starts inherit the CPU)."""
    threads = torch.get_num_threads()
    cpus = os.sched_getaffinity(0)
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)


def loader_case(spec: dict) -> Case:
    shape = spec["shape"]
    path = loader_video(shape)
    clip = clip_fn(spec["backend"], path, shape)
    seed = [0]

    def setup() -> None:
        seed[0] += 1  # a new clip of the same file each round, as an epoch draws them

    def run() -> None:
        with one_worker():
            clip(seed[0])

    with open_video(path) as video:
        frames = video.num_frames
    return Case(
        setup=setup,
        run=run,
        saved_bytes=lambda: 0,
        flops=0.0,
        flop_formula="-",
        device=torch.device("cpu"),
        info={"video_frames": frames, "file_bytes": path.stat().st_size, "clip_frames": shape["num_frames"]},
    )
