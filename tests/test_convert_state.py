"""vivit_kernels.convert.state: a converted model reads and writes its family's state dict.

First the key layout on a module of our own (no model library needed); then every family, built
from a small random config: the converted `state_dict()` is the original's (keys, order, shapes,
values), the original's loads strictly into the converted model and back, and each family's own
routes (Hugging Face save_pretrained / from_pretrained, its hub layout and `Trainer` resume; timm
checkpoints; VideoMAE built on the meta device) give the outputs of the model they started from:
equal where the computation is the same, within test_convert's parity bound against the original.
"""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import relative_error, require_transformers
from torch import nn

from support.convert_models import (
    TOLERANCE,
    hf_vivit,
    hidden,
    import_timm,
    import_transformers,
    timesformer,
    timm_vit,
    videomae,
    vit_pytorch_vivit,
)
from vivit_kernels import convert
from vivit_kernels.convert.common import AdoptedAttention, adopting_attention
from vivit_kernels.convert.state import check_same_state

pytestmark = pytest.mark.usefixtures("cpu_kernels", "one_thread")


def assert_same_state(actual: dict, expected: dict) -> None:
    """The same keys in the same order, and equal tensors."""
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape and torch.equal(actual[key], value), key


# --------------------------------------------------------------------------------- the families


@dataclass
class Case:
    """An original model, how to convert it, and how to run it."""

    original: nn.Module
    options: dict
    inputs: tuple
    forward: Callable = field(default=lambda m, *x: m(*x))
    same_function: bool = True  # the converted model computes the original's function


def _timm(seed: int, mode: str, **overrides) -> Case:
    model = timm_vit(seed=seed, **overrides)
    return Case(model, dict(mode=mode), (torch.randn(2, 3, 32, 32),), same_function=mode in ("joint", "spatial"))


# Base and task class of each Hugging Face family; every one on 4-frame clips (B, 4, 3, 32, 32).
HF_BUILDERS = {
    "timesformer": (timesformer, "TimesformerModel", "TimesformerForVideoClassification"),
    "hf_vivit": (hf_vivit, "VivitModel", "VivitForVideoClassification"),
    "videomae": (videomae, "VideoMAEModel", "VideoMAEForVideoClassification"),
}


def _hf(seed: int, family: str, task: bool = False, **overrides) -> Case:
    make, base, task_class = HF_BUILDERS[family]
    model = make(task_class if task else base, seed=seed, **dict(num_frames=4) | overrides)
    forward = (lambda m, x: m(x).logits) if task else hidden
    return Case(model, {}, (torch.randn(2, 4, 3, 32, 32),), forward)


def _videomae_pretraining(seed: int) -> Case:
    masked = torch.zeros(2, 32, dtype=torch.bool)
    masked[:, ::3] = True
    model = videomae("VideoMAEForPreTraining", seed=seed)
    return Case(model, {}, (torch.randn(2, 4, 3, 32, 32), masked), lambda m, x, mask: m(x, bool_masked_pos=mask).logits)


def _vit_pytorch(seed: int, variant: str, heads: int = 3, dim_head: int = 12) -> Case:
    model = vit_pytorch_vivit(variant, seed=seed, heads=heads, dim_head=dim_head)
    return Case(model, {}, (torch.randn(2, 3, 4, 32, 32),))


CASES: dict[str, Callable[[int], Case]] = {
    "timm joint, registers, qk_norm": lambda s: _timm(s, "joint", reg_tokens=2, qk_norm=True, proj_bias=False),
    "timm spatial": lambda s: _timm(s, "spatial"),
    "timm temporal": lambda s: _timm(s, "temporal"),
    "timm split, no class token or qkv bias": lambda s: _timm(
        s, "split", class_token=False, global_pool="avg", qkv_bias=False
    ),
    "timesformer divided": lambda s: _hf(s, "timesformer"),
    "timesformer space_only": lambda s: _hf(s, "timesformer", attention_type="space_only"),
    "timesformer joint_space_time": lambda s: _hf(s, "timesformer", attention_type="joint_space_time"),
    "hf_vivit": lambda s: _hf(s, "hf_vivit"),
    "hf_vivit task, no qkv bias": lambda s: _hf(s, "hf_vivit", task=True, num_labels=3, qkv_bias=False),
    "videomae": lambda s: _hf(s, "videomae"),
    "videomae without q/v bias": lambda s: _hf(s, "videomae", qv_bias=False),
    "videomae pre-training": _videomae_pretraining,
    "vit_pytorch factorized_encoder": lambda s: _vit_pytorch(s, "factorized_encoder"),
    "vit_pytorch factorized_self_attention": lambda s: _vit_pytorch(s, "factorized_self_attention"),
    "vit_pytorch one head, no output projection": lambda s: _vit_pytorch(s, "factorized_self_attention", 1, 32),
}


def _run(case: Case, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return case.forward(model.eval(), *case.inputs)


@pytest.mark.parametrize("name", CASES)
def test_state_dict_is_the_originals_both_ways(name):
    """The converted state dict is the original's; each loads strictly into the other, in place,
    and the loaded model computes what the one the weights came from computes."""
    case, other = CASES[name](0), CASES[name](1)
    converted = convert(copy.deepcopy(case.original), **case.options)
    assert_same_state(converted.state_dict(), case.original.state_dict())
    expected = _run(case, converted)
    if case.same_function:
        assert relative_error(expected, _run(case, case.original)) <= TOLERANCE

    fresh = convert(copy.deepcopy(other.original), **case.options)
    parameters = list(fresh.parameters())
    assert str(fresh.load_state_dict(case.original.state_dict(), strict=True)) == "<All keys matched successfully>"
    assert all(a is b for a, b in zip(fresh.parameters(), parameters, strict=True))
    assert torch.equal(_run(case, fresh), expected)

    back = other.original
    back.load_state_dict(converted.state_dict(), strict=True)
    assert torch.equal(_run(case, back), _run(case, case.original))


# How converted layers of 0.1.0 named the original's tensors: (pattern on the original's key, the
# former key, the index of the part where several were stacked into one tensor), per family.
_FORMER_NAMES = {
    "hf_vivit": [
        (r"(.*\.attention\.)(q|k|v)_proj\.(weight|bias)$", r"\1qkv.\3", "qkv"),
        (r"(.*\.attention\.)o_proj\.(weight|bias)$", r"\1proj.\2", None),
    ],
    "videomae": [
        (r"(.*\.attention\.)attention\.(query|key|value)\.weight$", r"\1qkv.weight", ("query", "key", "value")),
        (r"(.*\.attention\.)attention\.query\.bias$", r"\1q_bias", None),
        (r"(.*\.attention\.)attention\.value\.bias$", r"\1v_bias", None),
        (r"(.*\.attention\.)output\.dense\.(weight|bias)$", r"\1proj.\2", None),
    ],
    "timesformer": [
        (r"(.*attention\.)attention\.qkv\.(weight|bias)$", r"\1qkv.\2", None),
        (r"(.*attention\.)output\.dense\.(weight|bias)$", r"\1proj.\2", None),
    ],
    "vit_pytorch": [
        (r"(.*\.)to_qkv\.weight$", r"\1qkv.weight", None),
        (r"(.*\.)to_out\.0\.(weight|bias)$", r"\1proj.\2", None),
    ],
}


def _in_former_names(family: str, state: dict) -> dict:
    """`state` (the original's keys) as a converted model of 0.1.0 saved it."""
    former, stacks = {}, {}
    for key, value in state.items():
        for pattern, replacement, parts in _FORMER_NAMES[family]:
            match = re.match(pattern, key)
            if match:
                renamed = match.expand(replacement)
                if parts is None:
                    former[renamed] = value
                else:
                    order = "qkv" if parts == "qkv" else parts
                    stacks.setdefault(renamed, {})[list(order).index(match.group(2))] = value
                break
        else:
            former[key] = value
    for key, pieces in stacks.items():
        former[key] = torch.cat([pieces[i] for i in sorted(pieces)])
    return former


@pytest.mark.parametrize("name", [name for name in CASES if not name.startswith("timm")])
def test_state_dicts_in_the_former_converted_names_load(name):
    """A state dict a converted model of 0.1.0 saved (its own names: `qkv`, `proj`, `q_bias`) loads
    strictly into a converted model and gives the outputs of the model it came from."""
    case, other = CASES[name](0), CASES[name](1)
    family = next(family for family in _FORMER_NAMES if name.startswith(family))
    converted = convert(case.original, **case.options)
    former = _in_former_names(family, converted.state_dict())
    assert former.keys() != converted.state_dict().keys()
    fresh = convert(other.original, **case.options)
    assert str(fresh.load_state_dict(former, strict=True)) == "<All keys matched successfully>"
    assert torch.equal(_run(case, fresh), _run(case, converted))


@pytest.mark.parametrize("name", CASES)
def test_parameters_are_the_originals_by_name(name):
    """Conversion in place keeps every parameter object of the original under its name and in its
    order (an optimiser built before still holds them; name-based tools find them), and no buffer
    is added; a copy or pickle of the converted model keeps the state dict."""
    case = CASES[name](0)
    parameters = dict(case.original.named_parameters())
    buffers = [name for name, _ in case.original.named_buffers()]
    converted = convert(case.original, **case.options)
    after = dict(converted.named_parameters())
    assert list(after) == list(parameters) and all(after[key] is parameters[key] for key in parameters)
    assert [name for name, _ in converted.named_buffers()] == buffers
    for copied in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert_same_state(copied.state_dict(), converted.state_dict())


class _Holder(nn.Module):
    """An attention-like module with a projection and, optionally, a tensor or a clashing child."""

    def __init__(self, own_tensor: str | None = None, clash: bool = False) -> None:
        super().__init__()
        self.qkv_in = nn.Linear(8, 24)
        if own_tensor == "parameter":
            self.scale = nn.Parameter(torch.ones(2))
        elif own_tensor == "buffer":
            self.register_buffer("scale", torch.ones(2))
        if clash:
            self.attn_drop = nn.Linear(8, 8)  # FactorisedAttention's name, with parameters


class _Adopted(AdoptedAttention):
    qkv_parts = ("qkv_in",)


def test_adopting_refuses_what_it_cannot_take_over():
    layer = adopting_attention("layer", _Holder(), _Adopted, dim=8, num_heads=2, mode="joint", frames=1)
    assert [name for name, _ in layer.named_parameters()] == ["qkv_in.weight", "qkv_in.bias"]
    for kind in ("parameter", "buffer"):
        with pytest.raises(ValueError, match=r"convert: layer: _Holder holds tensors outside its submodules"):
            adopting_attention("layer", _Holder(own_tensor=kind), _Adopted, dim=8, num_heads=2, mode="joint", frames=1)
    with pytest.raises(ValueError, match=r"convert: layer: its submodule 'attn_drop' clashes"):
        adopting_attention("layer", _Holder(clash=True), _Adopted, dim=8, num_heads=2, mode="joint", frames=1)


def test_a_state_layout_that_differs_is_refused():
    original = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    check_same_state("layer", copy.deepcopy(original), original)
    with pytest.raises(ValueError, match=r"convert: layer: .*missing \['1\.bias', '1\.weight'\], extra \[\]"):
        check_same_state("layer", nn.Sequential(nn.Linear(8, 8)), original)
    with pytest.raises(ValueError, match=r"other shapes \['1\.bias', '1\.weight'\]"):
        check_same_state("layer", nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 5)), original)


# ----------------------------------------------------------------------------- Hugging Face routes

HF_FAMILIES = ["timesformer", "hf_vivit", "videomae"]


def _load_file(directory) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(f"{directory}/model.safetensors")


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_save_pretrained_and_from_pretrained(family, tmp_path):
    """A converted model's save_pretrained writes the file the original's writes (the hub layout
    transformers saves in); the original class loads it; the original's file loads into the
    converted model, by from_pretrained then convert or strictly by load_state_dict."""
    case = _hf(0, family)
    original, cls = case.original, type(case.original)
    converted = convert(copy.deepcopy(original))
    expected, expected_converted = _run(case, original), _run(case, converted)
    original.save_pretrained(tmp_path / "original")
    converted.save_pretrained(tmp_path / "converted")
    assert_same_state(_load_file(tmp_path / "converted"), _load_file(tmp_path / "original"))

    loaded, info = cls.from_pretrained(tmp_path / "converted", output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(_run(case, loaded), expected)
    assert torch.equal(_run(case, convert(cls.from_pretrained(tmp_path / "original"))), expected_converted)

    fresh = convert(_hf(1, family).original)
    fresh.load_state_dict(_load_file(tmp_path / "original"), strict=True)
    assert torch.equal(_run(case, fresh), expected_converted)


def _hub_layout(family: str, state: dict) -> dict:
    """The state dict in the layout of checkpoints made before transformers 5 (what 5.x renames on load)."""
    if family == "videomae":
        rules = [(r"attention\.attention\.query\.bias", "attention.attention.q_bias")]
        rules += [(r"attention\.attention\.value\.bias", "attention.attention.v_bias")]
    else:  # hf_vivit
        rules = [(r"^layers\.", "encoder.layer.")]
        rules += [
            (rf"attention\.{p}_proj", f"attention.attention.{name}")
            for p, name in zip("qkv", ("query", "key", "value"))
        ]
        rules += [(r"attention\.o_proj", "attention.output.dense")]
        rules += [(r"mlp\.fc1", "intermediate.dense"), (r"mlp\.fc2", "output.dense")]
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


@pytest.mark.parametrize("family", ["hf_vivit", "videomae"])
def test_hf_hub_layout(family, tmp_path):
    """A checkpoint in the pre-5 hub layout (ViViT's attention.attention.query, VideoMAE's q_bias):
    from_pretrained renames it, then convert; a converted model's load_state_dict renames it too."""
    case = _hf(0, family)
    import safetensors.torch  # with transformers

    legacy = _hub_layout(family, case.original.state_dict())
    assert legacy.keys() != case.original.state_dict().keys()
    case.original.config.save_pretrained(tmp_path)
    safetensors.torch.save_file({k: v.contiguous() for k, v in legacy.items()}, tmp_path / "model.safetensors")
    expected = _run(case, convert(copy.deepcopy(case.original)))

    loaded, info = type(case.original).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(_run(case, convert(loaded)), expected)
    fresh = convert(_hf(1, family).original)
    fresh.load_state_dict(legacy, strict=True)
    assert torch.equal(_run(case, fresh), expected)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_trainer_resume(family, tmp_path):
    """A converted model trained two steps by `Trainer` ends where one resumed after step 1 from
    the checkpoint `Trainer` saved ends (transformers 5.25 saves ViViT and VideoMAE in the hub
    layout, which their unconverted models' load_state_dict does not read)."""
    transformers = require_transformers("transformers' Trainer")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    transformers.logging.set_verbosity_error()
    g = torch.Generator().manual_seed(0)
    data = [dict(pixel_values=torch.randn(4, 3, 32, 32, generator=g), labels=i % 3) for i in range(4)]

    def train(model, directory, **kwargs):
        args = transformers.TrainingArguments(
            output_dir=str(directory),
            max_steps=2,
            save_steps=1,
            per_device_train_batch_size=2,
            learning_rate=0.05,
            report_to=[],
            use_cpu=True,
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        transformers.Trainer(model=model, args=args, train_dataset=data).train(**kwargs)
        return model.state_dict()

    straight = train(convert(_hf(0, family, task=True, num_labels=3).original), tmp_path / "a")
    resumed = train(
        convert(_hf(1, family, task=True, num_labels=3).original),
        tmp_path / "b",
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"),
    )
    assert_same_state(resumed, straight)


def test_videomae_on_the_meta_device(tmp_path):
    """Built on the meta device, materialised with to_empty over memory full of NaN, then loaded:
    the zero key bias is no buffer to be left uninitialised, and the outputs are the original's."""
    transformers = import_transformers()
    case = _hf(0, "videomae")
    expected = _run(case, convert(copy.deepcopy(case.original)))
    with torch.device("meta"):
        model = convert(transformers.VideoMAEModel(case.original.config))
    garbage = [torch.full((n,), float("nan")) for n in (32, 32 * 3, 32 * 32, 32 * 96) for _ in range(8)]
    del garbage
    model.to_empty(device="cpu")
    model.load_state_dict(case.original.state_dict(), strict=True)
    assert torch.equal(_run(case, model), expected)
    assert not any("attention" in name for name, _ in model.named_buffers())

    convert(copy.deepcopy(case.original)).save_pretrained(tmp_path)  # HF builds this one on the meta device
    assert torch.equal(_run(case, convert(transformers.VideoMAEModel.from_pretrained(tmp_path))), expected)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_from_pretrained_of_a_class_converted_at_construction(family, tmp_path):
    """A class that converts itself in __init__ loads as the same subclass of the original loads
    without converting: the same keys missing and unexpected (transformers 5.25 applies its hub
    renaming to ViViT and VideoMAE by class, so a subclass of theirs misses it either way), and
    where everything loads (TimeSformer), the original's outputs."""
    case = _hf(0, family)
    case.original.save_pretrained(tmp_path)

    class Converted(type(case.original)):
        def __init__(self, config):
            super().__init__(config)
            convert(self)

    class Subclass(type(case.original)):
        pass

    loaded, info = Converted.from_pretrained(tmp_path, output_loading_info=True)
    _, plain_info = Subclass.from_pretrained(tmp_path, output_loading_info=True)
    assert any(isinstance(module, AdoptedAttention) for module in loaded.modules())
    assert {key: set(info[key]) for key in info} == {key: set(plain_info[key]) for key in plain_info}
    if family == "timesformer":
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert relative_error(_run(case, loaded), _run(case, case.original)) <= TOLERANCE
    else:
        assert info["missing_keys"]  # the subclass route of these two families, converted or not


# ------------------------------------------------------------------------------- timm, vit-pytorch


@pytest.mark.parametrize("mode", ["joint", "spatial", "temporal", "split"])
def test_timm_checkpoints_both_ways(mode, tmp_path):
    """timm's load_checkpoint reads a converted model's state dict into the original and the
    original's into a converted model (strict)."""
    timm = import_timm()
    case = _timm(0, mode, qk_norm=True)
    converted = convert(copy.deepcopy(case.original), mode=mode)
    torch.save(converted.state_dict(), tmp_path / "converted.pth")
    torch.save({"state_dict": case.original.state_dict()}, tmp_path / "original.pth")

    original = _timm(1, mode, qk_norm=True).original
    timm.models.load_checkpoint(original, str(tmp_path / "converted.pth"), strict=True)
    assert torch.equal(_run(case, original), _run(case, case.original))
    fresh = convert(_timm(1, mode, qk_norm=True).original, mode=mode)
    timm.models.load_checkpoint(fresh, str(tmp_path / "original.pth"), strict=True)
    assert torch.equal(_run(case, fresh), _run(case, converted))


@pytest.mark.parametrize("variant", ["factorized_encoder", "factorized_self_attention"])
def test_vit_pytorch_saved_state_dicts_both_ways(variant, tmp_path):
    case = _vit_pytorch(0, variant)
    converted = convert(copy.deepcopy(case.original))
    torch.save(converted.state_dict(), tmp_path / "converted.pt")
    torch.save(case.original.state_dict(), tmp_path / "original.pt")
    original = _vit_pytorch(1, variant).original
    original.load_state_dict(torch.load(tmp_path / "converted.pt"), strict=True)
    assert torch.equal(_run(case, original), _run(case, case.original))
    fresh = convert(_vit_pytorch(1, variant).original)
    fresh.load_state_dict(torch.load(tmp_path / "original.pt"), strict=True)
    assert torch.equal(_run(case, fresh), _run(case, converted))
