"""The four ViViT variants (models/vivit) against an independent float64 oracle written from the
paper's equations (Arnab et al., 2021: eqs. 1-6 and section 3.3): einsum, explicit token masks,
LayerNorm and GELU spelled out. Nothing here is imported from models/ or vivit_kernels but the model
under test and its config; the oracle reads the model's weights by their state-dict names only.

Each variant runs on every backend available here (cpu, sdpa, reference in float64; the Triton
interpreter in float32 at this small size) in both memory modes, and its logits and every parameter
gradient are compared with the oracle's. Model 3's block order, model 4's head split (spatial heads
first), model 2's temporal encoder and stochastic depth (per sample, rescaled by 1 / keep) are part
of the oracle, so a change to any of them changes the values compared.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import relative_error, require_cpu_kernels

from vivit import ViViT, ViViTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# A grid that fills no block: 3 x 3 x 5 tubelets (S = 15, N = 45) of a 7 x 13 x 22 clip (one frame,
# one row and two columns left over, which the tokeniser drops); 4 heads of 24.
CLIP = (7, 13, 22)
TINY = dict(
    num_frames=7,
    img_size=(13, 22),
    tubelet=(2, 4, 4),
    dim=96,
    num_heads=4,
    mlp_ratio=2.0,
    depth=2,
    temporal_depth=2,
    num_classes=5,
)
GRID = (3, 3, 5)

# (variant, config overrides): both poolings of the CLS models, both block orders of model 3.
VARIANTS = [
    ("spatio_temporal", {}),
    ("spatio_temporal", dict(pooling="avg")),
    ("factorised_encoder", {}),
    ("factorised_encoder", dict(pooling="avg", mlp_activation="gelu_tanh")),
    ("factorised_self_attention", {}),
    ("factorised_self_attention", dict(attention_order="time_space")),
    ("factorised_dot_product", {}),
]
VARIANT_IDS = [
    "model1-cls",
    "model1-avg",
    "model2-cls",
    "model2-avg-tanh",
    "model3-space_time",
    "model3-time_space",
    "model4",
]


# ------------------------------------------------------------------------------------- oracle


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu(x, approximation):
    if approximation == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def linear(x, p, name):
    return torch.einsum("...i,oi->...o", x, p[f"{name}.weight"]) + p[f"{name}.bias"]


def head_masks(kinds, frames, spatial, prefix):
    """(H, N, N) booleans, one per head kind: may token i attend to token j? Tokens after the prefix
    are time-major, token prefix + t * S + s."""
    n = torch.arange(frames * spatial)
    t, s = n // spatial, n % spatial
    allowed = {
        "joint": torch.ones(len(n), len(n), dtype=torch.bool),
        "spatial": t[:, None] == t[None, :],
        "temporal": s[:, None] == s[None, :],
    }
    masks = []
    for kind in kinds:
        mask = torch.ones(prefix + len(n), prefix + len(n), dtype=torch.bool)
        mask[prefix:, prefix:] = allowed[kind]
        masks.append(mask)
    return torch.stack(masks)


def msa(x, p, name, heads, masks):
    """Multi-head self-attention (eq. 2's MSA) with each head restricted by its (N, N) mask."""
    B, N, D = x.shape
    qkv = linear(x, p, f"{name}.qkv").reshape(B, N, 3, heads, D // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, Dh)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D // heads)
    weights = logits.masked_fill(~masks, float("-inf")).softmax(-1)
    out = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(B, N, D)
    return linear(out, p, f"{name}.proj")


class StochasticDepth:
    """Replays, in order, the per-sample keep masks the model drew (recorded by `recorded_draws`),
    checking that each was drawn with keep = 1 - rate; rate i of a stack of L rises linearly,
    drop_path_rate * i / (L - 1)."""

    def __init__(self, draws, rate):
        self.draws, self.rate, self.used = draws, rate, 0

    def rates(self, depth):
        return [self.rate * i / max(depth - 1, 1) for i in range(depth)]

    def __call__(self, branch, rate):
        if rate == 0.0:
            return branch
        assert self.used < len(self.draws), "the oracle has a dropped branch the model did not draw a mask for"
        shape, keep, mask = self.draws[self.used]
        self.used += 1
        assert keep == pytest.approx(1 - rate) and shape == (branch.shape[0], 1, 1), (shape, keep, rate)
        return branch * mask.to(branch) / keep


def block(x, p, name, c, kinds, frames, spatial, prefix, drop, rate):
    """Eqs. 2-3: y = x + MSA(LN(x)), z = y + MLP(LN(y)), each branch through stochastic depth."""
    eps, masks = c.norm_eps, head_masks(kinds, frames, spatial, prefix)
    x = x + drop(
        msa(
            layer_norm(x, p[f"{name}.norm1.weight"], p[f"{name}.norm1.bias"], eps),
            p,
            f"{name}.attn",
            c.num_heads,
            masks,
        ),
        rate,
    )
    return x + drop(mlp(x, p, name, c), rate)


def mlp(x, p, name, c):
    hidden = linear(layer_norm(x, p[f"{name}.norm2.weight"], p[f"{name}.norm2.bias"], c.norm_eps), p, f"{name}.mlp.fc1")
    return linear(gelu(hidden, c.mlp_activation), p, f"{name}.mlp.fc2")


def factorised_self_attention_block(x, p, name, c, frames, spatial, drop, rate):
    """Eqs. 4-6: spatial MSA, then temporal MSA, then the MLP (the order swapped for "time_space")."""
    eps = c.norm_eps
    spatial_mask, temporal_mask = (
        head_masks(["spatial"] * c.num_heads, frames, spatial, 0),
        head_masks(["temporal"] * c.num_heads, frames, spatial, 0),
    )

    def space(x):
        normed = layer_norm(x, p[f"{name}.norm1.weight"], p[f"{name}.norm1.bias"], eps)
        return x + drop(msa(normed, p, f"{name}.attn", c.num_heads, spatial_mask), rate)

    def time(x):
        normed = layer_norm(x, p[f"{name}.temporal_norm.weight"], p[f"{name}.temporal_norm.bias"], eps)
        return x + drop(msa(normed, p, f"{name}.temporal_attn", c.num_heads, temporal_mask), rate)

    x = time(space(x)) if c.attention_order == "space_time" else space(time(x))
    return x + drop(mlp(x, p, name, c), rate)


def tubelets(video, weight, bias):
    """Section 3.3: non-overlapping t x h x w tubes, each linearly projected; leftovers dropped.
    (B, C, T, H, W) -> (B, n_t, n_h * n_w, D), time-major."""
    D, C, t, h, w = weight.shape
    B, _, T, H, W = video.shape
    nt, nh, nw = T // t, H // h, W // w
    tubes = video[:, :, : nt * t, : nh * h, : nw * w].reshape(B, C, nt, t, nh, h, nw, w)
    # (B, n_t, n_h, n_w, C, t, h, w): one row per tube, flattened as the Conv3d weight is.
    tubes = tubes.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, nt, nh * nw, C * t * h * w)
    return torch.einsum("bnsk,dk->bnsd", tubes, weight.reshape(D, -1)) + bias


def oracle_logits(p, c, video, drop):
    """The logits of ViViT variant c.variant with parameters p (name -> float64 tensor)."""
    tokens = tubelets(video, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"])  # (B, nt, S, D)
    B, nt, S, D = tokens.shape
    cls = c.pooling == "cls"
    rates = drop.rates(c.depth)

    def pool(z):
        return z[:, 0] if cls else z.mean(1)

    if c.variant == "factorised_encoder":
        # Model 2: a spatial encoder on each frame (its own CLS, a per-frame positional embedding) ...
        z = tokens.reshape(B * nt, S, D) + p["pos_embed"][:, int(cls) :]
        if cls:
            z = torch.cat([(p["cls_token"] + p["pos_embed"][:, :1]).expand(B * nt, 1, D), z], 1)
        for i in range(c.depth):
            z = block(z, p, f"blocks.{i}", c, ["joint"] * c.num_heads, 1, S, int(cls), drop, rates[i])
        frames = pool(layer_norm(z, p["norm.weight"], p["norm.bias"], c.norm_eps)).reshape(B, nt, D)
        # ... then a temporal encoder over the n_t frame vectors, with its CLS and positional embedding.
        z = frames + p["temporal.pos_embed"][:, int(cls) :]
        if cls:
            z = torch.cat([(p["temporal.cls_token"] + p["temporal.pos_embed"][:, :1]).expand(B, 1, D), z], 1)
        for i, rate in enumerate(drop.rates(c.temporal_depth)):
            z = block(z, p, f"temporal.blocks.{i}", c, ["joint"] * c.num_heads, 1, nt, int(cls), drop, rate)
        z = layer_norm(z, p["temporal.norm.weight"], p["temporal.norm.bias"], c.norm_eps)
    else:
        z = tokens.reshape(B, nt * S, D) + p["pos_embed"][:, int(cls) :]
        if cls:
            z = torch.cat([(p["cls_token"] + p["pos_embed"][:, :1]).expand(B, 1, D), z], 1)
        half = c.num_heads // 2
        kinds = {
            "spatio_temporal": ["joint"] * c.num_heads,
            "factorised_dot_product": ["spatial"] * half + ["temporal"] * (c.num_heads - half),
        }
        for i in range(c.depth):
            if c.variant == "factorised_self_attention":
                z = factorised_self_attention_block(z, p, f"blocks.{i}", c, nt, S, drop, rates[i])
            else:
                z = block(z, p, f"blocks.{i}", c, kinds[c.variant], nt, S, int(cls), drop, rates[i])
        z = layer_norm(z, p["norm.weight"], p["norm.bias"], c.norm_eps)
    return linear(pool(z), p, "head")


# ---------------------------------------------------------------------------------- the tests


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random (biases, LayerNorm gains, CLS, positions and model 3's zero-initialised
    temporal projection included), at scales that keep attention far from uniform."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            elif param.dim() >= 2 and not name.endswith(("pos_embed", "cls_token")):
                param.copy_(noise * param[0].numel() ** -0.5)
            else:
                param.copy_(0.5 * noise)


def build(variant, overrides, backend, memory, dtype, generator, **extra):
    config = ViViTConfig(
        variant=variant,
        memory=memory,
        backend="reference" if backend == "sdpa" else backend,
        **{**TINY, **overrides, **extra},
    )
    model = ViViT(config).to(dtype)
    if backend == "sdpa":  # the sdpa backend has attention only: the tokeniser stays on the reference op
        for module in model.modules():
            if hasattr(module, "qkv"):  # an attention layer
                module.backend = "sdpa"
    randomise(model, generator)
    return model


def oracle_and_grads(model, video, grad, drop):
    """The oracle's logits and {parameter name: gradient} for upstream gradient `grad`, in float64."""
    params = {name: p.detach().double().requires_grad_() for name, p in model.named_parameters()}
    expected = oracle_logits(params, model.config, video.double(), drop)
    expected.backward(grad)
    unused = len(drop.draws) - drop.used
    assert not unused, f"{unused} stochastic-depth draws the oracle has no branch for"
    return expected.detach(), {name: p.grad for name, p in params.items()}


def compare(model, video, generator, drop):
    """(error of the logits, {parameter: error of its gradient}) against the oracle; a parameter the
    model's output does not reach (no gradient) has error inf."""
    grad = torch.randn(video.shape[0], TINY["num_classes"], generator=generator, dtype=torch.float64)
    logits = model(video.to(next(model.parameters()).dtype))
    logits.backward(grad.to(logits.dtype))
    expected, expected_grads = oracle_and_grads(model, video, grad, drop)
    errors = {
        name: math.inf if p.grad is None else relative_error(p.grad, expected_grads[name])
        for name, p in model.named_parameters()
    }
    return relative_error(logits, expected), errors


def video_of(batch, generator, channels=3):
    return torch.randn(batch, channels, *CLIP, generator=generator, dtype=torch.float64)


# (logits, any parameter gradient): a few times the worst relative error measured over the variants and
# memory modes. float64 on cpu, sdpa and reference; float32 on the Triton interpreter (TRITON_SIZE).
TOLERANCE = {
    "cpu": (1e-14, 2e-14),  # measured 2.6e-15 / 4.3e-15 (stochastic depth 9.5e-16 / 3.0e-15)
    "sdpa": (1e-14, 2e-14),  # measured 2.6e-15 / 4.3e-15
    "reference": (1e-14, 2e-14),  # measured 2.8e-15 / 4.3e-15
    "triton": (6e-7, 3e-6),  # measured 1.5e-7 / 6.9e-7
}
# The interpreter runs every kernel program in Python: one block per stack, two heads of 16 (Triton's
# smallest head dim), one channel and one clip keep each model to a second or two.
TRITON_SIZE = dict(depth=1, temporal_depth=1, dim=32, num_heads=2, in_chans=1)
FLOAT64_BACKENDS = ("cpu", "sdpa", "reference")
CASES = [(variant, overrides, backend) for variant, overrides in VARIANTS for backend in FLOAT64_BACKENDS] + [
    (variant, overrides, "triton") for variant, overrides in VARIANTS[::2]
]  # one case of each model
CASE_IDS = [f"{name}-{backend}" for name in VARIANT_IDS for backend in FLOAT64_BACKENDS] + [
    f"{name}-triton" for name in VARIANT_IDS[::2]
]


def check(logits_error, grad_errors, backend):
    out_bound, grad_bound = TOLERANCE[backend]
    assert logits_error < out_bound, f"logits: {logits_error:.2e} (bound {out_bound:.0e})"
    worst = max(grad_errors, key=grad_errors.get)
    assert grad_errors[worst] < grad_bound, f"gradient of {worst}: {grad_errors[worst]:.2e} (bound {grad_bound:.0e})"


@pytest.mark.parametrize("memory", ["default", "lean"])
@pytest.mark.parametrize("variant, overrides, backend", CASES, ids=CASE_IDS)
def test_model_matches_the_oracle(variant, overrides, backend, memory, generator):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    if backend == "cpu":
        require_cpu_kernels()
    triton = backend == "triton"
    dtype = torch.float32 if triton else torch.float64
    model = build(variant, overrides, backend, memory, dtype, generator, **(TRITON_SIZE if triton else {})).eval()
    video = video_of(1, generator, channels=1) if triton else video_of(2, generator)
    assert model.grid == GRID
    check(*compare(model, video, generator, StochasticDepth([], 0.0)), backend)


@pytest.fixture
def recorded_draws(monkeypatch):
    """Tensor.bernoulli_ (DropPath's draw) replaced: each call is recorded as (shape, keep, mask), and
    its mask is a fixed pattern that drops some samples and keeps others, whatever keep is."""
    draws = []

    def draw(self, p=0.5, *, generator=None):
        pattern = (torch.arange(self.numel()) + len(draws)) % 3 != 0
        self.copy_(pattern.reshape(self.shape))
        draws.append((tuple(self.shape), p, pattern.reshape(self.shape).clone()))
        return self

    monkeypatch.setattr(torch.Tensor, "bernoulli_", draw)
    return draws


@pytest.mark.parametrize("memory", ["default", "lean"])
@pytest.mark.parametrize("variant, overrides", VARIANTS, ids=VARIANT_IDS)
def test_stochastic_depth_matches_the_oracle(variant, overrides, memory, recorded_draws, generator, cpu_kernels):
    """Training mode with drop_path_rate 0.3 over 3 blocks: each residual branch of each block
    (model 3: three) is multiplied by its sample's keep mask / keep, keep = 1 - 0.3 * i / 2."""
    model = build(variant, overrides, "cpu", memory, torch.float64, generator, drop_path_rate=0.3, depth=3).train()
    errors = compare(model, video_of(3, generator), generator, StochasticDepth(recorded_draws, 0.3))
    assert any(not mask.all() for *_, mask in recorded_draws), "no sample was dropped: nothing is checked"
    check(*errors, "cpu")


def test_the_oracle_tells_the_orders_and_head_splits_apart(generator):
    """The comparisons above can fail: with these weights, swapping model 3's block order or model 4's
    head halves changes the oracle's logits far beyond the tolerance."""
    video = video_of(2, generator)
    model = build("factorised_self_attention", {}, "reference", "default", torch.float64, generator)
    params = {name: p.detach() for name, p in model.named_parameters()}
    space_time = oracle_logits(params, model.config, video, StochasticDepth([], 0.0))
    model.config.attention_order = "time_space"
    assert relative_error(oracle_logits(params, model.config, video, StochasticDepth([], 0.0)), space_time) > 1e-3
    model = build("factorised_dot_product", {}, "reference", "default", torch.float64, generator)
    params = {name: p.detach() for name, p in model.named_parameters()}
    expected = oracle_logits(params, model.config, video, StochasticDepth([], 0.0))
    swapped = dict(params)  # the temporal heads' q, k, v rows first: the head order reversed
    for i in range(model.config.depth):
        for part in ("weight", "bias"):
            w = params[f"blocks.{i}.attn.qkv.{part}"]
            swapped[f"blocks.{i}.attn.qkv.{part}"] = w.reshape(3, 2, -1, *w.shape[1:]).flip(1).reshape(w.shape)
        proj = params[f"blocks.{i}.attn.proj.weight"]
        swapped[f"blocks.{i}.attn.proj.weight"] = proj.reshape(proj.shape[0], 2, -1).flip(1).reshape(proj.shape)
    assert relative_error(oracle_logits(swapped, model.config, video, StochasticDepth([], 0.0)), expected) > 1e-3
