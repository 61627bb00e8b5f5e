"""The public tubelet-embedding API: the module, dispatch and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error

from vivit_kernels import (
    TubeletEmbedding,
    UniformFrameEmbedding,
    central_frame,
    inflate,
    tubelet_embedding,
    uniform_frame_indices,
)


def test_module_is_conv3d_as_tokens(generator):
    embed = TubeletEmbedding(in_chans=3, dim=16, tubelet=(2, 4, 4)).double()
    video = torch.randn(2, 3, 5, 9, 12, dtype=torch.float64, generator=generator)
    tokens = embed(video)
    conv = F.conv3d(video, embed.proj.weight, embed.proj.bias, stride=(2, 4, 4))
    assert tokens.shape == (2, 2, 2 * 3, 16) and embed.grid(5, 9, 12) == (2, 2, 3)
    assert relative_error(tokens, conv.flatten(3).transpose(1, 3).transpose(1, 2)) < 1e-12


@pytest.mark.parametrize("layout", ["(nt, S, D)", "(1, nt, S, D)", "(nt * S, D)", "(1, nt * S, D)"])
def test_pos_embed_layouts(layout, generator):
    video = torch.randn(1, 3, 4, 8, 8, generator=generator)
    weight = torch.randn(6, 3, 2, 4, 4, generator=generator)
    shape = {"(nt, S, D)": (2, 4, 6), "(1, nt, S, D)": (1, 2, 4, 6), "(nt * S, D)": (8, 6), "(1, nt * S, D)": (1, 8, 6)}
    pos_embed = torch.randn(shape[layout], generator=generator)
    out = tubelet_embedding(video, weight, None, pos_embed)
    torch.testing.assert_close(out, tubelet_embedding(video, weight) + pos_embed.reshape(2, 4, 6))


def _video_weight(video_shape=(1, 3, 4, 8, 8), weight_shape=(6, 3, 2, 4, 4)):
    return torch.randn(video_shape), torch.randn(weight_shape)


@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (lambda: _video_weight((3, 4, 8, 8)), ValueError, r"video must be 5-D \(B, C, T, H, W\), got shape \(3, 4, 8, 8\)"),
        (lambda: _video_weight(weight_shape=(6, 1, 2, 4, 4)), ValueError, r"weight has 1 input channels but video has C=3"),
        (lambda: _video_weight((1, 3, 4, 3, 8)), ValueError, r"video H=3 is smaller than the tubelet's 4"),
        (lambda: _video_weight((1, 3, 1, 8, 8)), ValueError, r"video T=1 is smaller than the tubelet's 2"),
        (lambda: (*_video_weight(), torch.zeros(5)), ValueError, r"bias must have shape \(6,\) to match weight, got \(5,\)"),
        (lambda: (*_video_weight(), None, torch.zeros(3, 4, 6)), ValueError, r"pos_embed has shape \(3, 4, 6\); expected"),
        (lambda: (_video_weight()[0].half(), _video_weight()[1]), TypeError, r"weight has dtype torch.float32 but video"),
        (lambda: (_video_weight()[0].long(), _video_weight()[1]), TypeError, r"video must have a floating dtype"),
    ],
)
def test_bad_tubelet_input_raises_clear_error(make_args, error, message):
    with pytest.raises(error, match=message):
        tubelet_embedding(*make_args())


def test_bad_module_tubelet_raises():
    with pytest.raises(ValueError, match=r"tubelet must be a positive int or a \(t, h, w\) triple, got \(2, 16\)"):
        TubeletEmbedding(3, 16, tubelet=(2, 16))


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_inflate_on_a_static_clip_is_the_2d_patch_embedding(t, generator):
    frame = torch.randn(2, 3, 16, 12, dtype=torch.float64, generator=generator)
    weight_2d = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=generator)
    bias = torch.randn(8, dtype=torch.float64, generator=generator)
    clip = frame.unsqueeze(2).expand(-1, -1, 2 * t, -1, -1)
    tokens = tubelet_embedding(clip, inflate(weight_2d, t), bias)
    patches = F.conv2d(frame, weight_2d, bias, stride=4).flatten(2).transpose(1, 2)  # (B, S, D)
    for nt in range(2):
        assert relative_error(tokens[:, nt], patches) < 1e-12


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_central_frame_sees_only_the_centre_frame(t, generator):
    clip = torch.randn(1, 3, t, 8, 8, dtype=torch.float64, generator=generator)
    weight_2d = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=generator)
    tokens = tubelet_embedding(clip, central_frame(weight_2d, t))
    centre = F.conv2d(clip[:, :, t // 2], weight_2d, stride=4).flatten(2).transpose(1, 2)
    assert relative_error(tokens[:, 0], centre) < 1e-12


def test_uniform_frame_indices():
    assert uniform_frame_indices(32, 8).tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    assert uniform_frame_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert uniform_frame_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]  # short clips repeat frames
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        jittered = uniform_frame_indices(32, 8, jitter=True, generator=g)
        assert ((jittered // 4) == torch.arange(8)).all()  # one frame inside each segment of 4
    assert len({tuple(uniform_frame_indices(32, 8, jitter=True, generator=g).tolist()) for _ in range(10)}) > 1
    with pytest.raises(ValueError, match=r"num_frames must be a positive int, got 0"):
        uniform_frame_indices(32, 0)


def test_uniform_frame_embedding_samples_then_embeds(generator):
    embed = UniformFrameEmbedding(3, 16, patch_size=4, num_frames=4).eval()
    video = torch.randn(2, 3, 12, 8, 8, generator=generator)
    tokens = embed(video)
    assert tokens.shape == (2, 4, 4, 16) and embed.grid(12, 8, 8) == (4, 2, 2)
    sampled = video[:, :, uniform_frame_indices(12, 4)]
    torch.testing.assert_close(tokens, tubelet_embedding(sampled, embed.proj.weight, embed.proj.bias))
