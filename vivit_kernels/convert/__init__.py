"""`convert`: put FactorisedAttention into the transformers people already have, in place.

One module per family: timm `VisionTransformer`; Hugging Face `TimesformerModel`, `VivitModel`,
`VideoMAEModel` (and their task models); vit-pytorch `ViViT`. A model is recognised through the
classes of packages it was built with (looked up in `sys.modules`), so vivit_kernels never
imports timm, transformers or vit_pytorch itself.

Each family checks every layer before it replaces any: a model that cannot be converted is left
as it was and the error names the layer and why. A converted attention takes over the original's
own modules and parameters under their own names (separate q, k, v projections are stacked when
used), so an optimiser built before the conversion still holds them, and `named_parameters()`,
`state_dict()` and `load_state_dict` are the original's (`state.py`): checkpoints move both ways
(`save_pretrained` / `from_pretrained`, `Trainer` resume, where Hugging Face models also read the
hub layout their `save_pretrained` writes; timm's `load_checkpoint`; `torch.save`), and tools
that find modules by name (optimiser groups, adapters) find the original's. A Hugging Face class
that converts itself at construction loads with `from_pretrained` as the same subclass of the
original does (transformers applies its hub renaming by class): load with the original's class,
then convert.
"""

from __future__ import annotations

from torch import nn

from .. import backends
from ..checks import MODES, check_choice, check_positive_int
from .hf_vivit import convert_hf_vivit, is_hf_vivit
from .lean import lean_attentions, lean_layers
from .timesformer import convert_timesformer, is_timesformer
from .timm_vit import convert_timm, is_timm_vit
from .videomae import convert_videomae, is_videomae
from .vit_pytorch import convert_vit_pytorch, is_vit_pytorch


def convert(
    model: nn.Module,
    *,
    mode: str | None = None,
    frames: int | None = None,
    tokens_per_frame: int | None = None,
    backend: str = "auto",
    memory: str | None = None,
) -> nn.Module:
    """Replace the attention of `model` by `FactorisedAttention`, in place; returns `model`.

    Args:
        model: a timm `VisionTransformer`; a transformers `TimesformerModel`, `VivitModel` or
            `VideoMAEModel`, or a task model built on one (`...ForVideoClassification`,
            `VideoMAEForPreTraining`); a vit-pytorch `ViViT`.
        mode: timm (an image model, so required): "joint" keeps its function; "spatial",
            "temporal", "split" attend over the frames of a (B, P + T * S, D) token sequence,
            time-major, with the model's class and register tokens as the P prefix tokens.
            Video models keep their own attention: None (or "joint" for ViViT / VideoMAE).
        frames: timm: T, when the module should insist on one clip length. TimeSformer: T
            (default: `config.num_frames`, as the original layer assumes).
        tokens_per_frame: timm: S (default: the patch grid; required with dynamic_img_size
            unless frames is given). TimeSformer: S, so T is read off each input instead.
        backend: the attention backend of every converted layer ("auto", "cpu", "triton",
            "sdpa", "reference").
        memory: None: each block keeps for backward what the original keeps. "lean": each block
            recomputes its LayerNorms and GELU in backward (`vivit_kernels.norm_linear` /
            `gelu_linear`), keeping 10 instead of 16 D-wide tensors per token, as the library's
            lean ViViT blocks; outputs and gradients are the original's. The block's class becomes
            a subclass of its own (`convert/lean.py`); modules, names and state dict stay. Every
            family: timm's `Block`, the transformers layers (TimeSformer's divided layers recompute
            their temporal LayerNorm too), vit-pytorch's converted `Attention` and `FeedForward`.

    What each family becomes:
        timm VisionTransformer: every block's `Attention` (qk_norm, proj_bias=False and
            attn_head_dim included; its q_norm / k_norm modules are reused).
        TimesformerModel, divided_space_time: each layer runs temporal and then spatial
            FactorisedAttention on the whole (B, 1 + S * T, D) sequence, space-major, the class
            token as one prefix token (it skips the temporal branch; spatially it attends once per
            frame and its outputs are averaged), instead of copying tokens into per-frame and
            per-position batches. space_only / joint_space_time: joint attention.
        VivitModel, VideoMAEModel: joint attention (VideoMAE: the query and value biases, and a
            zero key bias formed when used: no buffer, never trained).
        vit-pytorch ViViT: "factorized_encoder": joint attention in both transformers;
            "factorized_self_attention": spatial and temporal attention on the (B, T, n, D)
            grid, without the per-layer rearranges.

    Raises:
        TypeError: the model is of no family above.
        ValueError: an argument does not fit the family, or a layer cannot be converted
            (the message names it and why).
    """
    check_choice("convert", "mode", mode, (*MODES, None))
    for name, value in (("frames", frames), ("tokens_per_frame", tokens_per_frame)):
        if value is not None:
            check_positive_int("convert", name, value)
    check_choice("convert", "backend", backend, ("auto", *backends.names()))
    check_choice("convert", "memory", memory, (None, "lean"))
    options = dict(mode=mode, frames=frames, tokens_per_frame=tokens_per_frame, backend=backend)
    for recognises, convert_family in FAMILIES:
        if recognises(model):
            # Checked before anything is replaced: a model that cannot be made lean is left as it was.
            lean = lean_layers(model) if memory == "lean" else []
            replacements = convert_family(model, **options)
            if memory == "lean":
                lean += lean_attentions(replacements)
            for parent, attribute, module in replacements + lean:
                setattr(parent, attribute, module)
            return model
    raise TypeError(
        f"convert: {type(model).__module__}.{type(model).__qualname__} is not a model convert knows; it takes timm "
        "VisionTransformer, transformers TimesformerModel / VivitModel / VideoMAEModel (and the task models built on "
        "them) and vit-pytorch ViViT"
    )


FAMILIES = (
    (is_timm_vit, convert_timm),
    (is_timesformer, convert_timesformer),
    (is_hf_vivit, convert_hf_vivit),
    (is_videomae, convert_videomae),
    (is_vit_pytorch, convert_vit_pytorch),
)


def __getattr__(name: str):
    # The TimeSformer layer class is made on first use (it subclasses transformers' layer, which
    # vivit_kernels does not import); pickle finds it here, under this module's name.
    if name == "TimesformerDividedLayer":
        from transformers.models.timesformer.modeling_timesformer import TimesformerLayer

        from .timesformer import timesformer_divided_layer

        return timesformer_divided_layer(TimesformerLayer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
