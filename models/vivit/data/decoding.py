"""Decode only the frames a clip needs.

Frame i of a video is the i-th frame a full decode of its first video stream outputs (frames in
presentation order). A reader finds the frame count, then decodes just the requested frames:
it seeks to the keyframe before each run of wanted frames, decodes forward, and converts only the
wanted frames to RGB. Memory is the kept frames plus the decoder's own few reference frames,
whatever the video's length.

Backends:
- "pyav" (default): PyAV, whose wheels bundle FFmpeg.
- "torchcodec": torchcodec's `VideoDecoder` in exact seek mode; it needs the system's FFmpeg
  libraries (see `backend_unavailable_reason`).

How the PyAV reader numbers frames: a frame table maps index i to a presentation timestamp, and
frames are recognised by their timestamps, so a seek that lands early only costs time. The table
comes from the first source that holds, in this order:
1. "index": the container's sample index (MP4/MOV), when it lists every frame (as many entries
   as the header's frame count, all inside the file) at a constant frame duration: timestamps
   follow from the first one, and nothing is read to count.
2. "scan": every packet's timestamps, read without decoding (variable frame rate, containers
   without a count such as Matroska or MPEG-TS, truncated files whose header promises more).
3. "decode": a full decode that counts frames, when packets carry no timestamps (raw H.264).
A decoded frame that contradicts the table (a timestamp the table lacks, a wanted frame that
never comes) discards it for the next source, and the frames are decoded again, so a wrong
header costs time, never a wrong frame.
"""

from __future__ import annotations

import bisect
import functools
import io
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("pyav", "torchcodec")
DEFAULT_BACKEND = "pyav"

FFMPEG_HINT = (
    "torchcodec needs the system's FFmpeg shared libraries (4 to 9): `apt-get install ffmpeg` "
    "(Debian/Ubuntu), `conda install -c conda-forge ffmpeg`, or `brew install ffmpeg`"
)


def backend_unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot decode here, or None when it can.

    Each backend is tried once per process on a tiny in-memory video: torchcodec imports without
    FFmpeg and only fails when a decoder is made, so importing proves nothing.
    """
    if backend not in BACKENDS:
        return f"unknown video backend {backend!r} (choose from {', '.join(BACKENDS)})"
    return _probe(backend)


def _probe_video(frames: int = 2, width: int = 16, height: int = 16) -> bytes:
    """A few grey frames as YUV4MPEG2 (uncompressed, 4:2:0): every FFmpeg build reads it, and
    writing it needs nothing but Python."""
    header = f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1 C420jpeg\n".encode()
    luma, chroma = width * height, 2 * (width // 2) * (height // 2)
    return header + b"".join(b"FRAME\n" + bytes([16 + 40 * i]) * luma + b"\x80" * chroma for i in range(frames))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


@functools.cache
def _probe(backend: str) -> str | None:
    if backend == "pyav":
        try:
            import av

            with av.open(io.BytesIO(_probe_video()), format="yuv4mpegpipe") as container:
                next(container.decode(video=0))
        except ImportError as error:
            return f"pyav is not installed ({error}); pip install av"
        except Exception as error:  # a broken install: whatever it raises, in one line
            return f"pyav cannot decode ({_first_line(error)}); pip install --force-reinstall av"
        return None
    try:
        from torchcodec.decoders import VideoDecoder

        VideoDecoder(_probe_video(), seek_mode="exact", dimension_order="NHWC").get_frames_at([1])
    except ImportError as error:
        return f"torchcodec is not installed ({error}); pip install torchcodec; {FFMPEG_HINT}"
    except Exception as error:  # without FFmpeg: RuntimeError("Could not load libtorchcodec ...")
        # Its first line only lists likely causes; the loader's own error names the missing library.
        cause = re.search(r"OSError: (?!Could not load this library)(.+)", str(error))
        detail = re.sub(r"[.:]?\s*Likely causes:?$", "", _first_line(error))
        detail += f": {cause.group(1).strip()}" if cause else ""
        return f"torchcodec cannot load FFmpeg ({detail}); {FFMPEG_HINT}"
    return None


def check_backend(backend: str) -> None:
    """Raise ValueError with the reason when `backend` cannot decode here."""
    reason = backend_unavailable_reason(backend)
    if reason:
        raise ValueError(f"video backend: {reason}")


def decode_error_types() -> tuple[type[BaseException], ...]:
    """What decoding an unreadable file raises, for every backend (the file is then skipped)."""
    types: list[type[BaseException]] = [OSError, ValueError, EOFError, RuntimeError]
    try:
        import av

        types.append(av.FFmpegError)
    except ImportError:
        pass
    return tuple(types)


def open_video(path: str | Path, backend: str = DEFAULT_BACKEND, *, threads: int = 1) -> VideoReader:
    """A reader of the first video stream of `path` (see `VideoReader`).

    Args:
        backend: "pyav" or "torchcodec".
        threads: decoder threads; 1 suits loader workers (the workers are the parallelism),
            0 lets FFmpeg choose.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"open_video: threads must be an int >= 0, got {threads!r}")
    check_backend(backend)
    if backend == "torchcodec":
        return TorchCodecReader(path, threads=threads)
    return PyAVReader(path, threads=threads)


def read_frames(
    path: str | Path, choose: Callable[[int], torch.Tensor], backend: str = DEFAULT_BACKEND, *, threads: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frames `choose(frame_count)` picks: (uint8 (len(indices), H, W, 3) RGB, indices).

    `choose` may be called again with a corrected count when the container's count turns out
    wrong, so it must depend on the count alone (re-seed any generator it draws from).
    """
    with open_video(path, backend, threads=threads) as video:
        return video.read(choose)


def _check_indices(indices: Sequence[int] | torch.Tensor, count: int) -> list[int]:
    values = indices.tolist() if isinstance(indices, torch.Tensor) else [int(i) for i in indices]
    if not values:
        raise ValueError("frame indices: need at least one index")
    bad = [i for i in values if not 0 <= i < count]
    if bad:
        raise IndexError(f"frame indices {bad[:4]} out of range for a video of {count} frames")
    return values


class FrameCountChanged(Exception):
    """The count the indices were chosen from was wrong; the reader now holds the right one
    (`read` chooses again; a caller of `get` should too)."""


class VideoReader:
    """Frames of one video by index. Use as a context manager, or call `close()`.

    `num_frames` is the frame count; `get(indices)` returns uint8 (len(indices), H, W, 3) RGB
    frames in the order asked (repeats allowed); `read(choose)` picks indices from the count.
    """

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    @property
    def num_frames(self) -> int:
        raise NotImplementedError

    def get(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def read(self, choose: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames, indices) for indices = choose(num_frames), retried once the count is corrected."""
        while True:
            indices = choose(self.num_frames)
            try:
                return self.get(indices), torch.as_tensor(indices)
            except FrameCountChanged:
                continue


# ----------------------------------------------------------------------------- PyAV


@dataclass
class FrameTable:
    """Where frames are, in the stream's time base.

    pts[i]: presentation timestamp of frame i (ascending). keys: (pts, decode position) of each
    keyframe (pts estimated from the index). order: decode position of each packet, keyed by its
    `order_by` timestamp ("dts" from the index; "pts" from a scan, as Matroska leaves some dts unset).
    """

    pts: list[int]
    keys: list[tuple[int, int]]
    order: dict[int, int]
    order_by: str
    source: str  # "index" or "scan"

    def __post_init__(self) -> None:
        self.index_of = {p: i for i, p in enumerate(self.pts)}
        self._key_pts = [key[0] for key in self.keys]
        self._keys_ascend = all(a < b for a, b in zip(self._key_pts, self._key_pts[1:]))

    def position(self, packet) -> int | None:
        """Decode position of a packet, None for one the table does not list."""
        return self.order.get(packet.pts if self.order_by == "pts" else packet.dts)

    def keyframe_before(self, pts: int) -> tuple[int, int]:
        """The last keyframe (in decode order) at or before presentation time `pts`, else the first."""
        if self._keys_ascend:  # keyframes shown in decode order, as nearly always
            return self.keys[max(bisect.bisect_right(self._key_pts, pts) - 1, 0)]
        best = None
        for key in self.keys:
            if key[0] <= pts and (best is None or key[1] > best[1]):
                best = key
        return best if best is not None else self.keys[0]


class _TableWrong(Exception):
    """Decoded frames contradict the frame table: rebuild it from the next source."""


def _index_table(container, stream, path: Path) -> FrameTable | None:
    """Source 1: the MP4/MOV sample index, when it is complete and at a constant frame duration."""
    if "mp4" not in container.format.name or stream.start_time is None:
        return None
    entries = list(stream.index_entries)
    count = len(entries)
    if count < 2 or count != stream.frames:
        return None
    size = path.stat().st_size
    dts = [e.timestamp for e in entries]
    step = dts[1] - dts[0]
    if step <= 0 or any(e.is_discard or e.pos + e.size > size for e in entries):
        return None
    if any(b - a != step for a, b in zip(dts, dts[1:])):
        return None  # variable frame rate: the presentation times need a scan
    start = stream.start_time
    # A keyframe that opens a closed group of pictures is shown as long after its decode time as
    # the first frame is; a wrong guess is caught while decoding.
    shift = start - dts[0]
    keys = [(e.timestamp + shift, i) for i, e in enumerate(entries) if e.is_keyframe]
    if not keys:
        return None
    return FrameTable(
        pts=list(range(start, start + count * step, step)),
        keys=keys,
        order={t: i for i, t in enumerate(dts)},
        order_by="dts",
        source="index",
    )


def _scan_table(container, stream) -> FrameTable | None:
    """Source 2: every packet's timestamps, read without decoding. Packets the demuxer marks
    corrupt (cut off by the end of a truncated file) are left out: they hold no whole frame."""
    pts, keys = [], []
    for packet in container.demux(stream):
        if packet.size == 0 or packet.is_discard or packet.is_corrupt:
            continue
        if packet.pts is None:
            return None
        if packet.is_keyframe:
            keys.append((packet.pts, len(pts)))
        pts.append(packet.pts)
    order = {p: i for i, p in enumerate(pts)}
    if not keys or len(order) != len(pts):
        return None
    return FrameTable(pts=sorted(pts), keys=keys, order=order, order_by="pts", source="scan")


class PyAVReader(VideoReader):
    """The PyAV backend: seeks by keyframe through the frame table (see the module docstring)."""

    def __init__(self, path: str | Path, *, threads: int = 1) -> None:
        import av
        from av.video.reformatter import VideoReformatter

        self.path, self._av, self._threads = Path(path), av, threads
        self._sources = ["index", "scan", "decode"]
        self._table: FrameTable | None = None
        self._count: int | None = None  # frames counted by a full decode (source 3)
        # One colour converter for every frame: `frame.to_ndarray(format=...)` builds a new
        # swscale context per frame.
        self._reformatter = VideoReformatter()
        self._open()

    def _rgb(self, frame) -> np.ndarray:
        return self._reformatter.reformat(frame, format="rgb24").to_ndarray()

    def _open(self) -> None:
        self._container = self._av.open(str(self.path))
        if not self._container.streams.video:
            self._container.close()
            raise ValueError("no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = self._threads
        self._stream.codec_context.thread_type = "AUTO" if self._threads != 1 else "SLICE"

    def close(self) -> None:
        self._container.close()

    # ------------------------------------------------------------------------- the frame table

    @property
    def table_source(self) -> str:
        """Where the frame count came from: "index", "scan" or "decode"."""
        self.num_frames  # noqa: B018  (builds the table)
        return self._sources[0]

    @property
    def num_frames(self) -> int:
        while self._table is None and self._count is None:
            source = self._sources[0]
            if source == "index":
                self._table = _index_table(self._container, self._stream, self.path)
            elif source == "scan":
                self._table = _scan_table(self._container, self._stream)
            else:
                self._count = self._count_by_decoding()
                if self._count == 0:
                    raise ValueError("no frames decoded")
                break
            if self._table is None:
                self._sources.pop(0)
        return len(self._table.pts) if self._table is not None else self._count

    def _next_source(self) -> None:
        self._sources.pop(0)
        self._table = None
        self._restart()

    # ------------------------------------------------------------------------- decoding

    def get(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        count = self.num_frames
        wanted = _check_indices(indices, count)
        while True:
            try:
                frames = self._decode_by_table(wanted) if self._table is not None else self._decode_in_order(wanted)
            except _TableWrong:
                self._next_source()
                if self.num_frames != count:
                    raise FrameCountChanged(
                        f"{self.path}: the container said {count} frames, decoding finds {self.num_frames}"
                    ) from None
                continue
            return torch.from_numpy(np.stack([frames[i] for i in wanted]))

    def _decode_by_table(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Seek to the keyframe before each wanted frame not reached yet, decode forward, convert
        only the wanted frames. Frames that nothing references are not even decoded."""
        table = self._table
        context = self._stream.codec_context
        want = {table.pts[i]: i for i in wanted}
        pending = sorted(want)  # wanted timestamps not decoded yet
        out: dict[int, np.ndarray] = {}
        packets, last, key = None, None, None  # last: decode position of the last packet fed
        while pending:
            target = pending[0]
            next_key = following = table.keyframe_before(target)
            if packets is None or (next_key != key and last is not None and last < next_key[1]):
                # Every wanted frame before pending[0] is out, and none after it was fed yet:
                # skipping to its keyframe loses nothing. Demuxers seek by presentation time;
                # landing on an earlier keyframe only costs decoding.
                key = next_key
                packets, last = self._packets_from(key), None
                context = self._stream.codec_context  # a new one if the reader had to reopen the file
            for packet in packets:
                position = table.position(packet)
                if position is None and packet.size:
                    continue  # not a whole frame (see _scan_table)
                last = position if position is not None else last
                context.skip_frame = "DEFAULT" if packet.pts in want else "NONREF"
                for frame in context.decode(packet):
                    if frame.pts not in table.index_of:
                        raise _TableWrong
                    if frame.pts in want and frame.pts not in out:
                        out[frame.pts] = self._rgb(frame)
                    while pending and pending[0] in out:
                        pending.pop(0)
                    if pending and frame.pts > pending[0]:
                        # Frames come out in presentation order from the keyframe on: a wanted
                        # frame was skipped over (or the seek went past it).
                        raise _TableWrong
                if not pending:
                    break
                if pending[0] != target:
                    target, following = pending[0], table.keyframe_before(pending[0])
                if following != key and last is not None and last < following[1]:
                    break  # the next wanted frame starts at a keyframe not reached yet: seek there
            else:
                raise _TableWrong  # the stream ended before a wanted frame
        return {want[p]: image for p, image in out.items()}

    def _packets_from(self, key: tuple[int, int]):
        """Packets from keyframe `key` or an earlier one. A demuxer that seeks by guessing (MPEG-TS)
        can land past it: then seek to earlier keyframes, and at last read from the start."""
        table = self._table
        k = table.keys.index(key)
        for earlier in reversed(table.keys[max(k - 2, 0) : k + 1]):  # key, then up to two before it
            self._container.seek(earlier[0], stream=self._stream, backward=True)
            packets = self._from_keyframe()
            first = next(packets, None)
            position = None if first is None else table.position(first)
            if position is not None and position <= key[1]:
                return itertools.chain([first], packets)
        self._restart()
        return self._from_keyframe()

    def _from_keyframe(self):
        """Packets of the stream from the first keyframe after the seek, then an empty packet
        that drains the decoder."""
        started = False
        for packet in self._container.demux(self._stream):
            if packet.size == 0:
                yield packet
                return
            if not started and not packet.is_keyframe:
                continue
            started = True
            yield packet

    def _decode_in_order(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Source 3: decode from the start and keep the wanted frames (numbered by output order)."""
        want = set(wanted)
        out = {}
        self._restart()
        for i, frame in enumerate(self._container.decode(self._stream)):
            if i in want:
                out[i] = self._rgb(frame)
            if len(out) == len(want):
                break
        if len(out) != len(want):
            raise ValueError(f"{len(want) - len(out)} wanted frame(s) did not decode")
        return out

    def _count_by_decoding(self) -> int:
        self._restart()
        return sum(1 for _ in self._container.decode(self._stream))

    def _restart(self) -> None:
        """Back to the first packet with a fresh decoder (reopening works for unseekable streams too)."""
        self._container.close()
        self._open()


# ----------------------------------------------------------------------------- torchcodec


class TorchCodecReader(VideoReader):
    """The torchcodec backend: `VideoDecoder` in exact seek mode (it scans the packets once and
    numbers frames in presentation order, as a full decode does)."""

    def __init__(self, path: str | Path, *, threads: int = 1) -> None:
        from torchcodec.decoders import VideoDecoder

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such video file: {self.path}")
        self._decoder = VideoDecoder(
            str(self.path), seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=threads
        )

    def close(self) -> None:
        self._decoder = None

    @property
    def num_frames(self) -> int:
        count = len(self._decoder)
        if count == 0:
            raise ValueError("no frames decoded")
        return count

    def get(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        wanted = _check_indices(indices, self.num_frames)
        unique = sorted(set(wanted))
        frames = self._decoder.get_frames_at(unique).data
        position = {i: k for k, i in enumerate(unique)}
        return frames[[position[i] for i in wanted]].contiguous()
