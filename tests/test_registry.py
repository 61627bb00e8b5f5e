"""The backend registry (vivit_kernels/backends/registry.py): declared limits as reasons, "auto"
and its fallback, named backends that refuse, and the name of what was chosen."""

import dataclasses
import warnings

import pytest
import torch
from conftest import masked_attention

from vivit_kernels import BackendUnsupportedError, factorised_attention, tubelet_embedding
from vivit_kernels.backends import registry
from vivit_kernels.checks import AttentionShape, TubeletShape


def _qkv(shape=(1, 4, 12, 8), dtype=torch.float32):
    return [torch.randn(shape).to(dtype) for _ in range(3)]


def _attention(device="cpu", dtype=torch.float32, head_dim=64, dropout_p=0.0):
    shape = AttentionShape.of((1, 2, 12, head_dim), 3, "split", dropout_p=dropout_p)
    return registry.Request("attention", torch.device(device), dtype, shape)


@pytest.fixture
def picky_backend(monkeypatch):
    """The only fused backend, refusing float32, for one test."""
    monkeypatch.setattr(registry, "_BACKENDS", {"reference": registry.get("reference")})
    fused = registry.OpSupport(lambda q, k, v, shape: q * 0 + 7, ("cpu",), (torch.float64,))
    registry.register(registry.Backend("picky", ops={"attention": fused}))
    return fused


def test_auto_prefers_a_fused_backend_that_fits(picky_backend):
    q, k, v = _qkv(dtype=torch.float64)
    assert (factorised_attention(q, k, v, 3, "joint") == 7).all()


def test_auto_falls_back_with_every_reason_and_named_backend_refuses(picky_backend):
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match=r"using the reference implementation \(picky: dtype float32 not supported"):
        out = factorised_attention(q, k, v, 3, "joint")
    torch.testing.assert_close(out, masked_attention(q, k, v, 3, "joint").float())
    with pytest.raises(BackendUnsupportedError, match=r"backend 'picky' cannot run this input: dtype float32"):
        factorised_attention(q, k, v, 3, "joint", backend="picky")


def test_select_returns_the_name_with_the_op(picky_backend):
    assert registry.select(_attention(dtype=torch.float64)) == registry.Selected("picky", picky_backend.run)
    with pytest.warns(UserWarning, match="no fused backend fits"):
        assert registry.select(_attention()).name == "reference"
    assert registry.select(_attention(), "reference").name == "reference"


def test_declared_limits_are_reasons():
    support = registry.OpSupport(lambda *a: None, ("cuda",), (torch.float16,), head_dims=(16, 128), max_index=2**31 - 1)
    assert support.reasons(_attention("cuda", torch.float16)) == []
    assert support.reasons(_attention(head_dim=8, dropout_p=0.1)) == [
        "device cpu not supported (supports cuda)",
        "dtype float32 not supported (supports float16)",
        "head dim 8 not supported (supports 16 to 128)",
        "attention dropout not supported",
    ]
    big = TubeletShape(1, 3, 8, (2, 4, 4), (1, 1, 1), clip_span=2**31 + 5)
    tubelet = registry.Request("tubelet", torch.device("cuda"), torch.float16, big)
    assert support.reasons(tubelet) == ["one clip of the video spans 2147483653 elements (supports at most 2147483648)"]


def test_auto_falls_back_from_an_index_limit(monkeypatch):
    """A limit found in the shape (a clip too large for int32 offsets) is a reason like any other:
    "auto" passes over the backend and a named one refuses, before any kernel runs."""
    limited = dataclasses.replace(
        registry.get("cpu"), ops={"tubelet": dataclasses.replace(registry.get("cpu").ops["tubelet"], max_index=1000)}
    )
    monkeypatch.setitem(registry._BACKENDS, "cpu", limited)
    video, weight = torch.randn(1, 3, 4, 16, 16), torch.randn(8, 3, 2, 8, 8)  # a clip spans 3072 elements
    with pytest.warns(UserWarning, match=r"cpu: one clip of the video spans 3072 elements \(supports at most 1001\)"):
        out = tubelet_embedding(video, weight)
    torch.testing.assert_close(out, tubelet_embedding(video, weight, backend="reference"))
    with pytest.raises(BackendUnsupportedError, match="backend 'cpu' cannot run this input: one clip"):
        tubelet_embedding(video, weight, backend="cpu")


def test_unknown_backend_is_named():
    with pytest.raises(
        ValueError, match=r"^attention: backend must be one of 'auto', 'reference', .*, got 'cuda_magic'$"
    ):
        registry.select(_attention(), "cuda_magic")
    with pytest.raises(ValueError, match=r"^backends.get: name must be one of 'reference', .*, got 'auto'$"):
        registry.get("auto")
    with pytest.raises(TypeError, match="backend must be a str, got int"):
        registry.select(_attention(), 3)


def test_warning_points_at_the_caller():
    q, k, v = _qkv(dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factorised_attention(q, k, v, 3, "joint")
    assert caught and caught[0].filename == __file__
