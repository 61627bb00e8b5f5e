"""Argument checks (vivit_kernels/checks.py): every bad input gets an error naming it, and a
checked call's shape object carries what dispatch and the ops need."""

import pytest
import torch

from vivit_kernels import factorised_attention, factorised_attention_packed, tubelet_embedding
from vivit_kernels.checks import AttentionShape, TubeletShape, check_attention, check_tubelet, default_scale


def _qkv(shape=(1, 4, 12, 8), dtype=torch.float32):
    return [torch.randn(shape).to(dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (lambda: (*_qkv(), 5, "joint"), ValueError, r"N=12 tokens with num_prefix_tokens=0 do not fit frames=5"),
        (lambda: (*_qkv(), 0, "joint"), ValueError, r"frames must be >= 1, got 0"),
        (lambda: (*_qkv(), 2.0, "joint"), TypeError, r"frames must be an int, got float"),
        (lambda: (*_qkv((1, 3, 12, 8)), 3, "split"), ValueError, r"even number of heads .* got H=3"),
        (
            lambda: (*_qkv(), 3, "diagonal"),
            ValueError,
            r"mode must be one of 'joint', 'spatial', 'temporal', 'split', got 'diagonal'$",
        ),
        (lambda: (*_qkv()[:2], torch.randn(1, 4, 12, 16), 3, "joint"), ValueError, r"one shape .* v \(1, 4, 12, 16\)"),
        (lambda: (*_qkv((4, 12, 8)), 3, "joint"), ValueError, r"q must be 4-D \(B, H, N, Dh\), got shape \(4, 12, 8\)"),
        (lambda: (*_qkv(dtype=torch.int64), 3, "joint"), TypeError, r"q must have a floating dtype, got torch.int64"),
        (lambda: (*_qkv()[:2], torch.randn(1, 4, 12, 8).double(), 3, "joint"), TypeError, r"v has dtype torch.float64"),
        (lambda: (None, *_qkv()[:2], 3, "joint"), TypeError, r"q must be a torch.Tensor, got NoneType"),
    ],
)
def test_bad_attention_input_raises_clear_error(make_args, error, message):
    with pytest.raises(error, match=message):
        factorised_attention(*make_args())


@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (lambda: (*_qkv()[:1], None, *_qkv()[:1], 3), TypeError, "k must be a torch.Tensor, got NoneType"),
        (
            lambda: (*_qkv()[:2], torch.zeros(12, 8), 3),
            ValueError,
            r"v must be 4-D \(B, H, N, Dh\), got shape \(12, 8\)",
        ),
        (
            lambda: (*_qkv()[:1], *_qkv(dtype=torch.float64)[:2], 3),
            TypeError,
            "k has dtype torch.float64 but q has torch.float32; expected one dtype",
        ),
        (
            lambda: (*_qkv()[:1], torch.randn(1, 4, 12, 8, device="meta"), *_qkv()[:1], 3),
            ValueError,
            "k is on meta but q is on cpu; expected one device",
        ),
        (
            lambda: (*_qkv(), 5),
            ValueError,
            r"N=12 tokens with num_prefix_tokens=0 do not fit frames=5; expected "
            r"N = num_prefix_tokens \+ frames \* tokens_per_frame \(a class token\? pass num_prefix_tokens\)",
        ),
    ],
)
def test_attention_errors_name_the_op_and_the_tensor(make_args, error, message):
    """The whole message: the op, the tensor that is wrong (q, k or v) and what was expected."""
    with pytest.raises(error, match=rf"^factorised_attention: {message}$"):
        factorised_attention(*make_args(), "joint")


def test_a_grid_mismatch_suggests_a_class_token_only_when_there_is_none():
    q = torch.zeros(1, 2, 13, 8)
    with pytest.raises(
        ValueError,
        match=r"^factorised_attention: N=13 tokens with num_prefix_tokens=2 do not fit "
        r"frames=5; expected N = num_prefix_tokens \+ frames \* tokens_per_frame$",
    ):
        factorised_attention(q, q, q, 5, "joint", num_prefix_tokens=2)


@pytest.mark.parametrize(
    "qkv, heads, error, message",
    [
        (
            torch.randn(12, 48),
            2,
            ValueError,
            r"^factorised_attention_packed: qkv must be 3-D \(B, N, 3 \* H \* Dh\), got shape \(12, 48\)",
        ),
        (torch.randn(1, 12, 50), 2, ValueError, r"qkv has width 50, not divisible by 3 \* num_heads = 6; expected"),
    ],
)
def test_bad_packed_input_raises_clear_error(qkv, heads, error, message):
    with pytest.raises(error, match=message):
        factorised_attention_packed(qkv, heads, 3, "joint")


def test_bad_scale_and_backend_raise():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"scale must be a finite float or None, got nan"):
        factorised_attention(q, k, v, 3, "joint", scale=float("nan"))
    with pytest.raises(
        ValueError, match=r"^attention: backend must be one of 'auto', 'reference', .*, got 'cuda_magic'$"
    ):
        factorised_attention(q, k, v, 3, "joint", backend="cuda_magic")


def _video_weight(video_shape=(1, 3, 4, 8, 8), weight_shape=(6, 3, 2, 4, 4)):
    return torch.randn(video_shape), torch.randn(weight_shape)


@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (
            lambda: _video_weight((3, 4, 8, 8)),
            ValueError,
            r"^tubelet_embedding: video must be 5-D \(B, C, T, H, W\), got shape \(3, 4, 8, 8\)",
        ),
        (
            lambda: _video_weight(weight_shape=(6, 1, 2, 4, 4)),
            ValueError,
            r"weight has 1 input channels but video has C=3",
        ),
        (lambda: _video_weight((1, 3, 4, 3, 8)), ValueError, r"video H=3 is smaller than the tubelet's 4"),
        (lambda: _video_weight((1, 3, 1, 8, 8)), ValueError, r"video T=1 is smaller than the tubelet's 2"),
        (lambda: _video_weight((1, 3, 4, 8, 3)), ValueError, r"video W=3 is smaller than the tubelet's 4"),
        (
            lambda: (*_video_weight(), torch.zeros(5)),
            ValueError,
            r"bias must have shape \(6,\) to match weight, got \(5,\)",
        ),
        (
            lambda: (*_video_weight(), None, torch.zeros(3, 4, 6)),
            ValueError,
            r"pos_embed has shape \(3, 4, 6\); expected",
        ),
        (
            lambda: (_video_weight()[0].half(), _video_weight()[1]),
            TypeError,
            r"weight has dtype torch.float32 but video",
        ),
        (lambda: (_video_weight()[0].long(), _video_weight()[1]), TypeError, r"video must have a floating dtype"),
    ],
)
def test_bad_tubelet_input_raises_clear_error(make_args, error, message):
    with pytest.raises(error, match=message):
        tubelet_embedding(*make_args())


def test_attention_shape_resolves_the_scale_and_counts_keys():
    q = torch.zeros(2, 6, 5 * 7, 16)
    shape = check_attention(q, q, q, 5, "split", None)
    assert shape == AttentionShape(2, 6, 35, 16, 5, "split", default_scale(16))
    assert default_scale(16) == 0.25
    assert shape.tokens_per_frame == 7 and shape.scores == 35 * (3 * 7 + 3 * 5)
    with pytest.deprecated_call(match="tokens_per_frame"):
        assert shape.spatial == 7
    assert shape.forward_flops == 4 * 2 * 16 * shape.scores
    assert shape.backward_flops == 2.5 * shape.forward_flops
    lengths = {"joint": 35, "spatial": 7, "temporal": 5}
    for mode, length in lengths.items():
        assert check_attention(q, q, q, 5, mode, 0.5).scores == 6 * 35 * length
        assert check_attention(q, q, q, 5, mode, 0.5).scale == 0.5


def test_scores_count_the_prefix_tokens_group_by_group():
    """P = 2 prefix tokens, T = 3 frames of S = 4: a spatial group is the prefix and one frame (3
    groups of 6 x 6 pairs); temporal groups are 4 of 3 x 3 and the prefix among itself (2 x 2)."""
    q = torch.zeros(1, 4, 2 + 3 * 4, 8)
    scores = {
        mode: check_attention(q, q, q, 3, mode, None, num_prefix_tokens=2).scores
        for mode in ("spatial", "temporal", "split", "joint")
    }
    assert scores == {
        "spatial": 4 * 3 * 6 * 6,
        "temporal": 4 * (4 * 3 * 3 + 2 * 2),
        "split": 2 * 3 * 6 * 6 + 2 * (4 * 3 * 3 + 2 * 2),
        "joint": 4 * 14 * 14,
    }


def test_tubelet_shape_holds_the_grid_flops_and_index_spans():
    video = torch.zeros(2, 16, 3, 64, 48).permute(0, 2, 1, 3, 4)[:, :, :7]  # (B, C, T, H, W) view of (B, T, C, H, W)
    weight = torch.zeros(32, 3, 2, 16, 16)
    shape = check_tubelet(video, weight, None, None)
    assert shape.grid == (3, 4, 3) and shape.tokens == (3, 12) and shape.tokens_per_clip == 36
    assert shape.tube_size == 3 * 2 * 16 * 16 and shape.output_shape == (2, 3, 12, 32)
    assert shape.flops == 2 * 2 * 36 * 32 * shape.tube_size
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(video.shape[1:], video.stride()[1:]))
    assert shape.clip_span == span
    assert shape.index_spans == {"one clip of the video": span, "one clip's tokens": 36 * 32, "the weight": 32 * 1536}
    assert TubeletShape.of(video.shape, weight.shape).grid == shape.grid


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: factorised_attention(*_qkv(), 3, "joint", layout="xy"),
            ValueError,
            "factorised_attention: unknown layout 'xy'; expected one of 'time_major', 'space_major'",
        ),
        (
            lambda: factorised_attention(*_qkv((1, 4, 12, 0)), 3, "joint"),
            ValueError,
            r"factorised_attention: the input has an empty dimension \(B=1, N=12, Dh=0\); expected B, N, Dh >= 1",
        ),
        (
            lambda: factorised_attention(*_qkv(), 1, "joint", num_prefix_tokens=12),
            ValueError,
            r"factorised_attention: N=12 tokens with num_prefix_tokens=12 do not fit frames=1; expected "
            r"N = num_prefix_tokens \+ frames \* tokens_per_frame",
        ),
        (
            lambda: factorised_attention_packed(torch.randn(1, 12, 48), 0, 3, "joint"),
            ValueError,
            "factorised_attention_packed: num_heads must be >= 1, got 0",
        ),
        (
            lambda: tubelet_embedding(torch.randn(1, 3, 4, 8, 8), torch.randn(6, 3, 4, 4)),
            ValueError,
            r"tubelet_embedding: weight must be 5-D \(D, C, t, h, w\) like nn.Conv3d, got shape \(6, 3, 4, 4\)",
        ),
        (
            lambda: factorised_attention(_qkv()[0], [1.0], _qkv()[0], 3, "joint"),
            TypeError,
            "factorised_attention: k must be a torch.Tensor, got list",
        ),
        (
            lambda: factorised_attention(*_qkv(), 3, "diagonal"),
            ValueError,
            "factorised_attention: mode must be one of 'joint', 'spatial', 'temporal', 'split', got 'diagonal'",
        ),
        (
            lambda: factorised_attention(*_qkv(), 3, "joint", dropout_p=1.0),
            ValueError,
            r"factorised_attention: dropout_p must be in \[0, 1\), got 1.0",
        ),
        (
            lambda: factorised_attention_packed(torch.randn(1, 12, 36), 2, 5, "joint"),
            ValueError,
            r"factorised_attention_packed: N=12 tokens with num_prefix_tokens=0 do not fit frames=5; expected "
            r"N = num_prefix_tokens \+ frames \* tokens_per_frame \(a class token\? pass num_prefix_tokens\)",
        ),
        (
            lambda: tubelet_embedding(*_video_weight(), None, torch.zeros(2, 16, 6, dtype=torch.float64)),
            TypeError,
            "tubelet_embedding: pos_embed has dtype torch.float64 but video has torch.float32; expected one dtype",
        ),
        (
            lambda: tubelet_embedding(*_video_weight(), [1.0] * 6),
            TypeError,
            "tubelet_embedding: bias must be a torch.Tensor or None, got list",
        ),
        (
            lambda: tubelet_embedding(*_video_weight(), None, 0.5),
            TypeError,
            "tubelet_embedding: pos_embed must be a torch.Tensor or None, got float",
        ),
    ],
    ids=[
        "layout",
        "empty head dim",
        "prefix only",
        "num_heads",
        "weight",
        "k not a tensor",
        "mode",
        "dropout",
        "packed grid",
        "pos_embed dtype",
        "bias not a tensor",
        "pos_embed not a tensor",
    ],
)
def test_more_bad_inputs_get_their_whole_message(call, error, message):
    with pytest.raises(error, match=rf"^{message}$"):
        call()


def test_packed_heads_split_the_width_in_three():
    """Width 36 with 2 heads: q, k and v of 2 x 6 each (36 is no multiple of 8: the width is
    divided by 3 * H, nothing else)."""
    out = factorised_attention_packed(torch.randn(1, 12, 36), 2, 3, "joint", backend="reference")
    assert out.shape == (1, 12, 12)
