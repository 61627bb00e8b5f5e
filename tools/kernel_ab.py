"""Two versions of the C++ short-group kernels (temporal attention's forward and backward,
csrc/block_math.cpp) timed against each other in one process.

    python tools/kernel_ab.py [--base REV] [--frames 8,16] [--rounds 25] [--positions 196]
                              [--allow-loaded]

Side a is csrc/ at REV (HEAD by default), side b the working tree's csrc/. Each side's
block_math.cpp is compiled as the library compiles it, in a namespace of its own, and linked with
tools/kernel_ab.cpp into one program that runs attention.cpp's loop over temporal groups on each
side: one clip, 12 heads of 64, time-major, the caches flushed before every call; process CPU
time, minimum over rounds, the sides taking turns. Printed per frame count: each side's forward
and backward, b's time over a's, and the largest difference between the sides' outputs and
gradients (0 where b computes the same in the same order).

Why one process: on a shared machine, separate runs of the same build differ by 10% and more
(what a neighbour does, where the allocator put the clip), more than most kernel changes; with the
same build on both sides, the two interleaved in one process agree within 2%. What the library's
users pay is measured by `python -m benchmarks.cpu_ratios`; this tool is for deciding between two
versions of a kernel.

A 1-min load average at or above the core count is refused (exit status 2) unless --allow-loaded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tools" / "kernel_ab.cpp"
KERNELS = "block_math.cpp"
# As vivit_kernels/_extension.py builds the library (its CFLAGS, C++20 as torch's extensions).
CFLAGS = ("-std=c++20", "-O3", "-fopenmp")
HEADS, HEAD_DIM = 12, 64


class Refused(Exception):
    """A user mistake or a machine that cannot run this: one line, exit status 2."""


def torch_paths() -> tuple[list[str], Path]:
    """The compiler's include flags for torch's headers, and the directory of its libraries."""
    import torch

    root = Path(torch.__file__).parent
    headers = (root / "include", root / "include" / "torch" / "csrc" / "api" / "include")
    return [f"-isystem{p}" for p in headers], root / "lib"


def export_csrc(rev: str, into: Path) -> None:
    """csrc/ as of `rev` into `into`."""
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True, text=True
    )
    if found.returncode != 0:
        raise Refused(f"kernel_ab: no commit '{rev}' in this repository (expected a revision git knows, e.g. HEAD~1)")
    archive = subprocess.run(["git", "archive", found.stdout.strip(), "csrc"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        raise Refused(f"kernel_ab: '{rev}' has no csrc/ (expected a revision with the C++ kernels)")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")


def compile_program(side_a: Path, side_b: Path, build: Path) -> Path:
    """The program, from side a's and side b's csrc/ directories."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise Refused("kernel_ab: no C++ compiler (c++ or $CXX) on PATH; it builds the kernels as the library does")
    includes, libdir = torch_paths()

    def job(source: Path, obj: str, *flags: str) -> list[str]:
        return [compiler, *CFLAGS, *includes, *flags, "-c", str(source), "-o", str(build / obj)]

    jobs = [job(DRIVER, "main.o", "-DKERNEL_AB_MAIN")]
    for side, csrc in (("a", side_a), ("b", side_b)):
        names = (f"-Dvivit_kernels=vivit_kernels_{side}", f"-I{csrc}")
        jobs.append(job(csrc / KERNELS, f"kernels_{side}.o", *names))
        jobs.append(job(DRIVER, f"loops_{side}.o", *names, f"-DKERNEL_AB_SIDE={side}"))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for job, done in zip(jobs, pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs)):
            if done.returncode != 0:
                raise Refused(f"kernel_ab: compiling {job[-3]} failed:\n{done.stderr[-3000:]}")
    program = build / "kernel_ab"
    link = subprocess.run(
        [
            compiler,
            *sorted(str(o) for o in build.glob("*.o")),
            "-fopenmp",
            f"-L{libdir}",
            "-lc10",
            "-ltorch_cpu",
            f"-Wl,-rpath,{libdir}",
            "-o",
            str(program),
        ],
        capture_output=True,
        text=True,
    )
    if link.returncode != 0:
        raise Refused(f"kernel_ab: linking failed:\n{link.stderr[-3000:]}")
    return program


def measure(program: Path, frames: int, positions: int, rounds: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [str(program), str(frames), str(positions), str(HEADS), str(HEAD_DIM), str(rounds)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise Refused(f"kernel_ab: the program failed at T = {frames} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    fa, ba, fb, bb, dout, dgrad = (float(x) for x in done.stdout.split())
    return {"frames": frames, "a": (fa, ba), "b": (fb, bb), "out_difference": dout, "grad_difference": dgrad}


def table(rows: list[dict], base: str) -> str:
    lines = [
        f"a: csrc/ at {base}; b: the working tree's csrc/. ms, process CPU time, min over rounds",
        "| T | a forward | a backward | b forward | b backward | b / a | max abs difference (out, grads) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (fa, ba), (fb, bb) = r["a"], r["b"]
        lines.append(
            f"| {r['frames']} | {fa:.3f} | {ba:.3f} | {fb:.3f} | {bb:.3f} | {(fb + bb) / (fa + ba):.3f} "
            f"| {r['out_difference']:.2g}, {r['grad_difference']:.2g} |"
        )
    return "\n".join(lines)


def _frames(text: str) -> list[int]:
    try:
        frames = [int(x) for x in text.split(",")]
    except ValueError:
        frames = []
    if not frames or any(not 1 <= t <= 32 for t in frames):
        raise argparse.ArgumentTypeError(
            f"expected frame counts from 1 to 32 (the short groups), e.g. 8,16; got '{text}'"
        )
    return frames


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/kernel_ab.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="side a: csrc/ at this revision (default HEAD)")
    parser.add_argument("--frames", type=_frames, default=[8, 16], help="group lengths, comma-separated (default 8,16)")
    parser.add_argument("--positions", type=_positive, default=196, help="groups of a head (default 196)")
    parser.add_argument("--rounds", type=_positive, default=25, help="rounds per side (default 25)")
    parser.add_argument(
        "--allow-loaded", action="store_true", help="measure at a load average at or above the core count"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        print(f"load average {load:.2f} ({cores} cores)")
        if load >= cores and not args.allow_loaded:
            raise Refused(
                f"kernel_ab: load average {load:.2f} at or above the {cores} cores: ratios taken now would "
                "be the neighbours' (--allow-loaded to measure anyway)"
            )
        with tempfile.TemporaryDirectory(prefix="kernel_ab_") as scratch:
            scratch = Path(scratch)
            export_csrc(args.base, scratch / "a")
            program = compile_program(scratch / "a" / "csrc", ROOT / "csrc", scratch)
            rows = [measure(program, t, args.positions, args.rounds) for t in args.frames]
    except Refused as error:
        print(error, file=sys.stderr)
        return 2
    print(table(rows, args.base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
