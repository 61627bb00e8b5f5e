"""Moving shapes: a built-in video classification task in which frame order matters.

A shape (square or disc, random size and colour) moves in a straight line over a noisy
background. The class is the direction of motion (right, left, down, up) times the speed
(slow, fast): 8 classes. The start position is drawn so that a clip played backwards is an
equally likely clip of the opposite direction: a model that sees the frames as an unordered
set can tell the axis and the speed (how far apart the positions are) but never the sign of
the motion, so it is capped at 50% accuracy (chance is 12.5%).

Every clip is a pure function of (seed, index): clip i of seed s is the same on any machine,
in any process, in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

DIRECTIONS = ("right", "left", "down", "up")
# (axis, sign): axis 1 moves along x (columns), axis 0 along y (rows).
_MOTION = {"right": (1, 1.0), "left": (1, -1.0), "down": (0, 1.0), "up": (0, -1.0)}
SPEEDS = {"slow": 1.0, "fast": 2.5}  # pixels per frame at size 32; scaled with the frame size
# Clips longer than this move proportionally slower per frame, so a fast path still fits the frame.
SPEED_FRAMES = 8
CLASSES = tuple(f"{d}-{s}" for d in DIRECTIONS for s in SPEEDS)


@dataclass(frozen=True)
class ShapeClip:
    """The parameters of one clip: everything `render` needs."""

    label: int
    start: tuple[float, float]  # (y, x) of the shape's centre in frame 0, pixels
    velocity: tuple[float, float]  # (dy, dx) pixels per frame
    radius: float
    disc: bool
    colour: tuple[float, float, float]
    noise_seed: int


def sample_clip(rng: np.random.Generator, num_frames: int, size: int, label: int | None = None) -> ShapeClip:
    """Draw one clip's parameters. The path's far ends are drawn uniformly inside the frame,
    independently of the sign of the motion, so reversing a clip gives a clip of the opposite
    direction with the same probability."""
    if label is None:
        label = int(rng.integers(len(CLASSES)))
    direction, speed_name = CLASSES[label].split("-")
    axis, sign = _MOTION[direction]
    speed = SPEEDS[speed_name] * size / 32 * min(1.0, (SPEED_FRAMES - 1) / (num_frames - 1))
    radius = float(rng.uniform(0.09, 0.16) * size)
    span = speed * (num_frames - 1)
    low = float(rng.uniform(radius, size - radius - span))  # lower end of the path on its axis
    across = float(rng.uniform(radius, size - radius))
    along = low if sign > 0 else low + span
    start = (along, across) if axis == 0 else (across, along)
    velocity = (sign * speed, 0.0) if axis == 0 else (0.0, sign * speed)
    # Brighter than the background in every channel: a random tint of a bright colour.
    colour = tuple(float(c) for c in rng.uniform(0.6, 1.0, 3))
    return ShapeClip(label, start, velocity, radius, bool(rng.integers(2)), colour, int(rng.integers(2**31)))


def render(clip: ShapeClip, num_frames: int, size: int, noise: float = 0.05) -> torch.Tensor:
    """Draw a clip: (3, num_frames, size, size) float32 in [0, 1].

    Edges are anti-aliased (one pixel of linear falloff), so sub-pixel motion is visible. The
    background is grey with i.i.d. Gaussian noise, the same in distribution played either way.
    """
    t = np.arange(num_frames, dtype=np.float32)[:, None, None]
    ys = np.arange(size, dtype=np.float32)[None, :, None] + 0.5
    xs = np.arange(size, dtype=np.float32)[None, None, :] + 0.5
    dy = ys - (clip.start[0] + clip.velocity[0] * t)  # (T, H, 1)
    dx = xs - (clip.start[1] + clip.velocity[1] * t)  # (T, 1, W)
    distance = np.sqrt(dy**2 + dx**2) if clip.disc else np.maximum(np.abs(dy), np.abs(dx))
    cover = np.clip(clip.radius + 0.5 - distance, 0.0, 1.0)[None]  # (1, T, H, W)
    colour = np.asarray(clip.colour, dtype=np.float32)[:, None, None, None]
    rng = np.random.default_rng(clip.noise_seed)
    background = 0.25 + noise * rng.standard_normal((3, num_frames, size, size), dtype=np.float32)
    return torch.from_numpy(np.clip(cover * colour + (1.0 - cover) * background, 0.0, 1.0).astype(np.float32))


class MovingShapes(Dataset):
    """`num_clips` clips of moving shapes; item i -> {"video": (3, T, H, W), "label": int}.

    Args:
        num_clips: dataset length.
        num_frames: T, frames per clip.
        size: H = W, pixels.
        seed: the dataset; use different seeds for training and held-out data.
        mean, std: per-channel normalisation applied to the [0, 1] frames.
    """

    classes = CLASSES

    def __init__(
        self,
        num_clips: int = 2048,
        num_frames: int = 8,
        size: int = 32,
        seed: int = 0,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ) -> None:
        for name, value, low in (("num_clips", num_clips, 1), ("num_frames", num_frames, 2), ("size", size, 16)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"MovingShapes: {name} must be an int >= {low}, got {value!r}")
        self.num_clips, self.num_frames, self.size, self.seed = num_clips, num_frames, size, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)

    def __len__(self) -> int:
        return self.num_clips

    def clip(self, index: int) -> ShapeClip:
        """The parameters of clip `index`: a pure function of (seed, index)."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"MovingShapes: index {index} out of range for {self.num_clips} clips")
        # Balanced classes: clip i has class i mod 8; everything else is drawn from (seed, i).
        rng = np.random.default_rng([self.seed, index])
        return sample_clip(rng, self.num_frames, self.size, label=index % len(CLASSES))

    def __getitem__(self, index: int) -> dict:
        clip = self.clip(index)
        video = render(clip, self.num_frames, self.size)
        return {"video": (video - self.mean) / self.std, "label": clip.label}
