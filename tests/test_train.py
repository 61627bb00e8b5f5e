"""vivit.train: the demo configuration learns motion; resume is exact; accumulation is exact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import require_transformers

from vivit.checkpoint import load_checkpoint
from vivit.cli import UserError
from vivit.cli.train import build_parser, train
from vivit.run.trainer import Trainer

TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--tubelet", "2", "8", "8", "--no-progress", "--workers", "0"]


def run(tmp_path, name: str, *extra: str) -> dict:
    args = build_parser().parse_args(["--output-dir", str(tmp_path / name), *extra])
    return train(args)


def test_demo_config_learns_motion_beyond_a_frame_order_blind_model(tmp_path):
    """Model 4 on the moving shapes: 8 classes (4 directions x 2 speeds), chance 12.5%.

    A model blind to frame order sees each clip as a set of frames. The set tells the axis of
    motion and the speed (how far apart the shape's positions are), but a clip moving left is
    the reversal of an equally likely clip moving right (test_data checks this pairing
    exactly), so such a model can at best guess the sign: its accuracy is capped at 50%.
    Reaching 70% on held-out clips needs the order; with 256 held-out clips, 70% is 6
    standard deviations above what a 50% classifier could score by luck.
    """
    threads = torch.get_num_threads()
    summary = run(
        tmp_path,
        "demo",
        "--variant",
        "factorised_dot_product",
        "--dim",
        "64",
        "--depth",
        "3",
        "--heads",
        "4",
        "--tubelet",
        "2",
        "8",
        "8",
        "--steps",
        "300",
        "--batch-size",
        "32",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "20",
        "--synthetic-clips",
        "4096",
        "--synthetic-val-clips",
        "256",
        "--no-progress",
        "--log-every",
        "50",
        "--threads",
        "1",  # a model this small gains little from a second thread, and loses a lot on a busy machine
    )
    assert summary["finished"] and summary["val_clips"] == 256
    assert summary["val_top1"] >= 0.70, summary
    assert torch.get_num_threads() == threads  # --threads held for the run only


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_continues_bit_for_bit(tmp_path, optimizer):
    """6 steps straight == 3 steps, stop, resume, 3 steps: parameters, optimiser state and the
    logged losses identical. Dropout, stochastic depth and mixup draw from every RNG the
    checkpoint must restore; 40 clips in batches of 8 cross an epoch boundary at step 5."""
    common = [
        *TINY,
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--synthetic-clips",
        "40",
        "--synthetic-val-clips",
        "0",
        "--optimizer",
        optimizer,
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--dropout",
        "0.1",
        "--drop-path",
        "0.1",
        "--mixup",
        "0.4",
        "--label-smoothing",
        "0.1",
        "--log-every",
        "1",
        "--clip-grad",
        "1.0",
    ]
    run(tmp_path, "straight", *common)
    first = run(tmp_path, "split", *common, "--stop-at", "3")
    assert first["steps"] == 3 and not first["finished"]
    second = run(tmp_path, "split", *common, "--resume", "auto")
    assert second["steps"] == 6 and second["finished"]

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][i][name])), (i, name)
    assert a["scheduler"] == b["scheduler"]

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r and "event" not in r]

    assert losses("straight") == losses("split")


def test_a_killed_run_resumed_matches_a_straight_one_record_for_record(tmp_path, monkeypatch):
    """A run killed after its step-4 checkpoint and resumed redoes steps 5 and 6: the weights are
    the straight run's (the held-out evaluation at step 4 draws from the global RNG, and the
    checkpoint holds the state after that draw), and metrics.jsonl holds every record once."""
    checkpoint = Trainer.checkpoint

    def checkpoint_and_keep_a_copy(self):
        checkpoint(self)
        shutil.copy(self.ckpt_path, tmp_path / f"step{self.step}.pt")

    monkeypatch.setattr(Trainer, "checkpoint", checkpoint_and_keep_a_copy)
    common = [
        *TINY,
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--synthetic-clips",
        "40",
        "--synthetic-val-clips",
        "8",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "2",
        "--dropout",
        "0.1",
        "--mixup",
        "0.4",
        "--log-every",
        "1",
    ]
    run(tmp_path, "straight", *common)
    killed = tmp_path / "killed"
    killed.mkdir()
    # What the kill at step 6 left: every record logged so far, and the checkpoint of step 4.
    shutil.copy(tmp_path / "straight" / "metrics.jsonl", killed)
    shutil.copy(tmp_path / "step4.pt", killed / "checkpoint.pt")
    run(tmp_path, "killed", *common, "--resume", "auto")

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = load_checkpoint(killed / "checkpoint.pt")["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        # Epoch records after a resume total the resumed part of the epoch only: compare where they fall.
        return [
            (
                r.get("event"),
                r.get("step", r.get("steps")),
                None if r.get("event") == "epoch" else r.get("loss", r.get("top1")),
            )
            for r in map(json.loads, lines)
        ]

    assert records("killed") == records("straight")
    assert [step for event, step, _ in records("killed") if event is None] == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    # SGD: its update is linear in the gradient, so the weights differ by the gradients' rounding
    # (~1e-7). AdamW divides by sqrt(v): an element whose gradient is near zero turns that
    # rounding into a visible step, and the comparison would measure the optimiser, not accumulation.
    common = [
        *TINY,
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--synthetic-clips",
        "32",
        "--synthetic-val-clips",
        "0",
        "--lr",
        "1e-1",
        "--optimizer",
        "sgd",
    ]
    run(tmp_path, "one", *common)
    run(tmp_path, "accum", *common, "--accum-steps", "4")
    a = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "accum" / "checkpoint.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bad_arguments_are_errors_naming_the_option(tmp_path):
    with pytest.raises(UserError, match="--batch-size 6 must be a positive multiple of .* --accum-steps = 4"):
        run(tmp_path, "bad", *TINY, "--batch-size", "6", "--accum-steps", "4")
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        run(tmp_path, "bad", *TINY, "--precision", "fp16", "--device", "cpu")


@pytest.mark.parametrize("init", ["inflate", "central_frame"])
def test_initialise_from_an_image_checkpoint(tmp_path, init):
    """--pretrained/--init reach the model: with lr 0 the trained tubelet filter is the image
    model's patch filter made 3D by the chosen rule."""
    timm = pytest.importorskip("timm", reason="a timm ViT is the image checkpoint")
    from vivit import central_frame, inflate

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10
    )
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    run(
        tmp_path,
        "pre",
        *TINY,
        "--steps",
        "1",
        "--batch-size",
        "8",
        "--synthetic-clips",
        "8",
        "--synthetic-val-clips",
        "0",
        "--lr",
        "0",
        "--pretrained",
        str(tmp_path / "vit.pth"),
        "--init",
        init,
    )
    weight = load_checkpoint(tmp_path / "pre" / "checkpoint.pt")["model"]["patch_embed.proj.weight"]
    expected = {"inflate": inflate, "central_frame": central_frame}[init](vit.patch_embed.proj.weight.detach(), 2)
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)


def test_fine_tune_from_a_video_checkpoint(tmp_path, capsys):
    """--pretrained given a video model loads it as one: a vivit-train checkpoint onto 48 px
    frames resamples its positional embedding as a video (4x4x4 -> 4x6x6 tokens); a Hugging Face
    ViViT directory (8 frames of 32 px, 5 labels) on the same grid loads as it is, with its tanh
    GELU, and gets a new head for the built-in data's 8 classes."""
    from vivit import hf_to_timm
    from vivit.adapt import resample_video_pos_embed

    one_step = [*TINY, "--steps", "1", "--batch-size", "8", "--synthetic-clips", "8", "--synthetic-val-clips", "0"]
    run(tmp_path, "source", *one_step)
    source = load_checkpoint(tmp_path / "source" / "checkpoint.pt")["model"]
    run(
        tmp_path,
        "larger",
        *one_step,
        "--lr",
        "0",
        "--img-size",
        "48",
        "--pretrained",
        str(tmp_path / "source" / "checkpoint.pt"),
    )
    assert "pos_embed: resampled over time and space, 4x4x4 -> 4x6x6" in capsys.readouterr().err
    tuned = load_checkpoint(tmp_path / "larger" / "checkpoint.pt")["model"]
    assert torch.equal(tuned["pos_embed"], resample_video_pos_embed(source["pos_embed"], (4, 4, 4), (4, 6, 6)))
    assert all(torch.equal(tuned[key], source[key]) for key in source if key != "pos_embed")

    transformers = require_transformers("transformers writes the Hugging Face ViViT")
    config = transformers.VivitConfig(
        image_size=32,
        num_frames=8,
        tubelet_size=[2, 8, 8],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    torch.manual_seed(0)
    hf = transformers.VivitForVideoClassification(config)
    hf.save_pretrained(tmp_path / "hf")
    run(
        tmp_path,
        "from_hf",
        *one_step,
        "--lr",
        "0",
        "--variant",
        "spatio_temporal",
        "--mlp-ratio",
        "2",
        "--pretrained",
        str(tmp_path / "hf"),
    )
    assert (
        "skipped head.weight: class count differs: checkpoint (5, 32), model (8, 32): a new head"
        in capsys.readouterr().err
    )
    state = load_checkpoint(tmp_path / "from_hf" / "checkpoint.pt")
    converted, _ = hf_to_timm(hf.state_dict())
    assert all(torch.equal(state["model"][key], converted[key]) for key in converted if not key.startswith("head."))
    assert state["model_spec"]["overrides"]["mlp_activation"] == "gelu_tanh"


@pytest.mark.parametrize(
    "options",
    [
        ["--precision", "bf16"],
        ["--grad-checkpointing", "--variant", "factorised_encoder"],
        ["--tokeniser", "uniform", "--variant", "spatio_temporal", "--schedule", "constant"],
        ["--variant", "factorised_self_attention", "--optimizer", "sgd", "--mixup", "0.2"],
    ],
    ids=["bf16", "grad-checkpointing", "uniform-tokeniser", "model3-sgd-mixup"],
)
def test_training_options_run(tmp_path, options):
    summary = run(
        tmp_path,
        "opt",
        *TINY,
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--synthetic-clips",
        "16",
        "--synthetic-val-clips",
        "8",
        "--log-every",
        "1",
        *options,
    )
    assert summary["finished"] and summary["val_clips"] == 8
    records = [json.loads(line) for line in (tmp_path / "opt" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "event" not in r]
    assert len(losses) == 2 and all(0.0 < loss < 10.0 for loss in losses)
