"""vivit.checkpoint: atomic writes survive crashes and kills; RNG states round-trip; files hold only
tensors and plain data, and a file that is unreadable or would run code when unpickled is refused."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from vivit.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vivit.model import model_spec


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.randn(3, 4)}, "step": 7, "classes": ["a", "b"]}
    path = save_checkpoint(state, tmp_path / "sub" / "dir" / "ckpt.pt")  # missing parents are made
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["classes"] == ["a", "b"]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert os.listdir(tmp_path / "sub" / "dir") == ["ckpt.pt"]  # no temporary file left behind
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
    for _ in range(4):
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


def test_rng_state_round_trip_through_a_file(tmp_path):
    """The states are tensors and plain data: saved and read back with weights_only=True, they
    restore every generator (NumPy's cached Gaussian too)."""
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    path = save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    again = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    assert expected[:4] == again[:4] and torch.equal(expected[4], again[4])
    # The generators' words are stored as 64-bit integers (NumPy's are uint32, Python's up to 2**32 - 1).
    state = rng_state()
    assert state["python"]["words"].dtype == state["numpy"]["keys"].dtype == torch.int64


def test_cuda_generators_are_saved_and_restored_where_cuda_runs(monkeypatch):
    """The CUDA generators' states join the checkpoint once CUDA is in use, and go back to every
    device on restore (torch.cuda stands in for a GPU here), never where CUDA is absent."""
    states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = rng_state()
    assert state["cuda"] is states
    set_rng_state(state)
    assert restored == [states]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_rng_state(state)
    assert restored == [states]
    # Available but not initialised (nothing ran on the GPU yet): no states, and CUDA stays uninitialised.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("initialised CUDA"))
    assert "cuda" not in rng_state()


def test_save_refuses_anything_but_tensors_and_plain_data(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['rng'\]\[0\] is a ndarray"):
        save_checkpoint({"step": 1, "rng": [np.zeros(3)]}, tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()


class _RunsCode:
    """Unpickled, this calls os.system: what a crafted checkpoint can do to a full unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_code_running_checkpoint(path, marker) -> None:
    """A checkpoint-looking file that runs `touch marker` when unpickled."""
    torch.save({"model": _RunsCode(marker), "model_spec": {}, "step": 1}, path)


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code-ran"
    write_code_running_checkpoint(tmp_path / "crafted.pt", marker)
    with pytest.raises(
        CheckpointError, match=r"crafted\.pt: refers to posix\.system, which is not a tensor or plain data"
    ):
        load_checkpoint(tmp_path / "crafted.pt")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_an_unreadable_file_is_a_one_line_error(tmp_path, damage):
    path = save_checkpoint({"w": torch.randn(1000)}, tmp_path / "ckpt.pt")
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"step,loss\n1,2.3\n"}[damage])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path))
    assert ("empty file" if damage == "empty" else "not a readable checkpoint") in message


def at(path) -> str:
    """A pattern for an error message that starts with `path`."""
    return "^" + re.escape(str(path))


def _training_checkpoint(tmp_path, **changes):
    """A vivit-train checkpoint of a tiny model (its model_spec, classes, data, weights), as a file."""
    from vivit import build_model
    from vivit.model import model_spec

    spec = model_spec(
        "vivit_b",
        "factorised_encoder",
        3,
        dim=32,
        depth=1,
        num_heads=2,
        temporal_depth=1,
        num_frames=4,
        img_size=32,
        tubelet=(2, 16, 16),
    )
    torch.manual_seed(0)
    model = build_model(spec)
    state = {
        "model": model.state_dict(),
        "model_spec": spec,
        "classes": ["a", "b", "c"],
        "data": {"num_frames": 4, "img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    state.update(changes)
    return save_checkpoint(state, tmp_path / "checkpoint.pt"), model


def test_load_model_rebuilds_the_trained_model(tmp_path):
    from vivit.checkpoint import load_model

    path, trained = _training_checkpoint(tmp_path)
    model, state = load_model(path)
    assert not model.training and state["classes"] == ["a", "b", "c"]
    video = torch.randn(2, 3, 4, 32, 32)
    assert torch.equal(model(video), trained.eval()(video))
    model, _ = load_model(path, device="meta")  # on the device asked for
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(classes=["a", "b"]), r"its classes are not 3 label names, as its model_spec says$"),
        (dict(data={"num_frames": 4, "img_size": 32}), r"its 'data' entry lacks num_frames, img_size, mean or std$"),
        (
            dict(data={"num_frames": 8, "img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}),
            r"its data makes clips of 8 frames of 32 px, its model takes 4 of \(32, 32\)$",
        ),
        (dict(model_spec={"preset": "vivit_b"}), r"its model_spec describes no model \(KeyError"),
        (dict(model=[1, 2]), r"its 'model' entry is a list, not a state dict$"),
        (
            dict(
                model_spec=model_spec(
                    "vivit_b",
                    "factorised_encoder",
                    3,
                    dim=32,
                    depth=1,
                    num_heads=2,
                    temporal_depth=1,
                    num_frames=4,
                    img_size=(32, 48),
                    tubelet=(2, 16, 16),
                )
            ),
            r"its data makes clips of 4 frames of 32 px, its model takes 4 of \(32, 48\)$",
        ),  # square crops only
    ],
    ids=["classes", "data keys", "frames", "model_spec", "weights type", "non-square model"],
)
def test_load_model_names_what_does_not_fit(tmp_path, change, message):
    from vivit.checkpoint import load_model

    path, _ = _training_checkpoint(tmp_path, **change)
    with pytest.raises(CheckpointError, match=at(path) + rf": {message}"):
        load_model(path)


def test_load_model_names_missing_unexpected_and_misshapen_weights(tmp_path):
    from vivit.checkpoint import load_model

    path, model = _training_checkpoint(tmp_path)
    weights = dict(model.state_dict())
    weights.pop("head.bias")
    weights["extra.weight"] = torch.zeros(1)
    weights["head.weight"] = torch.zeros(5, 32)
    save_checkpoint({**load_checkpoint(path), "model": weights}, path)
    with pytest.raises(
        CheckpointError,
        match=(
            at(path) + r": its weights do not fit its model_spec: missing head\.bias; unexpected extra\.weight; "
            r"head.weight \(5, 32\) \(its model_spec needs \(3, 32\)\)$"
        ),
    ):
        load_model(path)


def test_an_unreadable_files_message_is_its_path_and_one_sentence_of_the_cause():
    from vivit.checkpoint import _first_sentence

    assert _first_sentence(RuntimeError("reader failed. Reason: bad zip\nmore")) == "RuntimeError: reader failed"
    assert _first_sentence(OSError("line one\nline two. more")) == "OSError: line one"
    assert _first_sentence(ValueError("  ")) == "ValueError"
    assert _first_sentence(EOFError("x" * 300)) == "EOFError: " + "x" * 160


def test_unreadable_and_code_running_files_get_exact_messages(tmp_path):
    path = save_checkpoint({"w": torch.randn(1000)}, tmp_path / "ckpt.pt")
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(
        CheckpointError,
        match=(
            at(path) + r": not a readable checkpoint \(truncated, or not written by torch\.save(: \w*Error: [^\n]+)?\)$"
        ),
    ):
        load_checkpoint(path)
    write_code_running_checkpoint(tmp_path / "crafted.pt", tmp_path / "code-ran")
    with pytest.raises(
        CheckpointError,
        match=(
            r"crafted\.pt: refers to posix\.system, which is not a tensor or plain data; refused, as loading it "
            r"could run code from the file$"
        ),
    ):
        load_checkpoint(tmp_path / "crafted.pt")


def test_a_file_of_other_bytes_is_no_readable_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint at all")  # refused by the unpickler, naming no object
    with pytest.raises(
        CheckpointError,
        match=at(path) + r": not a readable checkpoint \(truncated, or not written by "
        r"torch\.save\)$",
    ):
        load_checkpoint(path)


def test_tensors_load_where_asked(tmp_path):
    path = save_checkpoint({"w": torch.randn(3)}, tmp_path / "ckpt.pt")
    assert load_checkpoint(path, map_location="meta")["w"].device.type == "meta"


def test_a_failed_save_raises_its_own_error(tmp_path, monkeypatch):
    """A save that fails before the temporary file exists (the directory refuses it) raises that
    error, not one about cleaning up a file that was never made."""
    import vivit.checkpoint as checkpoint

    def refuse(*args, **kwargs):
        raise PermissionError("the directory refuses new files")

    monkeypatch.setattr(checkpoint, "open", refuse, raising=False)
    with pytest.raises(PermissionError, match="^the directory refuses new files$") as raised:
        save_checkpoint({"w": torch.zeros(1)}, tmp_path / "ckpt.pt")
    assert raised.value.__context__ is None and not list(tmp_path.iterdir())


def test_a_full_disk_raises_the_systems_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fills in the middle of the write: torch.save's zip writer would report it as
    "unexpected pos ..."; the save raises the operating system's ENOSPC instead, removes its
    temporary file and leaves the previous checkpoint whole."""
    import errno

    import vivit.checkpoint as checkpoint

    path = save_checkpoint({"step": 1, "w": torch.ones(1000)}, tmp_path / "ckpt.pt")
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.room = f, 3000

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError) as raised:
        save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and str(raised.value) == "[Errno 28] No space left on device"
    assert load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_temporary_file_another_process_removed_first_is_no_error(tmp_path):
    """Two runs that find the same dead writer's file both remove it: the second finds it gone."""
    from vivit.checkpoint import _remove_if_dead

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    _remove_if_dead(tmp_path / f".ckpt.pt.tmp-{exited.pid}")


def test_a_checkpoint_key_that_is_not_str_or_int_is_named(tmp_path):
    with pytest.raises(
        TypeError, match=r"^checkpoint\['model'\]: key \('a', 1\) is a tuple; checkpoint keys are str or int$"
    ):
        save_checkpoint({"model": {("a", 1): torch.zeros(1)}}, tmp_path / "ckpt.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "state, missing",
    [
        ({"model": {}, "model_spec": {}}, "'classes', 'data'"),
        (["model", "model_spec", "classes", "data"], "'model', 'model_spec', 'classes', 'data'"),
    ],
    ids=["two keys", "not a dict"],
)
def test_a_file_that_is_no_training_checkpoint_names_what_it_lacks(tmp_path, state, missing):
    from vivit.checkpoint import load_model

    path = save_checkpoint(state, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=at(path) + rf": not a vivit-train checkpoint \(it has no {missing}\)$"):
        load_model(path)


def test_load_model_lists_at_most_four_unexpected_and_four_misshapen_weights(tmp_path):
    from vivit.checkpoint import load_model

    path, model = _training_checkpoint(tmp_path)
    weights = dict(model.state_dict())
    extra = [f"extra{i}.weight" for i in range(5)]
    weights.update({key: torch.zeros(1) for key in extra})
    misshapen = [key for key, value in weights.items() if value.dim() == 1 and key not in extra][:5]
    weights.update({key: torch.zeros(2, 2) for key in misshapen})
    save_checkpoint({**load_checkpoint(path), "model": weights}, path)
    shapes = "; ".join(
        f"{key} (2, 2) (its model_spec needs {tuple(model.state_dict()[key].shape)})" for key in misshapen[:4]
    )
    listed = re.escape(f"unexpected {', '.join(extra[:4])}; {shapes}")
    with pytest.raises(CheckpointError, match=at(path) + rf": its weights do not fit its model_spec: {listed}$"):
        load_model(path)


def test_load_model_lists_at_most_four_missing_weights(tmp_path):
    from vivit.checkpoint import load_model

    path, model = _training_checkpoint(tmp_path)
    weights = dict(model.state_dict())
    gone = list(weights)[:5]
    for key in gone:
        weights.pop(key)
    save_checkpoint({**load_checkpoint(path), "model": weights}, path)
    listed = re.escape(", ".join(gone[:4]))
    with pytest.raises(
        CheckpointError, match=at(path) + rf": its weights do not fit its model_spec: missing {listed}$"
    ):
        load_model(path)
