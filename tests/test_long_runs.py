"""Long runs (docs/training.md, "Long runs"): a diverging run stops before it saves anything
non-finite; SIGTERM/SIGUSR1 checkpoint at a step boundary and the run resumes bit for bit; a
checkpoint that cannot be written leaves the previous one; a worker torchrun restarts resumes.

Faults are injected in-process where they can be (a loss made NaN at a chosen step, a file write
that fails, a signal sent to this process), so each test costs a few steps of a tiny model; one
test sends a real SIGTERM to a real `python -m vivit.train`, and one runs torchrun.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train import TINY, run

import vivit.checkpoint as checkpoint_module
from vivit import distributed
from vivit.checkpoint import load_checkpoint
from vivit.cli import UserError
from vivit.cli.common import DIVERGED, STOPPED, WRITE_FAILED
from vivit.cli.train import build_parser, main
from vivit.run import trainer as trainer_module
from vivit.run.metrics import Metrics
from vivit.run.trainer import Trainer

# 40 clips in batches of 8: an epoch ends at step 5. Dropout, mixup and the held-out evaluation
# draw from every RNG a checkpoint must restore. The loop is under test, not the kernels: the
# reference attention keeps these runs independent of the compiled ones.
RUN = [
    *TINY,
    "--backend",
    "reference",
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
    "--eval-every",
    "3",
    "--dropout",
    "0.1",
    "--mixup",
    "0.4",
    "--log-every",
    "1",
    "--checkpoint-every",
    "2",
]


def _strict_records(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN or Infinity is an error."""

    def refuse(constant: str):
        raise ValueError(f"{path}: {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _spoil_loss(monkeypatch, steps: set[int], how: str = "nan") -> None:
    """The training loss of the listed steps (1-based; one micro-step per step) made NaN, or, with
    how="grads", the loss left finite and the gradients made inf."""
    real = trainer_module.classification_loss
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        value, logits = real(*args, **kwargs)
        if len(calls) in steps:
            if how == "nan":
                value = value * float("nan")
            else:
                logits.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return value, logits

    monkeypatch.setattr(trainer_module, "classification_loss", loss)


def _all_finite(state: dict) -> bool:
    tensors = [v for v in state["model"].values()]
    tensors += [v for s in state["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    return all(bool(t.isfinite().all()) for t in tensors)


# ------------------------------------------------------------------------------- divergence


def test_a_nan_loss_stops_the_run_with_one_line_naming_step_loss_and_last_checkpoint(tmp_path, monkeypatch, capsys):
    _spoil_loss(monkeypatch, {3, 4, 5, 6})
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["--output-dir", str(out), *RUN])
    assert stopped.value.code == DIVERGED == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (
        f"vivit-train: error: step 3: the loss is nan; stopped before its optimiser step. "
        f"Last checkpoint (finite weights): {out / 'checkpoint.pt'} (step 2)"
    )
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2 and _all_finite(state)
    assert [r["step"] for r in _strict_records(out / "metrics.jsonl") if "event" not in r] == [1, 2]


def test_non_finite_gradients_of_a_finite_loss_stop_the_run(tmp_path, monkeypatch):
    _spoil_loss(monkeypatch, {2}, how="grads")
    with pytest.raises(UserError) as error:
        run(tmp_path, "run", *RUN)
    assert error.value.status == DIVERGED
    assert str(error.value).startswith("step 2: the gradients are not finite (loss ")
    assert str(error.value).endswith("; stopped before its optimiser step. No checkpoint was written")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_max_bad_steps_skips_the_optimiser_step_of_a_bad_step_and_writes_null(tmp_path, monkeypatch):
    """--max-bad-steps 1: a lone NaN step is skipped (the weights and optimiser state are those
    of the step before), logged with a null loss, counted; two in a row stop the run."""
    _spoil_loss(monkeypatch, {3})
    seen = {}
    real_step = Trainer.train_step

    def train_step(self, batches, totals):
        real_step(self, batches, totals)
        seen[self.step + 1] = [p.detach().clone() for p in self.model.parameters()]

    monkeypatch.setattr(Trainer, "train_step", train_step)
    summary = run(tmp_path, "run", *RUN, "--max-bad-steps", "1")
    assert summary["finished"] and summary["bad_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))
    records = _strict_records(tmp_path / "run" / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if "event" not in r}
    assert losses[3] is None and all(isinstance(losses[s], float) for s in (1, 2, 4, 5, 6))
    assert _all_finite(load_checkpoint(tmp_path / "run" / "checkpoint.pt"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["bad_steps"] == 1

    _spoil_loss(monkeypatch, {3, 4})
    with pytest.raises(UserError, match=r"^step 4: 2 steps in a row with a non-finite loss or gradients "):
        run(tmp_path, "again", *RUN, "--max-bad-steps", "1")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_first_nonfinite_names_the_tensor_and_passes_large_finite_values(bad):
    big = torch.full((5,), 3e38)  # finite, but its 2-norm overflows fp32
    named = [("small", torch.ones(3, dtype=torch.bfloat16)), ("big", big)]
    assert distributed.first_nonfinite(named) is None
    hurt = big.clone()
    hurt[2] = bad
    assert distributed.first_nonfinite([*named, ("hurt", hurt)]) == "hurt"


def test_metrics_write_non_finite_numbers_as_null(tmp_path):
    metrics = Metrics(tmp_path / "m.jsonl")
    metrics.write({"loss": float("nan"), "lr": float("inf"), "nested": {"x": [float("-inf"), 1.5]}})
    assert _strict_records(tmp_path / "m.jsonl") == [{"loss": None, "lr": None, "nested": {"x": [None, 1.5]}}]


def _trainer(tmp_path, *extra: str) -> Trainer:
    args = build_parser().parse_args(["--output-dir", str(tmp_path / "run"), *RUN, *extra])
    return Trainer(args, distributed.Context())


def test_a_checkpoint_is_never_written_with_non_finite_weights_or_optimiser_state(tmp_path):
    trainer = _trainer(tmp_path, "--steps", "1")
    trainer.run()
    path = tmp_path / "run" / "checkpoint.pt"
    saved = path.read_bytes()
    param = trainer.model.head.weight
    trainer.optimizer.state[param]["exp_avg"].view(-1)[0] = float("inf")
    with pytest.raises(UserError) as error:
        trainer.checkpoint()
    assert error.value.status == DIVERGED
    assert str(error.value) == (
        f"step 1: the optimiser's exp_avg of head.weight is not finite; no checkpoint written. "
        f"Last checkpoint (finite weights): {path} (step 1)"
    )
    trainer.optimizer.state[param]["exp_avg"].zero_()
    with torch.no_grad():
        trainer.model.pos_embed.view(-1)[3] = float("nan")
    with pytest.raises(UserError, match=r"^step 1: pos_embed is not finite; no checkpoint written"):
        trainer.checkpoint()
    assert path.read_bytes() == saved


def test_steps_the_fp16_scaler_skips_are_counted_not_fatal(tmp_path, monkeypatch):
    """With a gradient scaler (fp16, a GPU's; the CPU's behaves the same), inf gradients are the
    scaler's to skip: the run goes on, the step is counted and nothing non-finite is saved."""
    _spoil_loss(monkeypatch, {2}, how="grads")
    trainer = _trainer(tmp_path)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    summary = trainer.run()
    assert summary["finished"] and summary["scaler_skipped_steps"] == 1 and summary["bad_steps"] == 0
    assert trainer.scaler.get_scale() < 1024.0
    assert _all_finite(load_checkpoint(tmp_path / "run" / "checkpoint.pt"))


# ------------------------------------------------------------------------------- preemption


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The output directory of the run that nothing interrupts."""
    root = tmp_path_factory.mktemp("straight")
    run(root, "run", *RUN)
    return root / "run"


def _same_run(a: Path, b: Path) -> None:
    """The two runs' final weights, optimiser state and schedule are identical, bit for bit."""
    x, y = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert x["step"] == y["step"]
    assert all(torch.equal(x["model"][key], y["model"][key]) for key in x["model"])
    for i, state in x["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(y["optimizer"]["state"][i][name])), (i, name)
    assert x["scheduler"] == y["scheduler"]


def _signal_at_step(monkeypatch, signum: int, step: int, also_during_save: bool = False) -> list[int]:
    """Send `signum` to this process at the start of step `step` (1-based); with `also_during_save`,
    a SIGTERM again in the middle of every checkpoint written after it. Returns the saved steps."""
    real_step, real_save, saved = Trainer.train_step, trainer_module.save_checkpoint, []

    def train_step(self, batches, totals):
        if self.step + 1 == step:
            os.kill(os.getpid(), signum)
        real_step(self, batches, totals)

    def save(state, path):
        if also_during_save and state["step"] >= step:
            os.kill(os.getpid(), signal.SIGTERM)
        saved.append(state["step"])
        return real_save(state, path)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    return saved


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_checkpoints_the_step_and_the_resumed_run_matches_bit_for_bit(
    tmp_path, straight, monkeypatch, capsys, signum
):
    """The signal arrives in step 3 (of 6; an evaluation step, between the checkpoints of steps 2
    and 4): the run finishes step 3, checkpoints it and exits 75; `--resume auto` ends with the
    straight run's weights, optimiser state and records. A second signal in the middle of the
    checkpoint's write changes nothing."""
    before = signal.getsignal(signum)
    saved = _signal_at_step(monkeypatch, signum, 3, also_during_save=True)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["--output-dir", str(out), *RUN])
    assert stopped.value.code == STOPPED == 75
    assert signal.getsignal(signum) is before  # the run's handlers are gone
    assert saved == [2, 3]
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step 3: the checkpoint holds it; continue with --resume auto" in (
        capsys.readouterr().out
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["finished"], summary["stopped_by"]) == (3, False, name)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3

    monkeypatch.undo()
    main(["--output-dir", str(out), *RUN, "--resume", "auto"])
    _same_run(straight, out)
    ours, theirs = _strict_records(out / "metrics.jsonl"), _strict_records(straight / "metrics.jsonl")

    def key(r):
        return (r.get("event"), r.get("step", r.get("steps")), r.get("loss", r.get("top1")))

    # The epoch record of the resumed epoch totals its resumed part only: compare where it falls.
    assert [key(r) for r in ours if r.get("event") != "epoch"] == [key(r) for r in theirs if r.get("event") != "epoch"]


def test_sigterm_to_the_command_exits_75_with_its_checkpoint(tmp_path):
    """A real SIGTERM, from outside, to `python -m vivit.train` in the middle of a long run."""
    out = tmp_path / "run"
    args = [*RUN, "--steps", "100000", "--eval-every", "0", "--checkpoint-every", "0", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vivit.train", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == STOPPED, stderr[-3000:]
    assert "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and 1 <= summary["steps"] < 100000
    assert load_checkpoint(out / "checkpoint.pt")["step"] == summary["steps"]
    assert f"stopped by SIGTERM after step {summary['steps']}" in stdout


def test_checkpoint_minutes_checkpoints_by_the_clock(tmp_path, monkeypatch):
    """--checkpoint-minutes: a checkpoint after the first step that ends that long after the last
    one (the clock here advances one minute per reading), besides --checkpoint-every's."""
    ticks = iter(range(0, 10**6, 60))
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: float(next(ticks)))
    saved = _signal_at_step(monkeypatch, signal.SIGTERM, step=10**6)  # records the saved steps only
    run(tmp_path, "run", *RUN, "--checkpoint-every", "0", "--checkpoint-minutes", "2")
    assert saved == [2, 4, 6]
    saved.clear()
    run(tmp_path, "again", *RUN, "--checkpoint-every", "0", "--checkpoint-minutes", "100")
    assert saved == [6]


# ------------------------------------------------------------------------------- faults while writing


class _FailingFile:
    """A file whose write (after `limit` bytes: a full disk) or flush fails."""

    def __init__(self, f, fail_in: str, limit: int = 5000) -> None:
        self.f, self.fail_in, self.limit, self.written = f, fail_in, limit, 0

    def write(self, data) -> int:
        self.written += len(data)
        if self.fail_in == "write" and self.written > self.limit:
            self.f.write(bytes(data)[: max(0, self.limit - self.written + len(data))])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def flush(self) -> None:
        if self.fail_in == "flush":
            raise OSError(errno.EIO, "Input/output error")
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


# fault point -> (the error's cause as the message names it, what the message says of the file)
FAULTS = {
    "write": ("No space left on device (ENOSPC)", "the previous checkpoint there is unchanged (step 2)"),
    "flush": ("Input/output error (EIO)", "the previous checkpoint there is unchanged (step 2)"),
    "fsync": ("Input/output error (EIO)", "the previous checkpoint there is unchanged (step 2)"),
    "rename": ("Read-only file system (EROFS)", "the previous checkpoint there is unchanged (step 2)"),
    "directory fsync": (
        "Input/output error (EIO)",
        "the step-4 checkpoint is in place but may not survive a power cut",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_stops_with_one_line(tmp_path, monkeypatch, capsys, fault):
    """The step-4 checkpoint's write fails at each step of the write: the step-2 checkpoint stays
    loadable (or, after the rename, the step-4 one is whole), no temporary file remains, and the
    run ends with one line naming the file and the error, exit status 4."""
    real_open, real_fsync, real_replace = open, os.fsync, os.replace
    saves = []

    def open_(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            saves.append(path)
            if len(saves) == 2 and fault in ("write", "flush"):
                return _FailingFile(f, fault)
        return f

    fsyncs = []

    def fsync(fd):
        if len(saves) == 2:
            fsyncs.append(fd)
            if (fault, len(fsyncs)) in (("fsync", 1), ("directory fsync", 2)):
                raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    def replace(src, dst):
        if len(saves) == 2 and fault == "rename":
            raise OSError(errno.EROFS, "Read-only file system")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module, "open", open_, raising=False)
    monkeypatch.setattr(checkpoint_module.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["--output-dir", str(out), *RUN, "--steps", "4"])
    monkeypatch.undo()
    assert stopped.value.code == WRITE_FAILED == 4
    cause, kept = FAULTS[fault]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "enforce fail" not in err
    assert err.strip().splitlines()[-1] == (
        f"vivit-train: error: {out / 'checkpoint.pt'}: writing the step-4 checkpoint failed: {cause}; {kept}; stopped"
    )
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == (4 if fault == "directory fsync" else 2) and _all_finite(state)
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.jsonl"]


# ------------------------------------------------------------------------------- elastic restarts

# Run by torchrun in place of `-m vivit.train`: rank 1 is killed (SIGKILL: no handler runs) in
# step 3 of the first attempt, after the step-2 checkpoint (torchrun restarts both processes), and
# sends itself SIGUSR1 in step 5 of the second (both stop after step 5, checkpoint it and exit 75;
# torchrun restarts them again).
_ELASTIC_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from vivit.cli.train import main
    from vivit.run.trainer import Trainer

    attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
    real_step = Trainer.train_step

    def train_step(self, batches, totals):
        if rank == 1 and (attempt, self.step + 1) == (0, 3):
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 1 and (attempt, self.step + 1) == (1, 5):
            os.kill(os.getpid(), signal.SIGUSR1)
        real_step(self, batches, totals)

    Trainer.train_step = train_step
    sys.argv[0] = "vivit-train"
    main()
    """
)


def _torchrun_reason() -> str | None:
    import torch.distributed as dist

    if not hasattr(os, "fork") or not dist.is_available() or not dist.is_gloo_available():
        return "needs torch.distributed with gloo and torchrun's process launcher"
    return None


@pytest.mark.skipif(_torchrun_reason() is not None, reason=str(_torchrun_reason()))
def test_torchrun_restarts_resume_from_the_latest_checkpoint(tmp_path):
    """Two gloo processes under `torchrun --max-restarts 2`, no --resume: each restart resumes
    from the latest checkpoint (the restarted processes connect, although torchrun's store still
    holds their predecessors' keys); a stop signal to one process stops both at the same step with
    a checkpoint; the run ends as one process training straight through would, each step's metrics
    record once."""
    from test_ddp import _free_port

    script = tmp_path / "worker.py"
    script.write_text(_ELASTIC_WORKER)
    out = tmp_path / "run"
    # No dropout or mixup: they draw from per-process seeds, and the reference is one process. SGD:
    # AdamW's division by sqrt(v) would turn the all-reduce's rounding into visible differences.
    common = [arg for arg in RUN if arg not in ("--dropout", "0.1", "--mixup", "0.4")]
    common += ["--optimizer", "sgd", "--lr", "0.1"]
    args = [*common, "--dist-timeout", "60", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": "127.0.0.1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--max-restarts=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    log = f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    assert f"resumed from {out / 'checkpoint.pt'} at step 2" in proc.stderr, log
    assert "stopped by a signal to another process after step 5" in proc.stdout, log
    assert f"resumed from {out / 'checkpoint.pt'} at step 5" in proc.stderr, log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 6 and summary["world_size"] == 2
    assert [r["step"] for r in _strict_records(out / "metrics.jsonl") if "event" not in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.jsonl", "summary.json"]

    single = run(tmp_path, "single", *common)
    assert single["finished"]
    a, b = load_checkpoint(tmp_path / "single" / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6, msg=key)
