"""`torchrun --nproc_per_node=2 -m vivit.train` on CPU with gloo: replicas agree with each other
and with one process training on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from vivit import build_model, distributed
from vivit.checkpoint import load_checkpoint, load_model
from vivit.run.optim import seed_everything

ARGS = [
    "--dim",
    "32",
    "--depth",
    "2",
    "--heads",
    "2",
    "--tubelet",
    "2",
    "8",
    "8",
    "--steps",
    "3",
    "--batch-size",
    "8",
    "--synthetic-clips",
    "48",
    "--synthetic-val-clips",
    "8",
    "--optimizer",
    "sgd",
    "--lr",
    "0.1",
    "--label-smoothing",
    "0.1",
    "--log-every",
    "1",
    "--no-progress",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--dist-timeout",
    "120",
]


def test_an_unknown_device_or_strategy_is_named():
    with pytest.raises(
        ValueError, match=r"^distributed.setup: device must be one of 'auto', 'cpu', 'cuda', got 'tpu'$"
    ):
        distributed.setup("tpu")
    with pytest.raises(ValueError, match=r"^distributed.wrap: strategy must be one of 'ddp', 'fsdp', got 'zero'$"):
        distributed.wrap(torch.nn.Linear(2, 2), distributed.Context(), "zero")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process, the same global batch of 8."""
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, "-m", "vivit.train", *ARGS, "--output-dir", str(out)])
    return load_checkpoint(out / "checkpoint.pt")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path, single_process, strategy):
    multi = tmp_path / strategy
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
    ]
    fsdp = ["--fsdp"] if strategy == "fsdp" else []
    _run([*torchrun, "-m", "vivit.train", *ARGS, "--output-dir", str(multi), *fsdp])

    summary = json.loads((multi / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    if strategy == "ddp":
        assert summary["max_param_divergence_across_ranks"] == 0.0  # replicas bit-identical
        assert summary["val_clips"] == 8  # each held-out clip scored once over the two shards

    a, b = single_process, load_checkpoint(multi / "checkpoint.pt")
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    assert set(a["model"]) == set(b["model"]) and set(a["optimizer"]["state"]) == set(b["optimizer"]["state"])
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    seed_everything(0)
    init = build_model(a["model_spec"]).state_dict()
    assert max((a["model"][k] - init[k]).abs().max().item() for k in init) > 1e-3  # the steps did move the weights
    model, _ = load_model(str(multi / "checkpoint.pt"))  # a distributed checkpoint loads in one process

    # Only the main process writes: one metrics file, one checkpoint, no stray files.
    assert sorted(p.name for p in multi.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "summary.json"]
