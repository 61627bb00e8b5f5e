"""vivit_kernels.lean: a linear layer after a LayerNorm or a GELU that keeps its input for backward,
not the normalised or activated tensor, and computes exactly what the plain modules compute; a
linear layer on stacked weights (separate q, k, v) that keeps the weights, not their stack."""

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from torch import nn

from vivit_kernels import gelu_linear, norm_linear, saved_bytes, stacked_linear


@pytest.fixture
def layers(generator):
    torch.manual_seed(0)
    norm, fc1, fc2 = nn.LayerNorm(24, eps=1e-6), nn.Linear(24, 96), nn.Linear(96, 24)
    for param in (norm.weight, norm.bias):
        nn.init.normal_(param)
    return norm, fc1, fc2


def test_gradcheck(generator):
    torch.manual_seed(0)
    norm, fc1, fc2 = nn.LayerNorm(6).double(), nn.Linear(6, 8).double(), nn.Linear(8, 6).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, nw, nb: norm_linear(x, _with(norm, nw, nb), w, b),
        (x, fc1.weight, fc1.bias, norm.weight, norm.bias),
    )
    h = torch.randn(2, 3, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(
            lambda h, w, b, a=approximate: gelu_linear(h, w, b, a), (h, fc2.weight, fc2.bias)
        )


def _with(norm, weight, bias):
    """A LayerNorm whose parameters are the given tensors (gradcheck's inputs)."""
    copy = nn.LayerNorm(norm.normalized_shape, eps=norm.eps).double()
    copy.weight, copy.bias = weight, bias
    return copy


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_same_function_and_gradients_as_the_plain_modules(layers, autocast, generator):
    norm, fc1, fc2 = layers
    x = torch.randn(3, 7, 24, generator=generator, requires_grad=True)
    params = [x, *norm.parameters(), *fc1.parameters(), *fc2.parameters()]

    def run(lean: bool):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            if lean:
                out = gelu_linear(norm_linear(x, norm, fc1.weight, fc1.bias), fc2.weight, fc2.bias)
            else:
                out = fc2(F.gelu(fc1(norm(x))))
        grads = torch.autograd.grad(out, params, torch.ones_like(out))
        return out, grads

    plain, lean = run(False), run(True)
    assert lean[0].dtype == plain[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert relative_error(lean[0], plain[0]) < 1e-6
    for a, b in zip(lean[1], plain[1]):
        assert a.dtype == b.dtype and relative_error(a, b) < 1e-6


def test_keeps_the_input_not_the_normalised_or_activated_tensor(layers, generator):
    norm, fc1, fc2 = layers
    x = torch.randn(4, 50, 24, generator=generator, requires_grad=True)
    h = torch.randn(4, 50, 96, generator=generator, requires_grad=True)
    params = sum(p.numel() for p in (*norm.parameters(), fc1.weight)) * 4
    # Plain: x, LN(x), LN's per-token mean and rstd, the parameters. Lean: x and the parameters.
    assert saved_bytes(lambda: fc1(norm(x))) == x.numel() * 4 * 2 + 4 * 50 * 2 * 4 + params
    assert saved_bytes(lambda: norm_linear(x, norm, fc1.weight, fc1.bias)) == x.numel() * 4 + params
    assert saved_bytes(lambda: fc2(F.gelu(h))) == h.numel() * 4 * 2 + fc2.weight.numel() * 4
    assert saved_bytes(lambda: gelu_linear(h, fc2.weight, fc2.bias)) == h.numel() * 4 + fc2.weight.numel() * 4


def test_bad_arguments():
    with pytest.raises(TypeError, match="norm must be an nn.LayerNorm over the last dim"):
        norm_linear(torch.zeros(2, 4), nn.BatchNorm1d(4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"^gelu_linear: approximate must be one of 'none', 'tanh', got 'erf'$"):
        gelu_linear(torch.zeros(2, 4), torch.zeros(3, 4), approximate="erf")


def test_meta_device_gives_the_plain_modules_shapes_and_dtypes():
    """Models built on the meta device (shape inference, deferred init) run norm_linear and
    gelu_linear there too: forward and backward give the plain modules' shapes and dtypes."""
    x = torch.empty(2, 5, 8, device="meta", requires_grad=True)
    norm = nn.LayerNorm(8, device="meta")
    fc1, fc2 = nn.Linear(8, 12, device="meta"), nn.Linear(12, 8, device="meta")
    out = gelu_linear(norm_linear(x, norm, fc1.weight, fc1.bias), fc2.weight, fc2.bias, "tanh")
    expected = fc2(F.gelu(fc1(norm(x)), approximate="tanh"))
    assert (out.shape, out.dtype, out.device) == (expected.shape, expected.dtype, expected.device)
    out.sum().backward()
    assert x.grad.shape == x.shape and fc1.weight.grad.shape == fc1.weight.shape
    assert norm.weight.grad.shape == norm.weight.shape and fc2.bias.grad.shape == fc2.bias.shape


def _separate(generator, dtype=torch.float32, requires_grad=True):
    """Three 24 -> 16 projections (q, k, v) and their stacked bias, with a zero middle part."""
    weights = [torch.randn(16, 24, dtype=dtype, generator=generator, requires_grad=requires_grad) for _ in range(3)]
    bias = torch.randn(48, dtype=dtype, generator=generator)
    bias[16:32] = 0
    return weights, bias.requires_grad_(requires_grad)


def test_stacked_weights_gradcheck(generator):
    weights, bias = _separate(generator, torch.float64)
    norm = nn.LayerNorm(24).double()
    x = torch.randn(2, 3, 24, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, *w: stacked_linear(x, w, b), (x, bias, *weights))
    assert torch.autograd.gradcheck(
        lambda x, nw, nb, b, *w: norm_linear(x, _with(norm, nw, nb), w, b), (x, norm.weight, norm.bias, bias, *weights)
    )


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_stacked_weights_compute_the_stacked_linear(layers, autocast, generator):
    norm = layers[0]
    weights, bias = _separate(generator)
    x = torch.randn(3, 7, 24, generator=generator, requires_grad=True)
    params = [x, *weights, bias, *norm.parameters()]
    grad = torch.randn(3, 7, 48, generator=generator)  # one for each part: ones would give equal parts
    for lean in (False, True):

        def run(stacked: bool, lean=lean):
            w = weights if stacked else torch.cat(weights)
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                if lean:
                    out = norm_linear(x, norm, w, bias)
                else:
                    out = stacked_linear(x, w, bias) if stacked else F.linear(x, w, bias)
            return out, torch.autograd.grad(out, params, grad.to(out.dtype), allow_unused=True)

        (out, grads), (expected, expected_grads) = run(True), run(False)
        assert out.dtype == expected.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert relative_error(out, expected) < 1e-6
        for a, b in zip(grads, expected_grads, strict=True):
            assert (a is None) == (b is None)
            assert a is None or (a.dtype == b.dtype and relative_error(a, b) < 1e-6)


def test_stacked_weights_keep_the_weights_not_their_stack(layers, generator):
    norm = layers[0]
    weights, bias = _separate(generator)
    x = torch.randn(4, 50, 24, generator=generator, requires_grad=True)
    kept = []

    def keep(tensor):
        kept.append(tensor)
        return tensor

    for run in (lambda: stacked_linear(x, weights, bias), lambda: norm_linear(x, norm, weights, bias)):
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            run()
        pointers = {t.data_ptr() for t in kept}
        assert {w.data_ptr() for w in weights} | {x.data_ptr()} <= pointers
        assert not [t for t in kept if t.shape == (48, 24)]  # no stack saved
    # One weight: F.linear as it is.
    assert saved_bytes(lambda: stacked_linear(x, [weights[0]], bias[:16])) == (x.numel() + weights[0].numel()) * 4
