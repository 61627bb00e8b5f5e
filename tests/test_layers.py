"""vivit.layers: the blocks' memory modes. "lean" computes the same function and gradients as
"default" and keeps 10 D-wide tensors per token per attention block (15 for model 3's two-attention
block) where "default" keeps 16 (22): the counts are bytes autograd saves, so they hold anywhere."""

import pytest
import torch
from conftest import relative_error

from vivit.config import ATTENTION_ORDERS
from vivit.layers import Block, BlockConfig, DropPath, FactorisedSelfAttentionBlock, Mlp
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
def test_activation_tensors_kept_per_token(kind, default, lean, attentions, cpu_kernels):
    """Per token, the difference between batch 2 and batch 1 (the weights cancel): D-wide tensors,
    plus each attention's log-sum-exp (H floats) and, by default, each LayerNorm's mean and rstd."""
    norms = attentions + 1
    for memory, tensors, stats in (("default", default, 2 * norms), ("lean", lean, 0)):
        block = _block(kind, memory)
        kept = [saved_bytes(block, torch.randn(batch, T * S, D, requires_grad=True), T) for batch in (1, 2)]
        assert kept[1] - kept[0] == T * S * 4 * (tensors * D + attentions * H + stats), memory


def test_model3_block_runs_space_then_time_on_one_frame_unless_told(generator):
    """The defaults: order "space_time" (the paper's), and all N tokens one frame; an unknown
    order is refused when the block is made, not run as the other one."""
    torch.manual_seed(0)
    default = FactorisedSelfAttentionBlock(BlockConfig(D, H)).eval()
    for weight in default.parameters():
        torch.nn.init.normal_(weight, std=0.2)
    orders = {order: FactorisedSelfAttentionBlock(BlockConfig(D, H), order=order).eval() for order in ATTENTION_ORDERS}
    for block in orders.values():
        block.load_state_dict(default.state_dict())
    x = torch.randn(2, T * S, D, generator=generator)
    assert torch.equal(default(x, T), orders["space_time"](x, T))
    assert relative_error(orders["time_space"](x, T), default(x, T)) > 0.01
    assert torch.equal(default(x), default(x, 1))
    assert relative_error(default(x, T), default(x)) > 0.01
    with pytest.raises(
        ValueError,
        match=r"^FactorisedSelfAttentionBlock: order must be one of 'space_time', "
        r"'time_space', got 'spacetime'$",
    ):
        FactorisedSelfAttentionBlock(BlockConfig(D, H), order="spacetime")


def test_layer_defaults(generator):
    """What the layers do when not told: DropPath keeps every sample, the MLP uses the exact GELU
    without dropout, a Block attends jointly over all N tokens as one frame; the qkv bias follows
    the config."""
    x = torch.randn(2, T * S, D, generator=generator)
    assert torch.equal(DropPath().train()(x), x)
    torch.manual_seed(0)
    mlp = Mlp(D, 2 * D).train()
    expected = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))
    assert torch.equal(mlp(x), expected)
    torch.manual_seed(0)
    block = Block(BlockConfig(D, H)).eval()
    joint = Block(BlockConfig(D, H), mode="joint").eval()
    joint.load_state_dict(block.state_dict())
    assert torch.equal(block(x), joint(x, 1)) and torch.equal(block(x), block(x, 1))
    assert torch.equal(block(x, T), joint(x, T))
    spatial = Block(BlockConfig(D, H), mode="spatial").eval()
    spatial.load_state_dict(block.state_dict())
    assert torch.equal(spatial(x), spatial(x, 1)) and relative_error(spatial(x, T), spatial(x)) > 0.01
    with pytest.raises(ValueError, match=r"^Mlp: activation must be one of 'gelu', 'gelu_tanh', got 'relu'$"):
        Mlp(D, 2 * D, activation="relu")
    assert Block(BlockConfig(D, H, qkv_bias=False)).attn.qkv.bias is None
