"""The child-process probe: CPU peak memory and bytes saved for backward of one case, measured in a
fresh process forked from a small server.

    python -m benchmarks.probe --serve     # one JSON spec per stdin line -> one JSON reply per stdout line
    python -m benchmarks.probe SPEC_JSON   # one spec, measured in this process

`benchmarks.core.probe_in_child` starts the server (with a fixed glibc mmap threshold, so freed
tensors go back to the kernel and cannot hide inside the heap) and sends it specs. Each child
builds its case with the registry's builder, warms it up once, and reports `cpu_peak_in_process`
and `saved_bytes`. A budget search of the memory case (spec["peak"] = "budget") runs
`memory.search_in_process` instead, above the child's footprint before the model was built.
`python -m benchmarks.measure` is the same command.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback

import torch

from vivit_kernels import _extension

from .core import cpu_peak_in_process, status_kib
from .memory import search_in_process
from .registry import build


def probe(spec: dict) -> dict:
    """What the parent asks of a child: {"peak_bytes", "saved_bytes"} of the case, or the result of
    a budget search."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("peak") == "budget":
        # The C++ kernels are loaded before the footprint is taken: code, not what a step allocates.
        with contextlib.suppress(RuntimeError):
            _extension.load()
        return search_in_process(spec, footprint_kib=status_kib("VmRSS"))
    case = build(spec)
    case.setup()
    case.run()  # warm-up: one-off allocations and caches are not the call's peak
    peak = cpu_peak_in_process(case) if case.device.type == "cpu" else None
    return {"peak_bytes": peak, "saved_bytes": case.saved_bytes()}


def serve() -> None:
    """One JSON spec per stdin line -> one JSON reply per stdout line, each measured in a forked child."""
    for line in sys.stdin:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                reply = probe(json.loads(line))
            except BaseException:
                reply = {"error": traceback.format_exc()}
            os.write(write_end, (json.dumps(reply) + "\n").encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read().decode().strip()
        _, status = os.waitpid(pid, 0)
        sys.stdout.write((data or json.dumps({"error": f"the child died (wait status {status})"})) + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:
        serve()
    else:  # one spec, measured in this process
        print(json.dumps(probe(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
