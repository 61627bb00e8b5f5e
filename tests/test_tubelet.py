"""The public tubelet-embedding API: the op, the modules and frame sampling."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_near_oracle

from vivit_kernels import (
    TubeletEmbedding,
    UniformFrameEmbedding,
    tubelet_backend,
    tubelet_embedding,
    uniform_frame_indices,
)


def test_module_is_conv3d_as_tokens(generator):
    embed = TubeletEmbedding(in_chans=3, dim=16, tubelet=(2, 4, 4)).double()
    video = torch.randn(2, 3, 5, 9, 12, dtype=torch.float64, generator=generator)
    tokens = embed(video)
    conv = F.conv3d(video, embed.proj.weight, embed.proj.bias, stride=(2, 4, 4))
    assert tokens.shape == (2, 2, 2 * 3, 16) and embed.grid(5, 9, 12) == (2, 2, 3)
    backend = tubelet_backend(video, embed.proj.weight)  # "auto": cpu where the C++ kernels load
    assert_near_oracle(tokens, conv.flatten(3).transpose(1, 3).transpose(1, 2), backend, "tokens", op="tubelet")


@pytest.mark.parametrize("layout", ["(nt, S, D)", "(1, nt, S, D)", "(nt * S, D)", "(1, nt * S, D)"])
def test_pos_embed_layouts(layout, generator):
    video = torch.randn(1, 3, 4, 8, 8, generator=generator)
    weight = torch.randn(6, 3, 2, 4, 4, generator=generator)
    shape = {"(nt, S, D)": (2, 4, 6), "(1, nt, S, D)": (1, 2, 4, 6), "(nt * S, D)": (8, 6), "(1, nt * S, D)": (1, 8, 6)}
    pos_embed = torch.randn(shape[layout], generator=generator)
    out = tubelet_embedding(video, weight, None, pos_embed)
    torch.testing.assert_close(out, tubelet_embedding(video, weight) + pos_embed.reshape(2, 4, 6))


def test_bad_module_tubelet_raises():
    with pytest.raises(ValueError, match=r"tubelet must be a positive int or a \(t, h, w\) triple, got \(2, 16\)"):
        TubeletEmbedding(3, 16, tubelet=(2, 16))


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


def test_more_tubes_than_one_gathered_block(generator):
    """33 x 32 tubes of 64 x 64, 1056 rows of 4096: more than the CPU kernel gathers at once (2^22
    elements, 1024 of these rows), so d(weight) sums the blocks' products and each block's tokens
    and d(video) land in their own rows."""
    video = torch.randn(1, 1, 1, 64 * 33, 64 * 32, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(2, 1, 1, 64, 64, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, generator=generator, requires_grad=True)
    backend = tubelet_backend(video, weight, bias)
    tokens = tubelet_embedding(video, weight, bias)
    conv = F.conv3d(video, weight, bias, stride=(1, 64, 64))
    expected = conv.flatten(3).permute(0, 2, 3, 1)
    assert_near_oracle(tokens, expected, backend, "tokens", op="tubelet")
    grad = torch.randn(tokens.shape, dtype=torch.float64, generator=generator)
    grads = torch.autograd.grad(tokens, (video, weight, bias), grad)
    expected_grads = torch.autograd.grad(expected, (video, weight, bias), grad)
    for name, actual, want in zip(("dvideo", "dweight", "dbias"), grads, expected_grads):
        assert_near_oracle(actual, want, backend, name, op="tubelet")
