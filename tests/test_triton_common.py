"""What the Triton kernel modules share (vivit_kernels/triton/common.py): the launchers' device guard.

A Triton launch runs on the current CUDA device's current stream, not on its tensors' device, so
every launcher makes its inputs' device current. Without a GPU the launchers run interpreted on
CPU tensors, where the guard does nothing; these tests replace it with a recorder that notes the
device it was given and record every kernel launch (the interpreter's `run`) with the guards open
at that moment. `test_cuda_kernels.py` runs the launchers on a second GPU where there is one.
"""

import contextlib
import types

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from vivit_kernels.triton import attention as attention_kernels
from vivit_kernels.triton import common, interpreted
from vivit_kernels.triton import tubelet as tubelet_kernels

CUDA1 = torch.device("cuda", 1)


@pytest.fixture
def cuda_device_calls(monkeypatch):
    """torch.cuda.device replaced by a recorder: ("enter", device) and ("exit", device) events."""
    events = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))

    monkeypatch.setattr(torch.cuda, "device", Device)
    return events


def test_device_guard_makes_a_cuda_tensors_device_current(cuda_device_calls):
    with common.device_guard(CUDA1):
        assert cuda_device_calls == [("enter", CUDA1)]
    assert cuda_device_calls == [("enter", CUDA1), ("exit", CUDA1)]
    cuda_device_calls.clear()
    with common.device_guard(torch.device("cpu")):  # the interpreter's tensors: nothing to make current
        pass
    assert cuda_device_calls == []


def test_on_input_device_runs_the_launcher_under_its_first_arguments_device(cuda_device_calls):
    seen = []

    @common.on_input_device
    def launcher(x, y, *, z):
        seen.append((x, y, z, list(cuda_device_calls)))
        return "result"

    first = types.SimpleNamespace(device=CUDA1)  # stands in for a tensor on cuda:1
    assert launcher(first, 2, z=3) == "result"
    assert seen == [(first, 2, 3, [("enter", CUDA1)])]
    assert cuda_device_calls[-1] == ("exit", CUDA1)
    assert launcher.__name__ == "launcher"


@pytest.fixture
def launches(monkeypatch):
    """Every interpreted kernel launch as (kernel name, devices guarded at that moment); the guard
    replaced by a recorder of the device it is given."""
    from triton.runtime.interpreter import InterpretedFunction

    guarded, seen = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        guarded.append(device)
        try:
            yield
        finally:
            guarded.pop()

    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        seen.append((self.__name__, list(guarded)))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(common, "device_guard", recording_guard)
    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return seen


def _attention_call(generator):
    """q, k, v and the grid arguments of a split-mode call with a prefix token: both index maps
    and the prefix launches run."""
    B, H, T, S, Dh, P = 1, 2, 2, 3, 16, 1
    q, k, v = (torch.randn(B, H, P + T * S, Dh, generator=generator) for _ in range(3))
    return (q, k, v), (T, P, "time_major", "split", Dh**-0.5)


def _tubelet_call(generator):
    """video (B, C, T, H, W), weight (D, C, t, h, w) and a token gradient (B, nt, S', D)."""
    video = torch.randn(2, 2, 4, 6, 6, generator=generator)
    weight = torch.randn(20, 2, 2, 3, 3, generator=generator)
    return video, weight, torch.randn(2, 2, 4, 20, generator=generator)


LAUNCHERS = [
    "attention.forward",
    "attention.backward",
    "tubelet.forward",
    "tubelet.backward_video",
    "tubelet.backward_weight",
    "tubelet.backward_weight split",
    "tubelet.backward_pos",
]


def _launch(launcher: str, generator, launches: list) -> None:
    """Run `launcher` on small CPU inputs, keeping in `launches` only what it launched itself."""
    if launcher.startswith("attention"):
        (q, k, v), grid = _attention_call(generator)
        if launcher == "attention.forward":
            attention_kernels.forward(q, k, v, *grid)
            return
        saved = attention_kernels.forward(q, k, v, *grid)
        launches.clear()
        attention_kernels.backward(torch.randn_like(q), q, k, v, *saved, *grid)
        return
    video, weight, grad = _tubelet_call(generator)
    if launcher == "tubelet.forward":
        tubelet_kernels.forward(video, weight, torch.zeros(20))
    elif launcher == "tubelet.backward_video":
        tubelet_kernels.backward_video(grad, video, weight)
    elif launcher == "tubelet.backward_weight":
        tubelet_kernels.backward_weight(grad, video, weight, True)
    elif launcher == "tubelet.backward_weight split":
        tubelet_kernels.backward_weight(grad, video, weight, True, split=2)
    else:
        tubelet_kernels.backward_pos(grad)


@pytest.mark.skipif(not interpreted(), reason="launches are recorded through the Triton interpreter")
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_kernel_launch_runs_under_its_inputs_device(launcher, launches, generator):
    _launch(launcher, generator, launches)
    assert launches, f"{launcher} launched no kernel"
    for kernel, guarded in launches:
        assert guarded == [torch.device("cpu")], f"{launcher}: {kernel} launched under {guarded}"
