"""The command-line tools (vivit-train, vivit-eval, vivit-predict) given a user's mistakes: each ends
with one line, `PROG: error: ...` naming the option or file, what it got and what was expected,
exit status 2 for a mistake in the command line or 1 for one found in an input's contents, and
never a traceback (unless --debug asks for one).

The entry points run as `python -m vivit.<tool>` would run them, in one subprocess for the whole
table of mistakes (runpy executes each module as __main__ with its own sys.argv): one Python
start-up instead of forty.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_checkpoint import write_code_running_checkpoint
from test_data import write_mp4
from test_train import TINY, run

from vivit.cli.train import build_parser, train

# Runs every case of a JSON table [[module, argv], ...] as `python -m module argv`, and prints
# [{"status", "stderr"}] as JSON: what the user would see on the terminal.
_DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys, traceback
    results = []
    for module, argv in json.load(open(sys.argv[1])):
        sys.argv = [module, *argv]
        err, status = io.StringIO(), 0
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                runpy.run_module(module, run_name="__main__")
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else (print(exit_.code, file=sys.stderr) or 1)
            except BaseException:
                traceback.print_exc()
                status = 1
        results.append({"status": status, "stderr": err.getvalue()})
    json.dump(results, sys.__stdout__)
    """
)

TRAIN, EVAL, PREDICT = "vivit.train", "vivit.evaluate", "vivit.predict"
PROGS = {TRAIN: "vivit-train", EVAL: "vivit-eval", PREDICT: "vivit-predict"}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The inputs the mistakes are made with: good and damaged checkpoints, videos, listings."""
    d = tmp_path_factory.mktemp("cli")
    one_step = [*TINY, "--steps", "1", "--batch-size", "8", "--synthetic-clips", "8", "--synthetic-val-clips", "0"]
    run(d, "builtin", *one_step)  # model 4, 8 frames of 32 px, the built-in data's 8 classes
    good = (d / "builtin" / "checkpoint.pt").read_bytes()
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    (d / "empty.pt").write_bytes(b"")
    write_code_running_checkpoint(d / "crafted.pt", d / "code-ran")

    for i in range(2):
        write_mp4(d / f"clip{i}.mp4", 12, seed=i)
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    (d / "notes.txt").write_text("not a video\n")
    (d / "empty.mp4").write_bytes(b"")
    (d / "videos.csv").write_text("clip0.mp4,jump\nclip1.mp4,run\n")
    (d / "unreadable.csv").write_text("corrupt.mp4,jump\nnotes.txt,run\n")
    (d / "unknown.csv").write_text("clip0.mp4,jump\nclip1.mp4,swim\n")
    videos = [
        "--train-csv",
        str(d / "videos.csv"),
        "--dim",
        "32",
        "--depth",
        "1",
        "--heads",
        "2",
        "--tubelet",
        "2",
        "16",
        "16",
        "--num-frames",
        "4",
        "--img-size",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--output-dir",
        str(d / "videos"),
    ]
    train(build_parser().parse_args(videos))  # a 2-class checkpoint
    try:
        import transformers

        config = transformers.VivitConfig(
            image_size=32,
            num_frames=8,
            tubelet_size=[2, 8, 8],
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
        transformers.VivitForVideoClassification(config).save_pretrained(d / "hf_vivit")
    except ImportError:
        pass
    return d


def cases(d) -> dict[str, tuple[str, list[str], int, str]]:
    """id -> (module, arguments, exit status, what the error line must say (a regex))."""
    out = str(d / "out")
    tiny = [
        *TINY,
        "--steps",
        "1",
        "--batch-size",
        "8",
        "--synthetic-clips",
        "8",
        "--synthetic-val-clips",
        "0",
        "--output-dir",
        out,
    ]
    ckpt, videos_ckpt = str(d / "builtin" / "checkpoint.pt"), str(d / "videos" / "checkpoint.pt")
    videos = [
        "--dim",
        "32",
        "--depth",
        "1",
        "--heads",
        "2",
        "--tubelet",
        "2",
        "16",
        "16",
        "--num-frames",
        "4",
        "--img-size",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--workers",
        "0",
        "--no-progress",
    ]
    table = {
        # vivit-train: options out of range or inconsistent
        "train-log-every-0": (TRAIN, [*tiny, "--log-every", "0"], 2, r"--log-every must be >= 1, got 0"),
        "train-accum-steps-0": (TRAIN, [*tiny, "--accum-steps", "0"], 2, r"--accum-steps must be >= 1, got 0"),
        "train-label-smoothing-1": (
            TRAIN,
            [*tiny, "--label-smoothing", "1"],
            2,
            r"--label-smoothing must be in \[0, 1\), got 1\.0",
        ),
        "train-std-0": (TRAIN, [*tiny, "--std", "0.2", "0", "0.2"], 2, r"--std must be > 0, got 0\.2 0\.0 0\.2"),
        "train-batch-not-multiple": (
            TRAIN,
            [*tiny, "--batch-size", "6", "--accum-steps", "4"],
            2,
            r"--batch-size 6 must be a positive multiple of processes x --accum-steps = 4",
        ),
        "train-odd-heads-model-4": (
            TRAIN,
            [*tiny, "--dim", "48", "--heads", "3"],
            2,
            r"splits the heads in half .*; --heads must be even, got 3",
        ),
        "train-img-size-below-patch": (
            TRAIN,
            [*tiny, "--img-size", "4"],
            2,
            r"--img-size \(4, 4\) is smaller than the patch \(8, 8\) of --tubelet \(2, 8, 8\)",
        ),
        "train-builtin-data-too-small": (
            TRAIN,
            [*tiny, "--img-size", "8", "--tubelet", "2", "4", "4"],
            2,
            r"--img-size 8: the built-in data .* size must be an int >= 16, got 8",
        ),
        "train-unknown-backend": (
            TRAIN,
            [*tiny, "--backend", "bogus"],
            2,
            r"--backend bogus: attention: backend must be one of 'auto', 'reference', .*, got 'bogus'$",
        ),
        "train-fp16-on-cpu": (
            TRAIN,
            [*tiny, "--precision", "fp16", "--device", "cpu"],
            2,
            r"--precision fp16 needs a GPU",
        ),
        "train-val-csv-alone": (TRAIN, [*tiny, "--val-csv", str(d / "videos.csv")], 2, r"--val-csv needs --train-csv"),
        "train-output-dir-is-a-file": (
            TRAIN,
            [*tiny, "--output-dir", str(d / "empty.pt")],
            2,
            r"--output-dir .*empty\.pt: exists and is not a directory",
        ),
        "train-missing-csv": (
            TRAIN,
            [*tiny, "--train-csv", str(d / "nope.csv")],
            2,
            r"--train-csv .*nope\.csv: no such file",
        ),
        # vivit-train: checkpoints
        "train-resume-missing": (
            TRAIN,
            [*tiny, "--resume", str(d / "nope.pt")],
            2,
            r"--resume .*nope\.pt: no such file",
        ),
        "train-resume-truncated": (
            TRAIN,
            [*tiny, "--resume", str(d / "truncated.pt")],
            1,
            r"--resume .*truncated\.pt: not a readable checkpoint \(truncated",
        ),
        "train-resume-empty": (
            TRAIN,
            [*tiny, "--resume", str(d / "empty.pt")],
            1,
            r"--resume .*empty\.pt: empty file, not a checkpoint",
        ),
        "train-resume-crafted": (
            TRAIN,
            [*tiny, "--resume", str(d / "crafted.pt")],
            1,
            r"--resume .*crafted\.pt: refers to posix\.system, which is not a tensor or plain data",
        ),
        "train-resume-other-width": (
            TRAIN,
            [*tiny, "--resume", ckpt, "--dim", "64"],
            2,
            r"--resume .*: the checkpoint's model differs from the arguments': --dim 32 vs 64 "
            r"\(checkpoint vs arguments\)",
        ),
        "train-resume-other-variant": (
            TRAIN,
            [*tiny, "--resume", ckpt, "--variant", "spatio_temporal"],
            2,
            r"--variant 'factorised_dot_product' vs 'spatio_temporal' \(checkpoint vs",
        ),
        "train-resume-other-classes": (
            TRAIN,
            [
                *videos,
                "--train-csv",
                str(d / "videos.csv"),
                "--output-dir",
                out,
                "--resume",
                ckpt,
                "--tubelet",
                "2",
                "8",
                "8",
                "--num-frames",
                "8",
            ],
            2,
            r"trained on 8 classes \(right-slow, .*\), but the training data has 2 classes "
            r"\(jump, run\)",
        ),
        "train-resume-other-optimizer": (
            TRAIN,
            [*tiny, "--resume", ckpt, "--optimizer", "sgd"],
            2,
            r"--optimizer sgd: --resume .* holds the state of adamw",
        ),
        "train-pretrained-crafted": (
            TRAIN,
            [*tiny, "--pretrained", str(d / "crafted.pt")],
            1,
            r"--pretrained .*crafted\.pt: refers to posix\.system",
        ),
        # vivit-train: videos
        "train-no-video-decodes": (
            TRAIN,
            [*videos, "--train-csv", str(d / "unreadable.csv"), "--output-dir", out],
            1,
            r"--train-csv .*unreadable\.csv: none of the 2 training videos tried could be "
            r"decoded \(first: .*\); nothing was trained and no checkpoint written",
        ),
        "train-unknown-label": (
            TRAIN,
            [*videos, "--train-csv", str(d / "videos.csv"), "--val-csv", str(d / "unknown.csv"), "--output-dir", out],
            1,
            r"unknown\.csv line 2: unknown label 'swim'",
        ),
        # vivit-eval
        "eval-checkpoint-missing": (
            EVAL,
            ["--checkpoint", str(d / "nope.pt")],
            2,
            r"--checkpoint .*nope\.pt: no such file",
        ),
        "eval-checkpoint-is-a-directory": (EVAL, ["--checkpoint", str(d)], 2, r"--checkpoint .*: is a directory"),
        "eval-checkpoint-truncated": (EVAL, ["--checkpoint", str(d / "truncated.pt")], 1, r"not a readable checkpoint"),
        "eval-checkpoint-crafted": (EVAL, ["--checkpoint", str(d / "crafted.pt")], 1, r"refers to posix\.system"),
        "eval-other-classes-than-the-data": (
            EVAL,
            ["--checkpoint", videos_ckpt],
            2,
            r"--checkpoint .* was trained on 2 classes \(jump, run\), not the built-in "
            r"data's 8: pass --csv",
        ),
        "eval-unknown-label": (
            EVAL,
            ["--checkpoint", videos_ckpt, "--csv", str(d / "unknown.csv")],
            1,
            r"unknown\.csv line 2: unknown label 'swim' \(known: jump, run\)",
        ),
        "eval-no-video-decodes": (
            EVAL,
            ["--checkpoint", videos_ckpt, "--csv", str(d / "unreadable.csv")],
            1,
            r"--csv .*unreadable\.csv: none of its 2 videos could be decoded",
        ),
        "eval-batch-size-0": (
            EVAL,
            ["--checkpoint", ckpt, "--batch-size", "0"],
            2,
            r"--batch-size must be >= 1, got 0",
        ),
        # vivit-predict
        "predict-video-missing": (
            PREDICT,
            [str(d / "nope.mp4"), "--checkpoint", videos_ckpt],
            2,
            r"video .*nope\.mp4: no such file",
        ),
        "predict-video-is-a-directory": (
            PREDICT,
            [str(d), "--checkpoint", videos_ckpt],
            2,
            r"video .*: not a file \(expected a video file\)",
        ),
        "predict-video-empty": (
            PREDICT,
            [str(d / "empty.mp4"), "--checkpoint", videos_ckpt],
            1,
            r"video .*empty\.mp4: empty file \(0 bytes\), not a video",
        ),
        "predict-not-a-video": (
            PREDICT,
            [str(d / "notes.txt"), "--checkpoint", videos_ckpt],
            1,
            r"video .*notes\.txt: cannot be decoded \(InvalidDataError",
        ),
        "predict-corrupt-video": (
            PREDICT,
            [str(d / "corrupt.mp4"), "--checkpoint", videos_ckpt],
            1,
            r"video .*corrupt\.mp4: cannot be decoded",
        ),
        "predict-temporal-views-0": (
            PREDICT,
            [str(d / "clip0.mp4"), "--checkpoint", videos_ckpt, "--temporal-views", "0"],
            2,
            r"--temporal-views must be >= 1, got 0",
        ),
        "predict-checkpoint-crafted": (
            PREDICT,
            [str(d / "clip0.mp4"), "--checkpoint", str(d / "crafted.pt")],
            1,
            r"--checkpoint .*crafted\.pt: refers to posix\.system",
        ),
        "train-pretrained-video-model-of-another-variant": (
            TRAIN,
            [*tiny, "--pretrained", str(d / "hf_vivit")],
            2,
            r"--pretrained .*hf_vivit is a video model other than the arguments': --variant 'spatio_temporal' vs "
            r"'factorised_dot_product', --mlp-ratio 2.0 vs 4.0 \(checkpoint vs arguments\); pass its options",
        ),
        "train-device-cuda-without-gpu": (
            TRAIN,
            [*tiny, "--device", "cuda"],
            2,
            r"--device cuda: no CUDA device is available here",
        ),
    }
    return table


def _cannot_run(case: str, d: Path) -> str | None:
    if case == "train-pretrained-video-model-of-another-variant" and not (d / "hf_vivit").is_dir():
        return "needs transformers to write the Hugging Face ViViT"
    if case == "train-device-cuda-without-gpu" and torch.cuda.is_available():
        return "this machine has a CUDA device"
    return None


CASE_IDS = sorted(cases(Path("files")))


@pytest.fixture(scope="module")
def outcomes(files):
    """{id: {"status", "stderr"}} of every case, run in one subprocess."""
    table = cases(files)
    ids = [case for case in sorted(table) if _cannot_run(case, files) is None]
    (files / "cases.json").write_text(json.dumps([[table[i][0], table[i][1]] for i in ids]))
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(files / "cases.json")],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=files,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(zip(ids, json.loads(proc.stdout)))


@pytest.mark.parametrize("case", CASE_IDS)
def test_a_mistake_ends_in_one_line(files, outcomes, case):
    module, _, status, says = cases(files)[case]
    if case not in outcomes:
        pytest.skip(_cannot_run(case, files))
    result = outcomes[case]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{PROGS[module]}: error: ")]
    assert "Traceback" not in result["stderr"] and len(errors) == 1 and errors[0] == lines[-1], result["stderr"][-3000:]
    assert result["status"] == status
    assert re.search(says, errors[0]), errors[0]


def test_nothing_ran_and_nothing_was_written(files, outcomes):
    """The crafted checkpoints' os.system call never ran; the run over unreadable videos (and every
    other failed run) wrote no checkpoint."""
    assert not (files / "code-ran").exists()
    assert not (files / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_the_entry_point_itself(tmp_path, debug):
    """`python -m vivit.train` as a user types it: exit status 2 and one line, or with --debug the traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            TRAIN,
            "--log-every",
            "0",
            "--output-dir",
            str(tmp_path),
            *(["--debug"] if debug else []),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode != 0 and ("Traceback" in proc.stderr) == debug, proc.stderr[-3000:]
    if not debug:
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == "vivit-train: error: --log-every must be >= 1, got 0"
