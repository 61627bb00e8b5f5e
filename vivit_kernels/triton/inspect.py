"""`python -m vivit_kernels.triton.inspect`: compile every Triton kernel for sm_80 and sm_90, no GPU needed.

The interpreter runs the kernels' arithmetic but not the GPU compiler, so it cannot see tl.dot
shape rules, register pressure or shared memory. This tool compiles each `CompileSpec` of
`specs.py` (every kernel x autotune config x dtype x static variant) with `triton.compile(..., target=GPUTarget("cuda", cc, 32))` and reads the cubin with the
`cuobjdump` shipped in Triton's NVIDIA backend: registers, stack, spill instructions (LDL/STL
in the SASS) and tensor-core instructions (HMMA on sm_80, HGMMA on sm_90).

Compiles run the real (non-interpreted) code path: TRITON_INTERPRET is forced off in this
process and its workers (see `vivit_kernels.triton.interpreted`), and the specs set the bf16
dot-upcast switch off.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before triton is imported here; workers inherit it. Only when run as the tool: importing
    # this module (e.g. for SHARED_LIMIT) must not switch an interpreting process to the GPU path.
    os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

ARCHS = (80, 90)
# Shared memory a block may use (opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Row:
    module: str
    name: str
    dtype: str
    arch: int
    autotune_candidate: bool
    registers: int | None = None
    stack: int | None = None
    shared: int | None = None
    spill_loads: int | None = None  # LDL instructions
    spill_stores: int | None = None  # STL instructions
    hmma: int | None = None  # mma.sync tensor-core instructions (sm_80; sm_90 with fewer than 4 warps)
    hgmma: int | None = None  # warpgroup tensor-core instructions (sm_90)
    tensor_core: int | None = None  # hmma + hgmma
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.spill_loads or self.spill_stores)


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(text: str, function: str) -> tuple[int, int]:
    match = re.search(rf"Function {re.escape(function)}:\s*\n\s*REG:(\d+) STACK:(\d+)", text)
    if match is None:
        raise RuntimeError(f"no resource usage for {function} in cuobjdump output")
    return int(match.group(1)), int(match.group(2))


def compile_one(index: int, arch: int) -> Row:
    """Compile spec number `index` of `specs.compile_specs()` for sm_<arch> and read its cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vivit_kernels.triton.specs import compile_specs

    spec = compile_specs()[index]
    row = Row(spec.name.split("_", 1)[0], spec.name, spec.dtype, arch, spec.autotune_candidate)
    try:
        kernel = triton.compile(
            ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            dump = [cuobjdump(), "--dump-resource-usage", path]
            usage = subprocess.run(dump, capture_output=True, text=True, check=True)
            sass = subprocess.run([cuobjdump(), "--dump-sass", path], capture_output=True, text=True, check=True).stdout
        row.registers, row.stack = _resource_usage(usage.stdout, kernel.metadata.name)
        row.shared = kernel.metadata.shared
        row.spill_loads = len(re.findall(r"\bLDL(?:\.\w+)*\b", sass))
        row.spill_stores = len(re.findall(r"\bSTL(?:\.\w+)*\b", sass))
        row.hmma = len(re.findall(r"\bHMMA\.", sass))
        row.hgmma = len(re.findall(r"\bHGMMA\.", sass))
        row.tensor_core = row.hmma + row.hgmma
    except Exception as exc:  # reported in the table; the caller decides whether it fails
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return row


def inspect(name_filter: str = "", archs=ARCHS, dtypes=None, jobs: int = 2, candidates_only: bool = False) -> list[Row]:
    """Compile every matching spec for every arch in a pool of `jobs` processes."""
    from vivit_kernels.triton.specs import compile_specs

    work = []
    for index, spec in enumerate(compile_specs()):
        if name_filter and not re.search(name_filter, spec.name):
            continue
        if dtypes and spec.dtype not in dtypes:
            continue
        if candidates_only and not spec.autotune_candidate:
            continue
        work += [(index, arch) for arch in archs]
    if jobs <= 1:
        return [compile_one(*w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, *zip(*work))) if work else []


def format_table(rows: list[Row]) -> str:
    header = (
        f"{'kernel':<84} {'sm':>3} {'regs':>5} {'stack':>6} {'smem KiB':>9} {'LDL':>5} {'STL':>5} "
        f"{'HMMA':>5} {'HGMMA':>5}  tuner"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.error:
            lines.append(f"{r.name:<84} {r.arch:>3}  FAILED: {r.error}")
            continue
        over = " smem>limit" if r.shared > SHARED_LIMIT[r.arch] else ""
        lines.append(
            f"{r.name:<84} {r.arch:>3} {r.registers:>5} {r.stack:>6} {r.shared / 1024:>9.1f} {r.spill_loads:>5} "
            f"{r.spill_stores:>5} {r.hmma:>5} {r.hgmma:>5}  {'yes' if r.autotune_candidate else 'no'}{over}"
        )
    lines.append("LDL/STL: spill instructions; HMMA/HGMMA: tensor-core instructions; tuner: may the autotuner pick it")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="", help="regex on the spec name, e.g. 'attention_fwd.*fp16'")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--dtype", nargs="+", default=None, choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--candidates", action="store_true", help="only configs the autotuner may pick")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of a table")
    args = parser.parse_args(argv)
    rows = inspect(args.filter, args.arch, args.dtype, args.jobs, args.candidates)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        print(format_table(rows))
    failed = [r for r in rows if r.error]
    bad = [r for r in rows if not r.error and r.autotune_candidate and (r.spills or r.shared > SHARED_LIMIT[r.arch])]
    for r in bad:
        print(f"autotune candidate spills or exceeds shared memory: {r.name} sm_{r.arch}", file=sys.stderr)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
