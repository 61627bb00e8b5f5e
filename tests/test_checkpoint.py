"""vivit.checkpoint: atomic writes survive crashes and kills; RNG states round-trip."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from vivit.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.randn(3, 4)}, "step": 7, "classes": ["a", "b"]}
    path = save_checkpoint(state, tmp_path / "sub" / "ckpt.pt")
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["classes"] == ["a", "b"]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("crash_in", ["torch.save", "os.replace"])
def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, crash_in):
    path = save_checkpoint({"step": 1, "w": torch.ones(1000)}, tmp_path / "ckpt.pt")

    def crash(*args, **kwargs):
        if crash_in == "torch.save":  # half a file written, then the crash
            args[1].write(b"partial")
        raise KeyboardInterrupt("crash")

    monkeypatch.setattr(torch if crash_in == "torch.save" else os, crash_in.split(".")[1], crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from vivit.checkpoint import save_checkpoint
    step = 0
    while True:
        step += 1
        # ~16 MB per write: the write takes long enough to be killed in the middle of it
        save_checkpoint({"step": step, "w": torch.full((4_000_000,), float(step))}, sys.argv[1])
        print(step, flush=True)
    """
)


def test_sigkill_during_writes_never_leaves_an_unloadable_checkpoint(tmp_path):
    """Kill a process that writes checkpoints back to back at random moments, many times:
    every time, the checkpoint under the final name loads and is consistent."""
    path = tmp_path / "ckpt.pt"
    rng = random.Random(0)
    last_step = 0
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            proc.stdout.readline()  # one complete write, so a checkpoint exists
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
            proc.stdout.close()
        state = load_checkpoint(path)
        assert state["step"] >= 1 and torch.equal(state["w"], torch.full((4_000_000,), float(state["step"])))
        last_step = state["step"]
    # A temporary file of a killed writer is cleaned up by the next save.
    save_checkpoint({"step": last_step + 1}, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])
