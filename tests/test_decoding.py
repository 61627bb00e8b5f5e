"""vivit.data.decoding: only the requested frames, numbered as a full decode numbers them, on the
files a loader meets (B-frames over several keyframes, an audio track, variable frame rate, no
frame count, no index, no timestamps, a header promising frames the file lacks); torchcodec
against PyAV."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest
import torch

from support.videofiles import truncate, variable_rate_pts_ms, write_video
from vivit.data import VideoFolder, decode, decoding, temporal_view_indices, train_transform
from vivit.data.decoding import backend_unavailable_reason, open_video, read_frames
from vivit_kernels import uniform_frame_indices

av = pytest.importorskip("av", reason="PyAV writes and decodes the test files")

SIZE = dict(width=64, height=48)
GOP = {"g": "24"}  # several keyframes in 90 frames; libx264's 3 B-frames reorder within each


def _whole_packet_decode(path) -> torch.Tensor:
    """A full decode of every packet the demuxer does not mark corrupt (the oracle of a truncated file)."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.size and not packet.is_corrupt:
                frames += [f.to_ndarray(format="rgb24") for f in stream.codec_context.decode(packet)]
        frames += [f.to_ndarray(format="rgb24") for f in stream.codec_context.decode(None)]
    return torch.from_numpy(np.stack(frames))


def _make(kind: str, directory) -> tuple:
    """(path, the frame table source the PyAV reader should use, the full decode to compare with)."""
    if kind == "mp4":  # constant frame rate: the MP4 index gives count and timestamps
        path = write_video(directory / "cfr.mp4", 90, options=GOP, **SIZE)
        return path, "index", decode(path)
    if kind == "audio":  # an AAC track interleaved, as in downloaded clips
        path = write_video(directory / "audio.mp4", 60, options=GOP, audio=True, **SIZE)
        return path, "index", decode(path)
    if kind == "vfr":  # variable frame rate: the index's count is right, its timestamps need a scan
        path = write_video(directory / "vfr.mp4", 60, pts_ms=variable_rate_pts_ms(60), options=GOP, **SIZE)
        return path, "scan", decode(path)
    if kind == "mkv":  # no frame count in the header
        path = write_video(directory / "clip.mkv", 60, options=GOP, **SIZE)
        return path, "scan", decode(path)
    if kind == "ts":  # no index: seeks are a demuxer's guess
        path = write_video(directory / "clip.ts", 60, options=GOP, **SIZE)
        return path, "scan", decode(path)
    if kind == "h264":  # a raw stream: no timestamps at all
        path = write_video(directory / "clip.h264", 40, options=GOP, **SIZE)
        return path, "decode", decode(path)
    if kind == "truncated":  # index at the front lists 90 frames; the file holds about 60
        path = write_video(directory / "cut.mp4", 90, options=GOP, container_options={"movflags": "faststart"}, **SIZE)
        truncate(path, 0.7)
        return path, "scan", _whole_packet_decode(path)
    raise ValueError(kind)


KINDS = ["mp4", "audio", "vfr", "mkv", "ts", "h264", "truncated"]


def require_torchcodec() -> None:
    """Skip with the reason torchcodec cannot decode here (not installed, no FFmpeg libraries)."""
    __tracebackhide__ = True  # a skip names the test that asked
    reason = backend_unavailable_reason("torchcodec")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("videos")
    return {kind: _make(kind, directory) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_pyav_returns_the_frames_a_full_decode_numbers(files, kind):
    path, source, full = files[kind]
    with open_video(path) as video:
        assert video.num_frames == len(full)
        for seed in range(3):
            indices = uniform_frame_indices(len(full), 8, jitter=True, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(video.get(indices), full[indices])
        backwards = list(range(len(full)))[::-1]  # every frame, last first, from one open reader
        assert torch.equal(video.get(backwards), full[backwards])
        assert torch.equal(video.get([3, 3, 0]), full[[3, 3, 0]])  # repeats (clips longer than the video)
        assert video.table_source == source  # and no fallback on the way (right frames, but slow)
    if kind == "truncated":
        assert len(full) < 80  # the header's 90 frames are not all there


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
def test_frame_threads_give_the_same_frames(files, kind):
    """threads=0 (FFmpeg's choice: frame threads, as vivit-predict uses) with per-packet frame skipping."""
    path, _, full = files[kind]
    indices = torch.tensor([len(full) - 1, 2, 30, 31, 45, 0])
    with open_video(path, threads=0) as video:
        assert torch.equal(video.get(indices), full[indices])
        assert video.table_source != "decode"


def test_a_wrong_index_costs_time_not_frames(files, monkeypatch):
    """An index table that promises frames the stream lacks, and keyframes that start later than
    they do: the reader notices while decoding, rebuilds its table and chooses the indices again."""
    path, _, full = files["mp4"]
    real = decoding._index_table

    def wrong(container, stream, file):
        table = real(container, stream, file)
        step = table.pts[1] - table.pts[0]
        pts = table.pts + [table.pts[-1] + step * k for k in range(1, 9)]
        keys = [(p + 3 * step, i) for p, i in table.keys]
        return decoding.FrameTable(pts=pts, keys=keys, order=table.order, order_by=table.order_by, source="index")

    monkeypatch.setattr(decoding, "_index_table", wrong)
    counts = []

    def choose(count):
        counts.append(count)
        return torch.tensor([count - 1, count // 2, 5])

    frames, indices = read_frames(path, choose)
    assert counts == [len(full) + 8, len(full)]
    assert indices.tolist() == [len(full) - 1, len(full) // 2, 5] and torch.equal(frames, full[indices])


def test_a_frame_is_reached_from_its_own_keyframe(files, monkeypatch):
    """A frame after the first group of pictures costs the packets from its keyframe on (a few more
    for the B-frames' reordering), never a decode from the start of the file, for every keyframe."""
    path, _, full = files["mp4"]
    fed = []
    real = decoding.PyAVReader._from_keyframe

    def counted(self):
        for packet in real(self):
            fed.append(packet)
            yield packet

    monkeypatch.setattr(decoding.PyAVReader, "_from_keyframe", counted)
    with open_video(path) as video:
        assert video.table_source == "index"
        keys = [position for _, position in video._table.keys]
        assert len(keys) >= 3
        for key in keys[1:]:
            target = min(key + 3, len(full) - 1)
            fed.clear()
            assert torch.equal(video.get([target]), full[[target]])
            assert len(fed) <= target - key + 5, (key, target, len(fed))


@pytest.mark.parametrize("kind", ["mp4", "audio", "vfr", "mkv"])
def test_torchcodec_matches_pyav(files, kind):
    require_torchcodec()
    path, _, full = files[kind]
    indices = torch.tensor([len(full) - 1, 0, 7, 7, len(full) // 3])
    with open_video(path, "torchcodec") as video:
        assert video.num_frames == len(full)
        assert torch.equal(video.get(indices), full[indices])


@pytest.mark.parametrize("kind", ["ts", "h264", "truncated"])
def test_what_torchcodec_cannot_read_is_an_unreadable_file(files, kind, tmp_path):
    """torchcodec's exact mode cannot seek MPEG-TS or raw H.264, and counts and stops at the cut
    packet of a truncated file: it raises what marks a file unreadable (PyAV reads all three)."""
    require_torchcodec()
    path, _, _ = files[kind]
    with pytest.raises(decoding.decode_error_types()):
        with open_video(path, "torchcodec") as video:
            video.get([video.num_frames - 1])
    (tmp_path / "list.csv").write_text(f"{path},a\n")
    item = VideoFolder(
        tmp_path / "list.csv",
        num_frames=4,
        size=32,
        train=False,
        temporal_views=1,
        spatial_crops=1,
        backend="torchcodec",
    )[0]
    if kind != "truncated":  # a clip of a truncated file may end before the cut
        assert item["video"] is None and item["path"] == str(path) and item["error"]


def test_loader_items_equal_todays_full_decode(files, tmp_path):
    """VideoFolder's training clip (indices and augmentation from one seeded generator) and its
    evaluation views are what decoding every frame and indexing gave."""
    path, _, full = files["vfr"]
    (tmp_path / "list.csv").write_text(f"{path},a\n")
    train = VideoFolder(tmp_path / "list.csv", num_frames=8, size=32, train=True, seed=3)
    train.set_epoch(2)
    generator = torch.Generator().manual_seed(hash((3, 2, 0)) % 2**63)
    indices = uniform_frame_indices(len(full), 8, jitter=True, generator=generator)
    assert torch.equal(train[0]["video"], train_transform(full[indices], 32, generator))
    evaluation = VideoFolder(
        tmp_path / "list.csv", num_frames=8, size=32, train=False, temporal_views=3, spatial_crops=2
    )
    from vivit.data import eval_transform

    views = [eval_transform(full[i], 32, 2) for i in temporal_view_indices(len(full), 8, 3)]
    assert torch.equal(evaluation[0]["video"], torch.cat(views))


def test_bad_requests_fail_with_one_line(files):
    path, _, full = files["mp4"]
    with open_video(path) as video:
        with pytest.raises(IndexError, match=rf"frame indices \[{len(full)}\] out of range for a video of {len(full)}"):
            video.get([0, len(full)])
        with pytest.raises(ValueError, match="at least one index"):
            video.get([])
    with pytest.raises(ValueError, match="threads must be an int >= 0, got -1"):
        open_video(path, threads=-1)
    with pytest.raises(ValueError, match="unknown video backend 'decord'"):
        open_video(path, "decord")
    with pytest.raises(ValueError, match="unknown video backend"):
        VideoFolder(path, backend="decord")


# What torchcodec 0.17 raises when a decoder is made on a machine without FFmpeg's shared libraries
# (its import succeeds), abridged: one traceback per FFmpeg major version it tries.
NO_FFMPEG = """Could not load libtorchcodec. Likely causes:
          1. FFmpeg is not properly installed in your environment. We support
             versions 4, 5, 6, 7, 8, and 9, and we attempt to load libtorchcodec
             for each of those versions.

[start of libtorchcodec loading traceback]
FFmpeg version 9:
Traceback (most recent call last):
  File "torch/_ops.py", line 1587, in load_library
    ctypes.CDLL(path)
OSError: libavutil.so.61: cannot open shared object file: No such file or directory

The above exception was the direct cause of the following exception:

OSError: Could not load this library: torchcodec/libtorchcodec_core9.so
[end of libtorchcodec loading traceback]."""


@pytest.fixture
def torchcodec_without_ffmpeg(monkeypatch):
    """torchcodec as installed on a machine without FFmpeg: it imports, and making a decoder
    raises. Yields the sources decoders were asked for."""
    sources = []

    class VideoDecoder:
        def __init__(self, source, **options):
            sources.append(source)
            raise RuntimeError(NO_FFMPEG)

    package, decoders = types.ModuleType("torchcodec"), types.ModuleType("torchcodec.decoders")
    decoders.VideoDecoder, package.decoders = VideoDecoder, decoders
    monkeypatch.setitem(sys.modules, "torchcodec", package)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", decoders)
    decoding._probe.cache_clear()  # the probe's result is kept per process
    yield sources
    decoding._probe.cache_clear()


def test_torchcodec_without_ffmpeg_fails_at_once_with_the_reason(files, tmp_path, torchcodec_without_ffmpeg):
    reason = backend_unavailable_reason("torchcodec")
    assert reason == (
        "torchcodec cannot load FFmpeg (Could not load libtorchcodec: libavutil.so.61: cannot open "
        f"shared object file: No such file or directory); {decoding.FFMPEG_HINT}"
    )
    assert "apt-get install ffmpeg" in reason
    assert backend_unavailable_reason("torchcodec") == reason
    assert len(torchcodec_without_ffmpeg) == 1  # one decoder made, of an in-memory video, once per process
    assert isinstance(torchcodec_without_ffmpeg[0], bytes)
    path, _, _ = files["mp4"]
    with pytest.raises(ValueError) as error:
        open_video(path, "torchcodec")
    assert str(error.value) == f"video backend: {reason}"
    (tmp_path / "list.csv").write_text(f"{path},a\n")
    with pytest.raises(ValueError) as error:
        VideoFolder(tmp_path / "list.csv", backend="torchcodec")
    assert str(error.value) == f"video backend: {reason}"
    assert len(torchcodec_without_ffmpeg) == 1  # failed before any file was opened
    with pytest.raises(pytest.skip.Exception, match=re.escape(reason)):
        require_torchcodec()
    assert backend_unavailable_reason("pyav") is None
