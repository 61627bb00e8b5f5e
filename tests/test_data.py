"""vivit.data: the moving-shapes task, CSV listings, PyAV decoding, transforms, sampling, and
one training + evaluation step on real mp4 files (decoding itself: test_decoding.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vivit.data import (
    SYNTHETIC_CLASSES,
    DataError,
    MovingShapes,
    ShardedSampler,
    VideoFolder,
    decode,
    eval_transform,
    read_csv,
    temporal_view_indices,
    train_transform,
)
from vivit.data.synthetic import render, sample_clip
from vivit_kernels import uniform_frame_indices

av = pytest.importorskip("av", reason="PyAV decodes the video files")


def write_mp4(path, frames: int, height: int = 40, width: int = 48, seed: int = 0) -> None:
    """A small H.264 mp4 of random-colour frames."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            image = np.broadcast_to(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), (height, width, 3)).copy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ----------------------------------------------------------------------------- moving shapes


def test_moving_shapes_is_a_pure_function_of_seed_and_index():
    a, b = MovingShapes(16, seed=3), MovingShapes(16, seed=3)
    for i in (0, 7, 15, 2):  # any order
        assert torch.equal(a[i]["video"], b[i]["video"]) and a[i]["label"] == b[i]["label"]
    assert not torch.equal(a[5]["video"], MovingShapes(16, seed=4)[5]["video"])
    item = a[0]
    assert item["video"].shape == (3, 8, 32, 32) and item["video"].dtype == torch.float32
    assert sorted(a[i]["label"] for i in range(16)) == sorted(list(range(8)) * 2)  # balanced


def test_a_reversed_clip_is_an_equally_likely_clip_of_the_opposite_direction():
    """Drawn from the same random state, the opposite direction's clip is the time reversal of
    this one: the generator pairs every clip with its reversal at equal probability, so a
    frame-order-blind model cannot separate left from right or up from down."""
    opposite = {"right": "left", "left": "right", "down": "up", "up": "down"}
    for label, name in enumerate(SYNTHETIC_CLASSES):
        direction, speed = name.split("-")
        other = SYNTHETIC_CLASSES.index(f"{opposite[direction]}-{speed}")
        clip = sample_clip(np.random.default_rng(label), 8, 32, label=label)
        reverse = sample_clip(np.random.default_rng(label), 8, 32, label=other)
        forward = render(clip, 8, 32, noise=0.0)
        backward = render(reverse, 8, 32, noise=0.0)
        torch.testing.assert_close(forward.flip(1), backward, rtol=0, atol=1e-5)
        assert not torch.allclose(forward, backward, atol=1e-2)  # and it does move


@pytest.mark.parametrize("num_frames", [8, 16, 32])
def test_moving_shapes_of_any_length_stay_in_the_frame(num_frames):
    """Longer clips move slower per frame: every path fits the frame, and fast stays 2.5x slow."""
    for label, name in enumerate(SYNTHETIC_CLASSES):
        for seed in range(20):
            clip = sample_clip(np.random.default_rng(seed), num_frames, 32, label=label)
            for axis in (0, 1):
                ends = (clip.start[axis], clip.start[axis] + clip.velocity[axis] * (num_frames - 1))
                assert clip.radius <= min(ends) and max(ends) <= 32 - clip.radius, (name, seed, ends)
    speed = {
        name: max(
            abs(v)
            for v in sample_clip(np.random.default_rng(0), num_frames, 32, label=SYNTHETIC_CLASSES.index(name)).velocity
        )
        for name in ("up-slow", "up-fast")
    }
    assert speed["up-fast"] == pytest.approx(2.5 * speed["up-slow"])


def test_moving_shapes_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_frames"):
        MovingShapes(4, num_frames=1)
    with pytest.raises(IndexError):
        MovingShapes(4)[4]


# ----------------------------------------------------------------------------- CSV listings


def _listing(tmp_path, rows: list[str], files=("a.mp4", "b.mp4")):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "list.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_read_csv_resolves_paths_and_classes(tmp_path):
    items, classes = read_csv(_listing(tmp_path, ["path,label", "a.mp4,run", "b.mp4,jump"]))
    assert classes == ["jump", "run"]
    assert items == [(tmp_path / "a.mp4", 1), (tmp_path / "b.mp4", 0)]


@pytest.mark.parametrize(
    "rows, message",
    [
        (["path,label", "a.mp4,run", "missing.mp4,run"], r"line 3: video file not found: .*missing\.mp4"),
        (["a.mp4,run", "b.mp4,swim"], r"line 2: unknown label 'swim'"),
        (["a.mp4,run", "b.mp4"], r"line 2: expected 'path,label'"),
    ],
)
def test_read_csv_names_the_bad_row(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        read_csv(_listing(tmp_path, rows), classes=["run", "jump"])


# ----------------------------------------------------------------------------- decoding and views


def test_decode_and_multiview_on_real_files(tmp_path):
    write_mp4(tmp_path / "long.mp4", 20)
    write_mp4(tmp_path / "short.mp4", 3)  # shorter than the 8-frame clip: frames repeat
    (tmp_path / "corrupt.mp4").write_bytes((tmp_path / "long.mp4").read_bytes()[:200])
    frames = decode(tmp_path / "long.mp4")
    assert frames.shape == (20, 40, 48, 3) and frames.dtype == torch.uint8
    (tmp_path / "v.csv").write_text("long.mp4,a\nshort.mp4,b\ncorrupt.mp4,a\n")
    data = VideoFolder(tmp_path / "v.csv", num_frames=8, size=32, train=False, temporal_views=2, spatial_crops=3)
    long, short, corrupt = data[0], data[1], data[2]
    assert long["video"].shape == (6, 3, 8, 32, 32) and short["video"].shape == (6, 3, 8, 32, 32)
    assert corrupt["video"] is None and "corrupt.mp4" in corrupt["path"] and corrupt["error"]
    train = VideoFolder(tmp_path / "v.csv", num_frames=8, size=32, train=True, seed=1)
    first, again = train[0]["video"], train[0]["video"]
    assert first.shape == (3, 8, 32, 32) and torch.equal(first, again)  # augmentation is a function of the seed
    train.set_epoch(1)
    assert not torch.equal(first, train[0]["video"])


def test_temporal_views_tile_the_video():
    torch.testing.assert_close(temporal_view_indices(64, 8, 1)[0], uniform_frame_indices(64, 8))
    views = temporal_view_indices(64, 8, 4)
    assert torch.equal(torch.stack(views).T.flatten(), torch.arange(1, 64, 2))  # every other frame, once
    assert all(int(v.max()) < 3 for v in temporal_view_indices(3, 8, 4))


def test_transforms_crop_and_normalise():
    frames = torch.arange(40 * 48, dtype=torch.float32).view(1, 40, 48, 1).expand(4, 40, 48, 3).to(torch.uint8)
    crops = eval_transform(frames, 40, 3)  # no resize: short side is already 40
    assert crops.shape == (3, 3, 4, 40, 40)
    # left, centre and right crops of the long side
    full = (frames.float() / 255 - 0.5) / 0.5
    for crop, left in zip(crops, (0, 4, 8)):
        torch.testing.assert_close(crop[0, 0], full[0, :, left : left + 40, 0])
    out = train_transform(frames, 32, torch.Generator().manual_seed(0))
    assert out.shape == (3, 4, 32, 32) and -1.0 <= out.min() and out.max() <= 1.0


def test_uint8_resize_is_within_one_step_of_float32():
    """The transforms resize uint8 frames (torch's fast path); the float32 resize is the reference."""
    from vivit.data.transforms import resize_short_side

    frames = torch.randint(0, 256, (3, 3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fast = resize_short_side(frames.contiguous(memory_format=torch.channels_last), 23)
    ref = torch.nn.functional.interpolate(
        frames.float(), size=(23, 32), mode="bilinear", align_corners=False, antialias=True
    )
    assert fast.shape == (3, 3, 23, 32) and fast.dtype == torch.uint8
    assert (fast.float() - ref).abs().max() <= 1.0


def test_sharded_batches_make_the_single_process_batch():
    single = ShardedSampler(37, seed=5)
    ranks = [ShardedSampler(37, seed=5, rank=r, world_size=2) for r in range(2)]
    order, shards = list(single), [list(s) for s in ranks]
    for k in range(4):  # global batch of 8 == per-rank batches of 4
        assert sorted(shards[0][4 * k : 4 * k + 4] + shards[1][4 * k : 4 * k + 4]) == sorted(order[8 * k : 8 * k + 8])
    ranks[1].set_epoch(0, start=5)
    assert list(ranks[1]) == shards[1][5:] and len(ranks[1]) == len(shards[1]) - 5
    ranks[1].set_epoch(1)
    assert list(ranks[1]) != shards[1]
    unpadded = [ShardedSampler(5, shuffle=False, rank=r, world_size=2, pad=False) for r in range(2)]
    assert sorted(list(unpadded[0]) + list(unpadded[1])) == list(range(5))


# ----------------------------------------------------------------------------- train and evaluate on mp4 files


def test_train_and_evaluate_one_step_on_video_files(tmp_path, capsys):
    from vivit.cli.evaluate import main as eval_main
    from vivit.cli.predict import main as predict_main
    from vivit.cli.train import main as train_main

    for i in range(4):
        write_mp4(tmp_path / f"clip{i}.mp4", 12, seed=i)
    write_mp4(tmp_path / "short.mp4", 3, seed=9)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    rows = [
        "path,label",
        "clip0.mp4,jump",
        "clip1.mp4,run",
        "corrupt.mp4,run",
        "clip2.mp4,jump",
        "short.mp4,run",
        "clip3.mp4,run",
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = [
        "--train-csv",
        str(tmp_path / "train.csv"),
        "--val-csv",
        str(tmp_path / "train.csv"),
        "--dim",
        "32",
        "--depth",
        "1",
        "--heads",
        "2",
        "--tubelet",
        "2",
        "16",
        "16",
        "--num-frames",
        "4",
        "--img-size",
        "32",
        "--batch-size",
        "6",
        "--steps",
        "1",
        "--workers",
        "0",
        "--temporal-views",
        "2",
        "--spatial-crops",
        "2",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    with pytest.warns(UserWarning, match=r"skipping unreadable video .*corrupt\.mp4"):
        train_main(args)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in records if r.get("event") == "epoch")
    summary = records[-1]
    assert epoch["skipped_videos"] == 1
    # Every step of this run waits for its batch (decoded in the main process, --workers 0).
    step = next(r for r in records if "event" not in r)
    assert 0 < step["data_wait_fraction"] < 1
    assert summary["event"] == "summary" and summary["steps"] == 1 and summary["val_clips"] == 5
    assert summary["skipped_videos"] == 1 and summary["val_skipped"] == 1
    capsys.readouterr()

    with pytest.warns(UserWarning, match="corrupt.mp4"):
        eval_main(
            [
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--csv",
                str(tmp_path / "train.csv"),
                "--temporal-views",
                "2",
                "--spatial-crops",
                "1",
            ]
        )
    assert "top-1" in capsys.readouterr().out
    predict_main([str(tmp_path / "clip1.mp4"), "--checkpoint", str(out / "checkpoint.pt")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and {line.split()[1] for line in lines} == {"jump", "run"}


def test_a_bad_listing_fails_before_training(tmp_path):
    from vivit.cli.train import main as train_main

    write_mp4(tmp_path / "a.mp4", 4)
    (tmp_path / "train.csv").write_text("a.mp4,run\nb.mp4,run\n")
    with pytest.raises(SystemExit, match=r"train\.csv line 2: video file not found"):
        train_main(["--train-csv", str(tmp_path / "train.csv"), "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
