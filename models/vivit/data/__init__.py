"""Video data: the built-in moving-shapes task, video folders listed in a CSV, decoding only the
sampled frames, transforms, sampling."""

from .collate import collate
from .decoding import BACKENDS as VIDEO_BACKENDS
from .decoding import backend_unavailable_reason, open_video, read_frames
from .sampler import ShardedSampler
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import MovingShapes
from .transforms import IMAGE_MEAN, IMAGE_STD, eval_transform, train_transform
from .video import DataError, VideoFolder, decode, read_csv, temporal_view_indices

__all__ = [
    "DataError",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "MovingShapes",
    "SYNTHETIC_CLASSES",
    "ShardedSampler",
    "VideoFolder",
    "collate",
    "decode",
    "eval_transform",
    "read_csv",
    "temporal_view_indices",
    "train_transform",
    "VIDEO_BACKENDS",
    "backend_unavailable_reason",
    "open_video",
    "read_frames",
]
