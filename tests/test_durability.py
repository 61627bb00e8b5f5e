"""Durability observed: the faults vivit.checkpoint and the resume path guard against are injected,
and what they leave on disk is checked.

- A writer killed (SIGKILL: no handler, no `finally` runs) in the middle of writing a checkpoint,
  between its write and its rename, or just after the rename: the final name holds the previous
  checkpoint or the new one, whole. The dead writer's temporary file is never read as a
  checkpoint, and the next save removes it; a live writer's is left alone.
- The order of the durable writes, recorded: the temporary file is fsync'ed whole before the
  rename, and the directory after it.
- A checkpoint cut at any byte is refused with the one-line error, also by `--resume auto`.
- A training run killed mid-run (a metrics record half written; a checkpoint written but not
  renamed) and resumed: metrics.jsonl holds each record once, and the weights are bit for bit
  those of an uninterrupted run.

The killed processes are forked from the test process (no second interpreter start-up); a forked
child that trains runs on one thread, as `--threads 1` sets, so no OpenMP pool crosses the fork.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_train import TINY, run

from vivit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vivit.cli import UserError
from vivit.run import metrics

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not Path("/proc/self/fd").is_dir(),
    reason="the faults are injected into forked processes, observed through /proc",
)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_in_child(body: Callable[[], None], timeout: float = 120.0) -> None:
    """Run `body` in a forked child, which must die of SIGKILL (the fault `body` injects); fail when
    it returns, raises or hangs instead."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        status = 0
        try:
            body()
        except BaseException:
            traceback.print_exc()
            status = 3
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child did not reach its fault within {timeout:.0f} s")
        time.sleep(0.02)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the child was to be killed at its fault, but exited with status {os.WEXITSTATUS(status)}"
    )


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((100_000,), float(step))}


def _whole(path: Path, step: int) -> bool:
    state = load_checkpoint(path)
    return state["step"] == step and torch.equal(state["w"], _state(step)["w"])


def _temporaries(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if ".tmp-" in name]


def _during_write(path: Path, state: dict) -> None:
    """Half the serialised checkpoint written (and flushed to the kernel), then the kill."""
    real_save = torch.save

    def half_then_kill(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        _kill_self()

    torch.save = half_then_kill
    save_checkpoint(state, path)


def _before_rename(path: Path, state: dict) -> None:
    os.replace = lambda src, dst: _kill_self()
    save_checkpoint(state, path)


def _after_rename(path: Path, state: dict) -> None:
    real_replace = os.replace

    def replace_then_kill(src, dst):
        real_replace(src, dst)
        _kill_self()

    os.replace = replace_then_kill
    save_checkpoint(state, path)


# kill point -> (what the child runs, the step the final name holds afterwards, whether the dead
# writer's temporary file remains)
KILL_POINTS = {
    "during the write": (_during_write, 1, True),
    "between write and rename": (_before_rename, 1, True),
    "after the rename": (_after_rename, 2, False),
}


@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
def test_a_writer_killed_leaves_a_whole_checkpoint_under_the_final_name(tmp_path, kill_point):
    inject, holds, leaves_temporary = KILL_POINTS[kill_point]
    path = save_checkpoint(_state(1), tmp_path / "ckpt.pt")
    new = _state(2)  # made before the fork: the child only writes
    die_in_child(lambda: inject(path, new))

    assert _whole(path, holds)
    left = _temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", *left]) and len(left) == int(leaves_temporary)
    if kill_point == "between write and rename":
        # The kill came after the whole new checkpoint was written: it is there, but only under
        # the temporary name, which nothing reads as a checkpoint.
        assert _whole(tmp_path / left[0], 2)
    save_checkpoint(_state(3), path)  # the next save removes the dead writer's temporary file
    assert os.listdir(tmp_path) == ["ckpt.pt"] and _whole(path, 3)


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    """A temporary file named after a running process (another run writing into the same
    directory) is neither removed, read nor signalled; one of a process that has exited is
    removed. The checkpoint's own name may hold the temporary files' mark."""
    exited = os.fork()
    if exited == 0:
        os._exit(0)
    os.waitpid(exited, 0)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        name = "run.tmp-3.pt"
        live = tmp_path / f".{name}.tmp-{writer.pid}"
        dead = tmp_path / f".{name}.tmp-{exited}"
        for temporary in (live, dead):
            temporary.write_bytes(b"half a checkpoint")
        path = save_checkpoint(_state(1), tmp_path / name)
        assert writer.poll() is None  # still running: probed, not signalled
    finally:
        writer.kill()
        writer.wait()
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, name])
    assert live.read_bytes() == b"half a checkpoint" and _whole(path, 1)


def test_the_file_is_fsynced_whole_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """Every fsync and rename of a save, in order: fsync(temporary file, holding every byte of the
    checkpoint), rename onto the final name, fsync(directory). Without the file's fsync, or with
    it after the rename, a power cut can leave an empty or partial file under the final name;
    without the directory's, the rename itself can be lost."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        size = info.st_size if stat.S_ISREG(info.st_mode) else None
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), size))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = save_checkpoint(_state(1), tmp_path / "ckpt.pt")
    monkeypatch.undo()

    final, directory = os.path.realpath(path), os.path.realpath(tmp_path)
    temporary = next((call[1] for call in calls if call[0] == "rename"), None)
    assert temporary is not None and Path(temporary).parent == Path(directory), calls
    assert calls == [
        ("fsync", temporary, path.stat().st_size),
        ("rename", temporary, final),
        ("fsync", directory, None),
    ]


def test_a_checkpoint_cut_at_any_byte_is_refused_with_one_line(tmp_path):
    """What a disk that lost the end of a file (no fsync, a full disk, a copy cut short) leaves
    under the final name: a prefix of a checkpoint is a CheckpointError of one line that starts
    with the path, never another exception or a partial state. Every cut within the first 64
    bytes (magic numbers, the first record's header) and the last 128 (the zip's central
    directory), every 29th in between."""
    path = save_checkpoint(
        {"model": {"w": torch.randn(4, 3), "b": torch.zeros(3)}, "step": 3, "classes": ["a"]}, tmp_path / "full.pt"
    )
    data = path.read_bytes()
    cut = tmp_path / "checkpoint.pt"
    for size in sorted({*range(64), *range(64, len(data) - 128, 29), *range(len(data) - 128, len(data))}):
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(cut)
        message = str(error.value)
        assert message.startswith(f"{cut}: ") and "\n" not in message, (size, message)
    assert load_checkpoint(path)["step"] == 3


def test_resume_auto_refuses_a_cut_checkpoint_with_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    data = save_checkpoint({"model": {"w": torch.randn(64)}, "step": 2}, tmp_path / "full.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) - 30])
    with pytest.raises(UserError) as error:
        run(
            tmp_path,
            "run",
            *TINY,
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--synthetic-clips",
            "8",
            "--synthetic-val-clips",
            "0",
            "--resume",
            "auto",
        )
    message = str(error.value)
    assert message.startswith(f"--resume {out / 'checkpoint.pt'}: not a readable checkpoint (truncated")
    assert "\n" not in message


# ------------------------------------------------------------------------------- a killed training run

# Dropout, mixup and the held-out evaluation at every checkpoint draw from the RNGs the
# checkpoint restores; 40 clips in batches of 8 end an epoch at step 5.
RUN = [
    *TINY,
    "--device",
    "cpu",
    "--threads",
    "1",
    "--steps",
    "6",
    "--batch-size",
    "8",
    "--synthetic-clips",
    "40",
    "--synthetic-val-clips",
    "8",
    "--checkpoint-every",
    "2",
    "--eval-every",
    "2",
    "--dropout",
    "0.1",
    "--mixup",
    "0.4",
    "--log-every",
    "1",
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The output directory of the run that nothing interrupts."""
    root = tmp_path_factory.mktemp("straight")
    run(root, "run", *RUN)
    return root / "run"


def _torn_record_at_step_5(out: Path) -> None:
    """The kill comes while the step-5 record is written: half a line on disk, no newline."""
    real_write = metrics.Metrics.write

    def write(self, record):
        if record.get("step") == 5 and "event" not in record:
            with open(self.path, "a") as f:
                line = json.dumps(record)
                f.write(line[: len(line) // 2])
            _kill_self()
        real_write(self, record)

    metrics.Metrics.write = write
    run(out.parent, out.name, *RUN)


def _step_4_checkpoint_not_renamed(out: Path) -> None:
    """The kill comes after the step-4 checkpoint is written and fsync'ed, before its rename."""
    real_replace, renames = os.replace, []

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            _kill_self()
        real_replace(src, dst)

    os.replace = replace
    run(out.parent, out.name, *RUN)


# kill point -> (what the child runs, the step of the checkpoint it leaves)
RUN_KILL_POINTS = {
    "record half written": (_torn_record_at_step_5, 4),
    "checkpoint not renamed": (_step_4_checkpoint_not_renamed, 2),
}


def _records(out: Path) -> list[tuple]:
    """(event, step, loss or top-1) of each metrics record. An epoch record after a resume totals
    the resumed part of the epoch only: its values are left out, its place is compared."""
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [
        (
            r.get("event"),
            r.get("step", r.get("steps")),
            None if r.get("event") == "epoch" else r.get("loss", r.get("top1")),
        )
        for r in records
    ]


@pytest.mark.parametrize("kill_point", list(RUN_KILL_POINTS))
def test_a_killed_run_resumes_to_the_straight_runs_weights_and_records(tmp_path, straight, kill_point):
    inject, checkpoint_step = RUN_KILL_POINTS[kill_point]
    out = tmp_path / "run"
    die_in_child(lambda: inject(out))

    # What the kill left: the last checkpoint renamed into place, the records logged after it.
    assert load_checkpoint(out / "checkpoint.pt")["step"] == checkpoint_step
    lines = (out / "metrics.jsonl").read_text().split("\n")
    if kill_point == "record half written":
        assert lines[-1].startswith('{"step": 5') and not lines[-1].endswith("}")
    else:
        last = json.loads(lines[-2])  # the held-out evaluation just before the step-4 checkpoint
        assert len(_temporaries(out)) == 1 and (last["event"], last["step"]) == ("eval", 4)

    run(tmp_path, "run", *RUN, "--resume", "auto")

    a = load_checkpoint(straight / "checkpoint.pt")["model"]
    b = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _records(out) == _records(straight)
    assert [step for event, step, _ in _records(out) if event is None] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.jsonl", "summary.json"]
