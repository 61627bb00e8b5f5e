"""A folder of video files listed in a CSV of `path,label` rows (Kinetics-style).

Training draws one clip per video: `num_frames` frames by jittered uniform sampling over the
whole video, a random scale and crop, a random horizontal flip. Evaluation takes the multi-view
set of ViViT: `temporal_views` clips x `spatial_crops` crops, whose logits are averaged. Only
the sampled frames are decoded (see `decoding.py`); the views of one video are decoded together.

A file that cannot be decoded is not fatal: the item comes back as `None` with its path, and
`collate` drops it and reports it in the batch. A missing file or an unknown label is a
`DataError` naming the CSV row, raised when the dataset is built (before training starts).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vivit_kernels import uniform_frame_indices

from .decoding import DEFAULT_BACKEND, check_backend, decode_error_types, read_frames
from .transforms import IMAGE_MEAN, IMAGE_STD, eval_transform, train_transform


class DataError(ValueError):
    """A problem with the data listing (not with one decodable-or-not file)."""


def read_csv(
    csv_path: str | Path, root: str | Path | None = None, classes: list[str] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """Parse and check a `path,label` CSV.

    Args:
        csv_path: the listing; an optional first row `path,label` is a header.
        root: directory relative paths are resolved against (default: the CSV's directory).
        classes: the known labels in class-index order; None takes the sorted set of labels
            found in this CSV (a training set defines the classes, evaluation reuses them).

    Returns:
        ([(absolute path, class index)], classes).

    Raises:
        DataError: naming the CSV line, for a malformed row, a missing file or an unknown label.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV file not found")
    root = Path(root) if root is not None else csv_path.parent
    rows: list[tuple[int, Path, str]] = []
    with open(csv_path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if line == 1 and [cell.strip().lower() for cell in row] == ["path", "label"]:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{csv_path} line {line}: expected 'path,label', got {','.join(row)!r}")
            path = Path(row[0].strip())
            rows.append((line, path if path.is_absolute() else root / path, row[1].strip()))
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    if classes is None:
        classes = sorted({label for _, _, label in rows})
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for line, path, label in rows:
        if not path.is_file():
            raise DataError(f"{csv_path} line {line}: video file not found: {path}")
        if label not in index:
            known = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
            raise DataError(f"{csv_path} line {line}: unknown label {label!r} (known: {known})")
        items.append((path, index[label]))
    return items, list(classes)


def decode(path: str | Path) -> torch.Tensor:
    """All frames of a video's first video stream: uint8 (T, H, W, 3), RGB, decoded with PyAV.

    Memory grows with the video's length; a loader wants `read_frames` (only the sampled frames).
    Raises whatever PyAV raises for an unreadable file, or ValueError when no frame decodes.
    """
    import av  # imported here so the synthetic data needs no PyAV

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError("no frames decoded")
    return torch.from_numpy(np.stack(frames))


def temporal_view_indices(clip_frames: int, num_frames: int, views: int) -> list[torch.Tensor]:
    """Frame indices of `views` evaluation clips of `num_frames` frames each.

    The video is cut into `num_frames` equal segments (as in training's uniform sampling);
    view j takes the point at fraction (j + 0.5) / views of every segment, so the views tile
    the video evenly. One view is the centred sampling of `uniform_frame_indices`.
    """
    if views == 1:
        return [uniform_frame_indices(clip_frames, num_frames)]
    segment = clip_frames / num_frames
    out = []
    for j in range(views):
        positions = (torch.arange(num_frames, dtype=torch.float64) + (j + 0.5) / views) * segment
        out.append(positions.floor().long().clamp(0, clip_frames - 1))
    return out


class VideoFolder(Dataset):
    """Videos listed in a `path,label` CSV.

    Item i -> {"video": (C, T, size, size) in training or (views, C, T, size, size) in
    evaluation, "label": int, "path": str}; "video" is None when the file cannot be decoded.

    Args:
        csv_path, root, classes: see `read_csv`.
        num_frames: frames per clip.
        size: crop size (H = W).
        train: random clip / crop / flip, else the multi-view evaluation set.
        temporal_views, spatial_crops: the evaluation views (ViViT tests with 4 x 3).
        mean, std: normalisation of the image model the network starts from.
        seed: augmentations of item i in epoch e are a pure function of (seed, e, i).
        flip: horizontal flips in training (off for data whose label depends on left/right).
        backend: video decoder, "pyav" or "torchcodec" (see `decoding.py`).
        decoder_threads: threads per decode; 1 suits loader workers, 0 lets FFmpeg choose.
    """

    def __init__(
        self,
        csv_path: str | Path,
        *,
        root: str | Path | None = None,
        classes: list[str] | None = None,
        num_frames: int = 32,
        size: int = 224,
        train: bool = True,
        temporal_views: int = 4,
        spatial_crops: int = 3,
        mean=IMAGE_MEAN,
        std=IMAGE_STD,
        seed: int = 0,
        flip: bool = True,
        backend: str = DEFAULT_BACKEND,
        decoder_threads: int = 1,
    ) -> None:
        try:
            check_backend(backend)
        except ValueError as error:  # a DataError: the command-line tools report it in one line
            raise DataError(str(error)) from None
        self.items, self.classes = read_csv(csv_path, root, classes)
        self.backend, self.decoder_threads = backend, decoder_threads
        self.num_frames, self.size, self.train = num_frames, size, train
        self.temporal_views, self.spatial_crops = temporal_views, spatial_crops
        self.mean, self.std, self.seed, self.flip = tuple(mean), tuple(std), seed, flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, label = self.items[index]
        T = self.num_frames
        if self.train:
            seed = hash((self.seed, self.epoch, index)) % 2**63
            generator = torch.Generator()

            def choose(count: int) -> torch.Tensor:
                generator.manual_seed(seed)  # the same draw if the count is corrected
                return uniform_frame_indices(count, T, jitter=True, generator=generator)
        else:

            def choose(count: int) -> torch.Tensor:
                return torch.cat(temporal_view_indices(count, T, self.temporal_views))

        try:
            frames, _ = read_frames(path, choose, self.backend, threads=self.decoder_threads)
        except decode_error_types() as error:
            return {"video": None, "label": label, "path": str(path), "error": f"{type(error).__name__}: {error}"}
        if self.train:
            video = train_transform(frames, self.size, generator, mean=self.mean, std=self.std, flip=self.flip)
        else:
            views = [
                eval_transform(frames[j * T : (j + 1) * T], self.size, self.spatial_crops, mean=self.mean, std=self.std)
                for j in range(self.temporal_views)
            ]
            video = torch.cat(views)  # (temporal_views * spatial_crops, C, T, size, size)
        return {"video": video, "label": label, "path": str(path)}
