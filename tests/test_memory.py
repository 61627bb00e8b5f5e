"""saved_bytes on cases whose answer is known."""

import torch

from vivit_kernels import factorised_attention, saved_bytes


def test_counts_what_autograd_saves():
    x = torch.randn(1000, requires_grad=True)
    y = torch.randn(1000, requires_grad=True)
    assert saved_bytes(torch.exp, x) == 4000  # exp saves its output
    assert saved_bytes(torch.mul, x, y) == 8000  # mul saves both operands
    assert saved_bytes(torch.add, x, y) == 0  # add saves nothing


def test_views_of_one_storage_count_once():
    packed = torch.randn(3, 500, requires_grad=True)
    a, b, _ = packed.unbind(0)
    assert saved_bytes(torch.mul, a, b) == 3 * 500 * 4


def test_reference_attention_keeps_the_probabilities():
    B, H, N, Dh = 1, 2, 64, 8
    q, k, v = (torch.randn(B, H, N, Dh, requires_grad=True) for _ in range(3))
    probs = B * H * N * N * 4
    assert saved_bytes(factorised_attention, q, k, v, 4, "joint", backend="reference") >= probs
    # Spatial groups are N / frames long: the probabilities shrink by the number of frames.
    spatial = saved_bytes(factorised_attention, q, k, v, 4, "spatial", backend="reference")
    assert probs // 4 <= spatial < probs


def test_measured_graphs_are_freed():
    import weakref

    x = torch.randn(100, requires_grad=True)
    outputs = []

    def exp_and_keep(x):
        y = torch.exp(x)  # saves its own output
        outputs.append(weakref.ref(y))
        return y

    saved_bytes(exp_and_keep, x)
    assert outputs[0]() is None
