"""`python -m vivit_kernels.triton.inspect`: compile every Triton kernel as a real launch would, for
sm_80, sm_86, sm_89 and sm_90, without a GPU.

The launchers run on CPU tensors of real shapes (attention: ViViT-B, 2 x 16 x 196 tokens, 12 heads
read from a packed qkv, in split mode with and without a class token, every dtype and inspected
head dim; tubelet: a ViViT-B clip) with Triton's launch replaced by a recorder. Each recorded
launch is bound again by the launcher's own binder for each target (what `JITFunction.run` does
before it compiles), which gives the specialisation a GPU launch gets: pointers known 16-byte
aligned, integer arguments divisible by 16 marked, integers equal to 1 made constants. So the
inspected code is the launched code: 128-bit and asynchronous (cp.async) loads included. Every
autotune config of an autotuned launch is compiled, and marked as a candidate when the pruner
keeps it on that architecture (limits.py, which `--write-limits` rewrites from these compiles).

The cubin is read with the `cuobjdump` shipped in Triton's NVIDIA backend: registers, stack,
spill instructions (LDL/STL), tensor-core instructions (HMMA; HGMMA on sm_90), and from the PTX
the asynchronous and 128-bit global loads. The tool exits non-zero when a compile fails or a
candidate spills or needs more shared memory than the architecture gives a block.

Everything (every architecture, dtype, head dim and config) takes about an hour on 2 cores;
`--arch`, `--dtype`, `--head-dims`, `--kernels`, `--candidates` and `--filter` narrow it (one
architecture's candidates at one dtype and head dim take about a minute). Before compiling, the
tool says on stderr how many compiles it will make and roughly how long they take (`--plan`: only
that), then shows them done: a bar on a terminal, else a `[k/n] sm_XX kernel[...]` line each.

Compiles need the real (non-interpreted) code path: in a process whose kernels are interpreted
(no CUDA device) the tool runs itself again with TRITON_INTERPRET=0 (see
`vivit_kernels.triton.interpreted`), before triton is imported.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

ARCHS = (80, 86, 89, 90)
# Shared memory a block may use (opt-in maximum): A100 (sm_80) 163 KiB; the consumer GPUs users
# own, RTX 30xx (sm_86) and RTX 40xx / L4 (sm_89), 99 KiB; H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255  # per thread, on every architecture here
DTYPES = ("fp32", "fp16", "bf16")
# Head dims of the models users run (ViT-S/B 64, ViT-H 80, ...), ragged ones included: the head
# dim is a compile-time constant, so each is its own kernel.
HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128)
# ViViT-B attention (batch 2 keeps the CPU tensors small; the batch only changes the grid).
ATTENTION_SHAPE = dict(B=2, T=16, S=196, H=12)
TUBELET_SHAPE = dict(B=2, C=3, T=32, H=224, W=224, t=2, h=16, w=16, D=768)


@dataclass
class Row:
    launch: str  # what was launched, e.g. "attention fp16 Dh=64 P=1"
    name: str  # kernel[constexprs, warps, stages]
    kernel: str
    dtype: str
    head_dim: int | None
    prefix: bool
    config: str  # the autotune candidate (limits.py key), or "" for a kernel without autotuning
    arch: int
    autotune_candidate: bool
    registers: int | None = None
    stack: int | None = None
    shared: int | None = None
    spill_loads: int | None = None  # LDL instructions
    spill_stores: int | None = None  # STL instructions
    hmma: int | None = None  # mma.sync tensor-core instructions
    hgmma: int | None = None  # warpgroup tensor-core instructions (sm_90)
    tensor_core: int | None = None  # hmma + hgmma
    async_copies: int | None = None  # cp.async in the PTX
    vector_loads: int | None = None  # ld.global.v4 (and .v2) in the PTX
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.spill_loads or self.spill_stores)

    @property
    def over_shared(self) -> bool:
        return self.shared is not None and self.shared > SHARED_LIMIT[self.arch]

    @property
    def clean(self) -> bool:
        return not self.error and not self.spills and not self.over_shared


# ---------------------------------------------------------------------------------------------
# Recording the launches.


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the JIT function, its arguments, and the autotuner."""

    label: str
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict
    autotuner: object | None = None
    meta: dict = field(default_factory=dict)


@contextmanager
def _recording(launches: list[Launch], label: str, meta: dict):
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def autotuned(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(Launch(label, self.fn, args, kwargs, self, meta))

    def plain(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(Launch(label, self, args, kwargs, None, meta))

    saved = Autotuner.run, JITFunction.run
    Autotuner.run, JITFunction.run = autotuned, plain
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run = saved


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def record(kernels: str = "all", dtypes=DTYPES, head_dims=HEAD_DIMS) -> list[Launch]:
    """Run the launchers at the inspected shapes with Triton's launch replaced by a recorder."""
    import torch

    from vivit_kernels.triton import attention, tubelet

    # torch.empty: no kernel runs, so no value is read, and zeroing gigabytes of inputs would cost
    # seconds in every process that records.

    launches: list[Launch] = []
    for dtype in dtypes:
        if kernels in ("all", "attention"):
            B, T, S, H = (ATTENTION_SHAPE[k] for k in ("B", "T", "S", "H"))
            for head_dim in head_dims:
                for prefix in (0, 1):
                    qkv = torch.empty(B, prefix + T * S, 3, H, head_dim, dtype=_torch_dtype(dtype))
                    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                    label = f"attention {dtype} Dh={head_dim} P={prefix}"
                    meta = dict(dtype=dtype, head_dim=head_dim, prefix=bool(prefix))
                    with _recording(launches, label, meta):
                        saved = attention.forward(q, k, v, T, prefix, "time_major", "split", head_dim**-0.5)
                        attention.backward(
                            torch.empty_like(q), q, k, v, *saved, T, prefix, "time_major", "split", head_dim**-0.5
                        )
        if kernels in ("all", "tubelet"):
            s = TUBELET_SHAPE
            video = torch.empty(s["B"], s["C"], s["T"], s["H"], s["W"], dtype=_torch_dtype(dtype))
            weight = torch.empty(s["D"], s["C"], s["t"], s["h"], s["w"], dtype=video.dtype)
            bias = torch.empty(s["D"], dtype=video.dtype)
            tokens = (s["T"] // s["t"]) * (s["H"] // s["h"]) * (s["W"] // s["w"])
            pos = torch.empty(tokens, s["D"], dtype=video.dtype)
            grad = torch.empty(s["B"], s["T"] // s["t"], tokens // (s["T"] // s["t"]), s["D"], dtype=video.dtype)
            meta = dict(dtype=dtype, head_dim=None, prefix=False)
            with _recording(launches, f"tubelet {dtype}", meta):
                tubelet.forward(video, weight, bias, pos)
                tubelet.backward_video(grad, video, weight)
                tubelet.backward_weight(grad, video, weight, True)
                tubelet.backward_pos(grad)
    return launches


# ---------------------------------------------------------------------------------------------
# Compiling one recorded launch for one target.


@dataclass(frozen=True)
class Job:
    launch: int  # index into the recorded launches
    config: int | None  # index into the autotuner's configs
    arch: int


def _config_name(launch: Launch, config) -> str:
    from vivit_kernels.triton import attention

    kernel = {"_attention_fwd": "fwd", "_attention_bwd_dkdv": "dkdv", "_attention_bwd_dq": "dq"}.get(launch.fn.__name__)
    return attention.config_key(kernel, config) if kernel and config is not None else ""


def _is_candidate(launch: Launch, config, arch: int) -> bool:
    """Would the launch's pruner keep `config` on sm_`arch`?"""
    if launch.autotuner is None:
        return True
    from vivit_kernels.triton import common

    common.inspected_arch = arch
    try:
        nargs = dict(zip(launch.autotuner.arg_names, launch.args))
        prune = launch.autotuner.early_config_prune
        kept = prune(launch.autotuner.configs, nargs, **launch.kwargs) if prune else launch.autotuner.configs
    finally:
        common.inspected_arch = None
    return any(c is config for c in kept)


_BINDERS: dict[tuple[int, int], tuple] = {}  # (id of the JIT function, arch) -> (target, backend, binder)


def _bind(launch: Launch, config, arch: int):
    """(ASTSource, options) of the launch with `config`, specialised as sm_`arch`'s launch would be."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    # What JITFunction.run adds before it binds.
    kwargs = {**launch.kwargs, "debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode}
    if config is not None:
        kwargs.update(config.all_kwargs())
    key = (id(fn), arch)
    if key not in _BINDERS:  # building a binder costs half of planning a run
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        _BINDERS[key] = target, backend, create_function_from_signature(fn.signature, fn.params, backend)
    target, backend, binder = _BINDERS[key]
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options, target


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(text: str, function: str) -> tuple[int, int]:
    match = re.search(rf"Function {re.escape(function)}:\s*\n\s*REG:(\d+) STACK:(\d+)", text)
    if match is None:
        raise RuntimeError(f"no resource usage for {function} in cuobjdump output")
    return int(match.group(1)), int(match.group(2))


_LAUNCHES: list[Launch] | None = None


def _init_worker(kernels: str, dtypes, head_dims) -> None:
    global _LAUNCHES
    _LAUNCHES = record(kernels, dtypes, head_dims)


def _describe(job: Job) -> tuple[Launch, object, str, str, dict]:
    """(launch, config, kernel name, row name, constexprs) of a job."""
    launch = _LAUNCHES[job.launch]
    config = launch.autotuner.configs[job.config] if job.config is not None else None
    constexprs = {k: v for k, v in {**launch.kwargs, **(config.kwargs if config else {})}.items() if k.isupper()}
    warps = config.num_warps if config else launch.kwargs.get("num_warps", 4)
    stages = config.num_stages if config else launch.kwargs.get("num_stages", 3)
    text = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k != "UPCAST")
    kernel = launch.fn.__name__.lstrip("_").removesuffix("_kernel")
    return (
        launch,
        config,
        kernel,
        f"{kernel}[{launch.meta['dtype']}, {text}, warps={warps}, stages={stages}]",
        constexprs,
    )


def compile_job(job: Job) -> Row:
    """Compile one recorded launch with one config for one target and read its cubin and PTX."""
    import triton

    launch, config, kernel, name, constexprs = _describe(job)
    row = Row(
        launch=launch.label,
        name=name,
        kernel=kernel,
        dtype=launch.meta["dtype"],
        head_dim=launch.meta["head_dim"],
        prefix=bool(constexprs.get("PREFIX", False)),
        config=_config_name(launch, config),
        arch=job.arch,
        autotune_candidate=_is_candidate(launch, config, job.arch),
    )
    try:
        source, options, target = _bind(launch, config, job.arch)
        compiled = triton.compile(source, target=target, options=options.__dict__)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run(
                [cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True
            )
            sass = subprocess.run([cuobjdump(), "--dump-sass", path], capture_output=True, text=True, check=True).stdout
        ptx = compiled.asm["ptx"]
        row.registers, row.stack = _resource_usage(usage.stdout, compiled.metadata.name)
        row.shared = compiled.metadata.shared
        row.spill_loads = len(re.findall(r"\bLDL(?:\.\w+)*\b", sass))
        row.spill_stores = len(re.findall(r"\bSTL(?:\.\w+)*\b", sass))
        row.hmma = len(re.findall(r"\bHMMA\.", sass))
        row.hgmma = len(re.findall(r"\bHGMMA\.", sass))
        row.tensor_core = row.hmma + row.hgmma
        row.async_copies = len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", ptx))
        row.vector_loads = len(re.findall(r"\bld\.global(?:\.\w+)*\.v[24]\b", ptx))
    except Exception as exc:  # reported in the table; the caller decides whether it fails
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return row


def _compile_key(launch: Launch, config, arch: int) -> tuple:
    """What decides the compiled code: two launches with the same key compile to the same kernel."""
    source, options, _ = _bind(launch, config, arch)
    return (
        launch.fn.__name__,
        str(source.signature),
        str(sorted(source.constants.items())),
        str(sorted(source.attrs.items())),
        str(sorted(options.__dict__.items())),
        arch,
    )


def plan(
    name_filter: str = "",
    archs=ARCHS,
    dtypes=DTYPES,
    head_dims=HEAD_DIMS,
    kernels: str = "all",
    candidates_only: bool = False,
) -> list[Job]:
    """The compiles of an inspection: the launches recorded (in this process, for `compile_job`),
    then each distinct (kernel, config, specialisation, arch) once."""
    _init_worker(kernels, dtypes, head_dims)
    work, seen = [], set()
    for index, launch in enumerate(_LAUNCHES):
        configs = list(enumerate(launch.autotuner.configs)) if launch.autotuner else [(None, None)]
        for arch in archs:
            for config_index, config in configs:
                if candidates_only and not _is_candidate(launch, config, arch):
                    continue
                key = _compile_key(launch, config, arch)
                if key in seen:
                    continue
                seen.add(key)
                work.append(Job(index, config_index, arch))
    if name_filter:
        work = [j for j in work if re.search(name_filter, _describe(j)[3])]
    return work


def _problem(row: Row) -> str:
    """Why `row` fails the inspection ("" when it passes), as `failures` counts it."""
    if row.error:
        return "FAILED"
    if row.autotune_candidate and (row.spills or row.over_shared):
        return "autotune candidate " + ("spills" if row.spills else "over the shared memory limit")
    return ""


class _Progress:
    """Compiles done, on stderr: a bar on a terminal (tqdm, when installed), else a line per compile."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.bar = total, 0, None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc="inspect", unit="compile", file=sys.stderr, dynamic_ncols=True)

    def update(self, row: Row) -> None:
        self.done += 1
        problem = _problem(row)
        if self.bar is None:
            print(
                f"[{self.done}/{self.total}] sm_{row.arch} {row.name}" + (f": {problem}" if problem else ""),
                file=sys.stderr,
                flush=True,
            )
            return
        if problem:
            self.bar.write(f"sm_{row.arch} {row.name}: {problem}", file=sys.stderr)
        self.bar.set_postfix_str(f"sm_{row.arch} {row.kernel} {row.dtype}", refresh=False)
        self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def compile_all(
    work: list[Job], kernels: str = "all", dtypes=DTYPES, head_dims=HEAD_DIMS, jobs: int = 2, progress: bool = False
) -> list[Row]:
    """Compile `plan`'s jobs (planned with these kernels, dtypes and head dims) in `jobs`
    processes; rows in the order of `work`. `progress`: show the compiles done on stderr."""
    rows: list[Row | None] = [None] * len(work)
    shown = _Progress(len(work)) if progress else None
    try:
        if jobs <= 1 or len(work) <= 1:
            for i, job in enumerate(work):
                rows[i] = compile_job(job)
                if shown:
                    shown.update(rows[i])
            return rows
        # Spawned, not forked: a fork of a process whose OpenMP threads ran (the recording) can hang.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_init_worker, initargs=(kernels, dtypes, head_dims)
        ) as pool:
            index = {pool.submit(compile_job, job): i for i, job in enumerate(work)}
            for future in as_completed(index):
                rows[index[future]] = future.result()
                if shown:
                    shown.update(rows[index[future]])
        return rows
    finally:
        if shown:
            shown.close()


def inspect(
    name_filter: str = "",
    archs=ARCHS,
    dtypes=DTYPES,
    head_dims=HEAD_DIMS,
    kernels: str = "all",
    jobs: int = 2,
    candidates_only: bool = False,
    progress: bool = False,
) -> list[Row]:
    """Record the launches, then compile each distinct (kernel, config, specialisation, arch) once."""
    work = plan(name_filter, archs, dtypes, head_dims, kernels, candidates_only)
    return compile_all(work, kernels, dtypes, head_dims, jobs, progress)


# For the estimate printed before a run. Seconds of one core per compile with Triton's cache cold,
# timed on a 2-core x86 machine: 0.6 (tubelet) to 2.5 (fp32 attention). A warm cache (a second
# run) halves it.
SECONDS_PER_COMPILE = 2.0
STARTUP_SECONDS = 10.0  # a compile process starting: importing torch and triton, recording


def estimate(compiles: int, jobs: int) -> float:
    """Rough wall-clock seconds of `compiles` compiles in `jobs` processes."""
    if not compiles:
        return 0.0
    parallel = max(1, min(jobs, compiles, os.cpu_count() or 1))
    return STARTUP_SECONDS + compiles * SECONDS_PER_COMPILE / parallel


def duration(seconds: float) -> str:
    """'40 s', '3 min', '1 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def scope(archs, dtypes, head_dims, kernels: str, candidates_only: bool, name_filter: str) -> str:
    """What a run compiles, in words: 'attention kernels; sm_86; fp16; head dim 64; autotune candidates'."""
    parts = [f"{kernels} kernels" if kernels != "all" else "every kernel"]
    parts.append(", ".join(f"sm_{a}" for a in archs))
    parts.append(", ".join(dtypes))
    if kernels != "tubelet":
        parts.append(f"head dim{'s' if len(head_dims) > 1 else ''} {', '.join(map(str, head_dims))}")
    parts.append("autotune candidates" if candidates_only else "every config")
    if name_filter:
        parts.append(f"--filter {name_filter!r}")
    return "; ".join(parts)


NARROW = (
    f"--arch {{{','.join(map(str, ARCHS))}}}, --dtype {{{','.join(DTYPES)}}}, --head-dims N..., "
    "--kernels {attention,tubelet}, --candidates (the configs the autotuner may pick), --filter REGEX"
)


# ---------------------------------------------------------------------------------------------
# Limits from the compiles.


def limits_from(rows: list[Row]) -> tuple[dict, dict]:
    """LIMITS entries for limits.py from these compiles: per candidate, dtype width and prefix
    variant, per arch, the largest head dim up to which every inspected head dim compiled clean;
    and per variant and arch the compiles it rests on (SOURCES)."""
    from vivit_kernels.triton.limits import variant

    by_key: dict[str, dict[str, dict[int, dict[int, bool]]]] = {}
    seen: dict[str, dict[int, tuple[set, set]]] = {}
    for r in rows:
        if not r.config:
            continue
        name = variant(4 if r.dtype == "fp32" else 2, r.prefix)
        clean = by_key.setdefault(r.config, {}).setdefault(name, {}).setdefault(r.arch, {})
        clean[r.head_dim] = clean.get(r.head_dim, True) and r.clean
        dtypes, head_dims = seen.setdefault(name, {}).setdefault(r.arch, (set(), set()))
        dtypes.add(r.dtype), head_dims.add(r.head_dim)
    table: dict = {}
    for config, variants in sorted(by_key.items()):
        for name, archs in sorted(variants.items()):
            for arch, clean in sorted(archs.items()):
                limit = 0
                for head_dim in sorted(clean):
                    if not clean[head_dim]:
                        break
                    limit = head_dim
                table.setdefault(config, {}).setdefault(name, {})[arch] = limit
    sources = {
        name: {
            arch: f"{'+'.join(sorted(d))} at head dims {', '.join(map(str, sorted(h)))}"
            for arch, (d, h) in archs.items()
        }
        for name, archs in seen.items()
    }
    return table, sources


def write_limits(rows: list[Row], path: str | None = None) -> str:
    """Update limits.py from the compiles: the entries (candidate, variant, arch) they cover are
    replaced, the others kept, and SOURCES says what each (variant, arch) was compiled from."""
    from vivit_kernels.triton import limits

    path = path or limits.__file__
    table, sources = limits_from(rows)
    merged = {
        config: {name: dict(archs) for name, archs in variants.items()} for config, variants in limits.LIMITS.items()
    }
    merged_sources = {name: dict(archs) for name, archs in limits.SOURCES.items()}
    for config, variants in table.items():
        for name, archs in variants.items():
            merged.setdefault(config, {}).setdefault(name, {}).update(archs)
    for name, archs in sources.items():
        merged_sources.setdefault(name, {}).update(archs)
    head_dims = sorted(set(limits.INSPECTED_HEAD_DIMS) | {r.head_dim for r in rows if r.head_dim is not None})
    text = open(path).read()
    text = re.sub(r"INSPECTED_HEAD_DIMS = \(.*?\)\n", f"INSPECTED_HEAD_DIMS = {tuple(head_dims)}\n", text)
    body = "\n".join(f"    {key!r}: {value!r}," for key, value in sorted(merged_sources.items()))
    text = re.sub(r"SOURCES = \{\n.*?\n\}\n", "SOURCES = {\n" + body + "\n}\n", text, flags=re.S)
    body = "\n".join(f"    {key!r}: {value!r}," for key, value in merged.items())
    text = re.sub(r"LIMITS = \{\n.*?\n\}\n", "LIMITS = {\n" + body + "\n}\n", text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------------------
# Reporting.


def format_table(rows: list[Row]) -> str:
    header = (
        f"{'kernel':<96} {'sm':>3} {'regs':>5} {'spare':>5} {'stack':>6} {'smem KiB':>9} {'LDL':>4} {'STL':>4} "
        f"{'HMMA':>5} {'HGMMA':>5} {'async':>5} {'v-ld':>5}  tuner"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.error:
            lines.append(f"{r.name:<96} {r.arch:>3}  FAILED: {r.error}")
            continue
        over = " smem>limit" if r.over_shared else ""
        lines.append(
            f"{r.name:<96} {r.arch:>3} {r.registers:>5} {MAX_REGISTERS - r.registers:>5} {r.stack:>6} "
            f"{r.shared / 1024:>9.1f} {r.spill_loads:>4} {r.spill_stores:>4} {r.hmma:>5} {r.hgmma:>5} "
            f"{r.async_copies:>5} {r.vector_loads:>5}  {'yes' if r.autotune_candidate else 'no'}{over}"
        )
    lines.append(
        f"spare: registers left of the {MAX_REGISTERS} a thread may use (a kernel near 0 spills after a small "
        "change); LDL/STL: spill instructions; HMMA/HGMMA: tensor-core instructions; async: cp.async; v-ld: "
        "vector global loads; tuner: may the autotuner pick it on that architecture (limits.py)"
    )
    return "\n".join(lines)


def failures(rows: list[Row]) -> list[str]:
    """Compiles that failed, and candidates that spill or exceed the architecture's shared memory."""
    bad = [f"{r.name} sm_{r.arch}: {r.error}" for r in rows if r.error]
    bad += [
        f"{r.name} sm_{r.arch}: autotune candidate with LDL {r.spill_loads} STL {r.spill_stores}, "
        f"{r.shared} bytes of shared memory (limit {SHARED_LIMIT[r.arch]})"
        for r in rows
        if not r.error and _problem(r)
    ]
    return bad


def main(argv: list[str] | None = None) -> int:
    from vivit_kernels.triton import interpreted

    if interpreted():
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        command = [sys.executable, "-m", "vivit_kernels.triton.inspect", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(command, env=env).returncode
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="", help="regex on the kernel name, e.g. 'attention_fwd.*fp16'")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS), help="attention head dims")
    parser.add_argument("--kernels", default="all", choices=("all", "attention", "tubelet"))
    parser.add_argument("--candidates", action="store_true", help="only configs the autotuner may pick")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of a table")
    parser.add_argument(
        "--write-limits",
        action="store_true",
        help="update limits.py from these compiles (every config of the dtypes, head dims and archs given)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="only say how many compiles the other options make and how long they take (with --json: as a JSON object)",
    )
    args = parser.parse_args(argv)
    if args.write_limits and (args.candidates or args.filter):
        parser.error("--write-limits needs every config compiled: no --candidates or --filter")
    start = time.monotonic()
    work = plan(args.filter, args.arch, args.dtype, args.head_dims, args.kernels, args.candidates)
    seconds = estimate(len(work), args.jobs)
    what = scope(args.arch, args.dtype, args.head_dims, args.kernels, args.candidates, args.filter)
    print(
        f"inspect: {len(work)} compiles ({what}), about {duration(seconds)} in {args.jobs} process"
        f"{'es' if args.jobs > 1 else ''} (roughly {SECONDS_PER_COMPILE:.0f} s of a core per compile)",
        file=sys.stderr,
        flush=True,
    )
    if seconds > 120:
        print(f"inspect: to narrow it: {NARROW}", file=sys.stderr, flush=True)
    if args.plan:
        if args.json:
            print(json.dumps({"compiles": len(work), "estimate_s": round(seconds), "scope": what}))
        return 0
    rows = compile_all(work, args.kernels, args.dtype, args.head_dims, args.jobs, progress=True)
    if args.write_limits:
        print(f"wrote {write_limits(rows)}", file=sys.stderr)
    print(json.dumps([asdict(r) for r in rows]) if args.json else format_table(rows))
    bad = failures(rows) if not args.write_limits else [f"{r.name}: {r.error}" for r in rows if r.error]
    print(f"inspect: {len(rows)} compiles in {duration(time.monotonic() - start)}, {len(bad)} failing", file=sys.stderr)
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
