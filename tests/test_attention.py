"""The public attention API: the op, the FactorisedAttention module, NaN behaviour."""

import pytest
import torch
from conftest import MODES, assert_near_oracle, masked_attention, packed_qkv, relative_error, require_cpu_kernels

from vivit_kernels import FactorisedAttention, attention_backend, factorised_attention


@pytest.mark.parametrize("mode", MODES)
def test_public_op_matches_oracle(mode, generator):
    q, k, v, _ = packed_qkv(2, 4, 3 * 7, 24, generator=generator, requires_grad=False)
    out = factorised_attention(q, k, v, 3, mode, backend="reference")
    assert out.shape == q.shape
    assert_near_oracle(out, masked_attention(q, k, v, 3, mode), "reference")


def _device(backend: str) -> str:
    """Where `backend` runs: triton on a GPU when there is one (CPU tensors only interpreted)."""
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
        return "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "cpu":
        require_cpu_kernels()
    return "cpu"


# The fused backends: the reference and sdpa ones compute "split" as exactly this concatenation.
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_split_is_spatial_heads_then_temporal_heads(backend, generator):
    q, k, v, _ = packed_qkv(2, 6, 5 * 7, 16, dtype=torch.float32, generator=generator, requires_grad=False)
    q, k, v = (x.to(_device(backend)) for x in (q, k, v))
    split = factorised_attention(q, k, v, 5, "split", backend=backend)
    spatial = factorised_attention(q[:, :3], k[:, :3], v[:, :3], 5, "spatial", backend=backend)
    temporal = factorised_attention(q[:, 3:], k[:, 3:], v[:, 3:], 5, "temporal", backend=backend)
    # One head's arithmetic whatever launch it is part of: measured 0 (bit-identical) on the CPU and
    # interpreted. Compiled, the autotuner may give split and single-mode launches different blocks
    # (not measured: no GPU here), so there the fp32 oracle bound.
    tolerance = 0.0 if q.device.type == "cpu" else 1e-5
    torch.testing.assert_close(split, torch.cat([spatial, temporal], dim=1), rtol=0, atol=tolerance)


def test_module_loads_timm_attention_and_matches_it(generator):
    pytest.importorskip("timm", reason="timm is not installed")
    from timm.layers import Attention

    torch.manual_seed(0)
    timm_attn = Attention(48, num_heads=4, qkv_bias=True).eval()
    ours = FactorisedAttention(48, num_heads=4, mode="joint", qkv_bias=True).eval()
    ours.load_state_dict(timm_attn.state_dict())  # strict: the parameter names are the interface
    x = torch.randn(2, 3 * 5, 48, generator=generator)
    # fp32 against fp32 (the cpu kernel against timm's SDPA): measured 3.2e-7 (seeds 0-4).
    assert relative_error(ours(x, frames=3), timm_attn(x)) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_module_grid_and_flat_inputs_agree(mode, generator):
    attn = FactorisedAttention(32, num_heads=4, mode=mode)
    x = torch.randn(2, 3, 5, 32, generator=generator)
    grid = attn(x)
    assert grid.shape == x.shape
    torch.testing.assert_close(attn(x.reshape(2, 15, 32), frames=3), grid.reshape(2, 15, 32))


def test_module_attention_dropout_only_in_training(generator):
    attn = FactorisedAttention(32, num_heads=4, mode="split", attn_drop=0.5, backend="reference")
    x = torch.randn(1, 3, 4, 32, generator=generator)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


@pytest.mark.parametrize("qk_norm", [False, True], ids=["packed", "qk_norm"])
def test_module_dropout_rate_is_read_from_its_dropout_module(qk_norm, monkeypatch, generator):
    """The op gets `attn_drop.p` (as set now, not at construction) in training and 0 in eval."""
    import vivit_kernels.attention as attention

    rates = []

    def recording(op):
        def call(*args, **kwargs):
            rates.append(kwargs["dropout_p"])
            return op(*args, **kwargs)

        return call

    for name in ("factorised_attention", "factorised_attention_packed"):
        monkeypatch.setattr(attention, name, recording(getattr(attention, name)))
    attn = FactorisedAttention(32, num_heads=4, mode="split", attn_drop=0.5, qk_norm=qk_norm, backend="reference")
    assert isinstance(attn.attn_drop, torch.nn.Dropout) and attn.attn_drop.p == 0.5
    attn.attn_drop.p = 0.25
    x = torch.randn(1, 3, 4, 32, generator=generator)
    attn.train()(x)
    attn.eval()(x)
    assert rates == [0.25, 0.0]


def test_module_takes_timm_attention_arguments(generator):
    """attn_drop / proj_drop are nn.Dropout modules, norm_layer builds the qk norms, as in timm."""
    pytest.importorskip("timm", reason="timm is not installed")
    from functools import partial

    from timm.layers import Attention

    options = dict(
        num_heads=4,
        qkv_bias=True,
        qk_norm=True,
        attn_drop=0.1,
        proj_drop=0.2,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )
    torch.manual_seed(0)
    timm_attn = Attention(48, **options).eval()
    ours = FactorisedAttention(48, mode="joint", **options).eval()
    ours.load_state_dict(timm_attn.state_dict())  # strict: the parameter names are the interface
    for name in ("attn_drop", "proj_drop"):
        theirs, mine = getattr(timm_attn, name), getattr(ours, name)
        assert type(mine) is type(theirs) is torch.nn.Dropout and mine.p == theirs.p
    assert ours.q_norm.eps == ours.k_norm.eps == timm_attn.q_norm.eps == 1e-6
    x = torch.randn(2, 3 * 5, 48, generator=generator)
    assert relative_error(ours(x, frames=3), timm_attn(x)) < 1e-6
    assert FactorisedAttention(48, 4, qk_norm=True).q_norm.eps == 1e-5  # no norm_layer: nn.LayerNorm's default


@pytest.mark.parametrize("device, dtype", [("meta", torch.float64), ("cpu", torch.float64), ("meta", None)])
def test_module_factory_arguments(device, dtype):
    """device / dtype reach every parameter and buffer (the zero key bias and the qk norms too), as in nn.Linear."""
    attn = FactorisedAttention(48, 4, qk_norm=True, key_bias=False, proj_bias=True, device=device, dtype=dtype)
    tensors = dict(attn.named_parameters()) | dict(attn.named_buffers())
    assert {"qkv.weight", "q_bias", "k_bias", "v_bias", "q_norm.weight", "k_norm.bias", "proj.bias"} <= tensors.keys()
    for name, tensor in tensors.items():
        assert tensor.device.type == device and tensor.dtype == (dtype or torch.get_default_dtype()), name


# (the backends that promise it, the tensors whose NaN they confine): triton packs groups shorter
# than its tile into one, where a NaN value reaches the tile's other groups (see the docstring).
NAN_CONFINED = [("reference", "qkv"), ("sdpa", "qkv"), ("cpu", "qkv"), ("triton", "qk")]


@pytest.mark.parametrize("backend, tensors", NAN_CONFINED, ids=[b for b, _ in NAN_CONFINED])
@pytest.mark.parametrize(
    "mode, group",
    [
        ("joint", lambda t, s: torch.ones_like(t, dtype=torch.bool)),
        ("spatial", lambda t, s: t == 1),
        ("temporal", lambda t, s: s == 2),
    ],
    ids=["joint", "spatial", "temporal"],
)
def test_nan_stays_in_the_groups_that_see_it(mode, group, backend, tensors, generator):
    """A NaN in the key or value of token (t=1, s=2) makes NaN exactly the rows of its group; one
    in its query, exactly its own row."""
    T, S = 3, 4
    n = torch.arange(T * S)
    poisoned = 1 * S + 2
    for which in tensors:
        q, k, v, _ = packed_qkv(1, 2, T * S, 16, dtype=torch.float32, generator=generator, requires_grad=False)
        qkv = [x.clone().to(_device(backend)) for x in (q, k, v)]
        qkv["qkv".index(which)][:, :, poisoned] = float("nan")
        out = factorised_attention(*qkv, T, mode, backend=backend).cpu()
        rows = n == poisoned if which == "q" else group(n // S, n % S)
        assert out[:, :, ~rows].isfinite().all(), which
        if backend == "sdpa" and which == "q":
            continue  # torch's fp32 CPU SDPA returns 0, not NaN, for a NaN query in short sequences (4 here)
        assert out[:, :, rows].isnan().all(), which


def test_bad_module_arguments_raise():
    with pytest.raises(ValueError, match=r"dim=50 is not divisible by num_heads=4"):
        FactorisedAttention(50, num_heads=4)
    with pytest.raises(ValueError, match=r"even number of heads .* num_heads=3"):
        FactorisedAttention(48, num_heads=3, mode="split")
    attn = FactorisedAttention(48, num_heads=4)
    with pytest.raises(ValueError, match=r"needs frames=T"):
        attn(torch.randn(1, 12, 48))
    with pytest.raises(ValueError, match=r"x has dim 32, expected 48"):
        attn(torch.randn(1, 3, 4, 32))
    with pytest.raises(ValueError, match=r"N=12 tokens with num_prefix_tokens=0 do not fit frames=5"):
        attn(torch.randn(1, 12, 48), frames=5)


def test_backend_names_the_choice_without_computing(cpu_kernels, generator):
    q, k, v, _ = packed_qkv(1, 2, 3 * 4, 8, dtype=torch.float32, generator=generator, requires_grad=False)
    assert attention_backend(q, k, v, 3, "split") == "cpu"
    assert attention_backend(q, k, v, 3, "split", backend="reference") == "reference"
    with pytest.warns(UserWarning, match="no fused backend fits"):
        assert attention_backend(q.double(), k.double(), v.double(), 3, "split", dropout_p=0.1) == "sdpa"
    with pytest.raises(ValueError, match="N=12 tokens with num_prefix_tokens=0 do not fit frames=5"):
        attention_backend(q, k, v, 5, "split")


def test_module_stands_in_a_timm_block(generator):
    pytest.importorskip("timm", reason="timm is not installed")
    from timm.models.vision_transformer import Block

    block = Block(32, num_heads=4, qkv_bias=True).eval()
    reference_out = block(x := torch.randn(2, 3 * 5, 32, generator=generator))
    attn = FactorisedAttention(32, num_heads=4, mode="joint", frames=3)
    attn.load_state_dict(block.attn.state_dict())
    block.attn = attn
    assert relative_error(block(x), reference_out) < 5e-7  # fp32 against fp32: measured 1.5e-7 (seeds 0-4)
    with pytest.raises(ValueError, match=r"attn_mask / is_causal are not supported"):
        block(x, is_causal=True)


COMPILE_SCRIPT = """
import torch, vivit_kernels
torch.manual_seed(0)
attn = vivit_kernels.FactorisedAttention(64, 4, mode="split", tokens_per_frame=6, num_prefix_tokens=1)
compiled = torch.compile(attn, fullgraph=True)  # inductor, the first call of this process
x = torch.randn(2, 1 + 3 * 6, 64, requires_grad=True)
out = compiled(x)
out.sum().backward()
grad, x.grad = x.grad, None
expected = attn(x)
expected.sum().backward()
torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same kernels: measured bit-identical
torch.testing.assert_close(grad, x.grad, rtol=0, atol=0)
print("backend", vivit_kernels.attention_backend(*[torch.zeros(2, 4, 19, 16)] * 3, 3, "split", num_prefix_tokens=1))
"""


def test_torch_compile_fullgraph_on_the_first_call_of_a_fresh_process(cpu_kernels):
    """Dispatch runs under tracing: nothing it does on a first call (loading the C++ library)
    may break the graph."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend cpu" in result.stdout


def test_module_derives_frames_from_tokens_per_frame(generator):
    """The patch grid is fixed, clip lengths are not: T follows from each input's N."""
    attn = FactorisedAttention(32, 4, mode="split", tokens_per_frame=5, num_prefix_tokens=1)
    for frames in (2, 3):
        x = torch.randn(2, 1 + frames * 5, 32, generator=generator)
        explicit = FactorisedAttention(32, 4, mode="split", num_prefix_tokens=1)
        explicit.load_state_dict(attn.state_dict())
        torch.testing.assert_close(attn(x), explicit(x, frames=frames))


@pytest.mark.parametrize(
    "kwargs, tokens, call_frames, message",
    [
        (
            dict(frames=8, tokens_per_frame=196),
            4 * 196,
            None,
            r"N=784 tokens with num_prefix_tokens=0 do not fit frames=8, tokens_per_frame=196",
        ),
        (
            dict(tokens_per_frame=196, num_prefix_tokens=1),
            4 * 196,
            None,
            r"N=784 tokens with num_prefix_tokens=1 do not fit tokens_per_frame=196",
        ),
        (dict(tokens_per_frame=196), 1569, None, r"N=1569 .* \(a class token\? pass num_prefix_tokens\)"),
        (
            dict(tokens_per_frame=196),
            784,
            8,
            r"N=784 tokens with num_prefix_tokens=0 do not fit frames=8, tokens_per_frame=196",
        ),
    ],
)
def test_module_refuses_a_grid_that_does_not_fit(kwargs, tokens, call_frames, message):
    """A module built for 8 frames of 14 x 14 given a 4-frame clip: an error naming N, frames,
    tokens_per_frame and the prefix, never a silently wrong grid."""
    attn = FactorisedAttention(32, 4, **kwargs)
    with pytest.raises(ValueError, match=message):
        attn(torch.randn(1, tokens, 32), frames=call_frames)


def test_module_grid_input_has_no_room_for_prefix_tokens():
    attn = FactorisedAttention(32, 4, num_prefix_tokens=1, frames=2)
    with pytest.raises(ValueError, match=r"a \(B, T, S, D\) input has no prefix tokens"):
        attn(torch.randn(1, 2, 5, 32))


def _plain_attention(attn, x, frames, mode, prefix=0, layout="time_major"):
    """What the module computes, written out with torch ops and the oracle: the check of its options."""
    B, N, D = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    bias = (
        attn.qkv.bias if attn.q_bias is None else torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    )
    q, k, v = torch.nn.functional.linear(x, attn.qkv.weight, bias).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = masked_attention(q, k, v, frames, mode, None, prefix, layout).float()
    return attn.proj(out.transpose(1, 2).reshape(B, N, H * Dh))


def test_module_options_of_other_libraries(generator):
    """qk norm (timm), no key bias (VideoMAE), inner width != dim (vit-pytorch), no output bias."""
    torch.manual_seed(0)
    attn = FactorisedAttention(
        48,
        4,
        mode="split",
        head_dim=20,
        qk_norm=True,
        key_bias=False,
        proj_bias=False,
        tokens_per_frame=5,
        num_prefix_tokens=2,
        layout="space_major",
    )
    for param in (attn.q_bias, attn.v_bias, attn.q_norm.weight, attn.k_norm.bias):
        torch.nn.init.normal_(param)
    assert attn.qkv.out_features == 3 * 80 and attn.proj.in_features == 80 and attn.proj.bias is None
    assert "k_bias" not in attn.state_dict() and "qkv.bias" not in attn.state_dict()
    x = torch.randn(2, 2 + 3 * 5, 48, generator=generator, requires_grad=True)
    out = attn(x)
    expected = _plain_attention(attn, x, 3, "split", prefix=2, layout="space_major")
    assert relative_error(out, expected) < 8e-7  # fp32 module, float64 attention: measured 2.5e-7 (seeds 0-4)
    out.sum().backward()
    assert attn.k_bias.grad is None and not attn.k_bias.requires_grad and (attn.k_bias == 0).all()
