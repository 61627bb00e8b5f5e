"""vivit.layers: the blocks' memory modes. "lean" computes the same function and gradients as
"default" and keeps 10 D-wide tensors per token per attention block (15 for model 3's two-attention
block) where "default" keeps 16 (22): the counts are bytes autograd saves, so they hold anywhere."""

import pytest
import torch
from conftest import relative_error

from vivit.layers import Block, BlockConfig, FactorisedSelfAttentionBlock
from vivit_kernels import saved_bytes

D, H, T, S = 64, 4, 3, 10


def _block(kind: str, memory: str, **config):
    torch.manual_seed(0)
    if kind == "block":
        return Block(BlockConfig(D, H, memory=memory, **config), mode="split").train()
    return FactorisedSelfAttentionBlock(BlockConfig(D, H, memory=memory, **config)).train()


@pytest.mark.parametrize("kind", ["block", "model3"])
@pytest.mark.parametrize("config", [{}, {"drop": 0.1, "activation": "gelu_tanh"}], ids=["plain", "dropout-tanh"])
def test_lean_computes_what_default_computes(kind, config, generator):
    x = torch.randn(2, T * S, D, generator=generator, requires_grad=True)
    results = []
    for memory in ("default", "lean"):
        block = _block(kind, memory, **config)
        torch.manual_seed(1)  # the same dropout masks
        out = block(x, T)
        grads = torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out))
        results.append((out, grads))
    (out, grads), (lean_out, lean_grads) = results
    assert relative_error(lean_out, out) < 1e-6
    for a, b in zip(lean_grads, grads):
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("kind, default, lean, attentions", [("block", 16, 10, 1), ("model3", 22, 15, 2)])
def test_activation_tensors_kept_per_token(kind, default, lean, attentions):
    """Per token, the difference between batch 2 and batch 1 (the weights cancel): D-wide tensors,
    plus each attention's log-sum-exp (H floats) and, by default, each LayerNorm's mean and rstd."""
    norms = attentions + 1
    for memory, tensors, stats in (("default", default, 2 * norms), ("lean", lean, 0)):
        block = _block(kind, memory)
        kept = [saved_bytes(block, torch.randn(batch, T * S, D, requires_grad=True), T) for batch in (1, 2)]
        assert kept[1] - kept[0] == T * S * 4 * (tensors * D + attentions * H + stats), memory
