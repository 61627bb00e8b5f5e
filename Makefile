# `make demo` runs the main job, `make test` the tests; each sets up .venv on first use.
# In an environment of your own (e.g. with a CUDA build of torch): make test VENV=$$CONDA_PREFIX TORCH=
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.vivit-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint test-compat dist-check bench bench-quick gpu-check mutate clean

install: $(STAMP)

# torch is pinned in the same pip call as everything else, so nothing can upgrade it.
$(STAMP): setup.py requirements-dev.txt $(wildcard csrc/*)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q $(TORCH) -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Model 4 (factorised dot-product) on the built-in moving-shapes data, on CPU: train, then
# evaluate on held-out clips with the bytes saved for backward (fused kernels vs naive attention),
# then every attention mode through every backend available here at ViViT-B shapes, then the
# activation memory of a ViViT-B training step per variant and implementation (16 x 224 x 224 clips).
DEMO_DIR ?= runs/demo
demo: $(STAMP)
	$(PYTHON) -m vivit.train --variant factorised_dot_product --dim 64 --depth 3 --heads 4 --tubelet 2 8 8 \
		--steps 300 --batch-size 32 --lr 1e-3 --warmup-steps 20 --synthetic-val-clips 0 \
		--checkpoint-every 100 --output-dir $(DEMO_DIR)
	$(PYTHON) -m vivit.evaluate --checkpoint $(DEMO_DIR)/checkpoint.pt --synthetic-clips 512 --saved-bytes
	$(PYTHON) -m vivit_kernels.report
	$(PYTHON) -m vivit.memory_report --json $(DEMO_DIR)/memory.json

# One worker process per core, at most 4 (pytest-xdist), each given whole files in order, so a
# module's fixtures are built once and its tests keep their order. TEST_WORKERS=0: one process.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PYTHON) -m pytest tests benchmarks --benchmark-disable -q \
		-n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile $(PYTEST_ARGS)

# The style pyproject.toml declares: the lint rules and the formatter.
lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# The oldest torch setup.py allows (`make test` has the newest) on the kernel, op and model tests, in
# a venv of its own; its C++ library is built beside .venv's (the name carries the torch it links).
# Without timm (its two tests are left out): it needs torchvision, and the only torchvision 0.28 to
# be had is a CUDA build that does not load beside the CPU torch. +cpu: the local wheel; plain
# 2.13.0 may be the multi-GB CUDA one.
COMPAT_VENV ?= .venv-compat
COMPAT_TORCH ?= torch==2.13.0+cpu
COMPAT_DEPS := einops numpy ninja setuptools wheel pytest
COMPAT_TESTS := $(addprefix tests/test_,cpu_backend.py cpu_short_groups.py ops.py attention.py tubelet.py \
	reference.py layers.py models.py model_oracle.py autocast.py sdpa.py checks.py)
COMPAT_STAMP := $(COMPAT_VENV)/.vivit-installed

$(COMPAT_STAMP): setup.py $(wildcard csrc/*)
	test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q $(COMPAT_TORCH) $(COMPAT_DEPS)
	$(COMPAT_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test-compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -c "import torch; from vivit_kernels import _extension; \
		print('test-compat: torch', torch.__version__, 'kernels', _extension.load())"
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider -k "not timm" $(COMPAT_TESTS) $(PYTEST_ARGS)

# The wheel, built from the tree by .venv, installed in a fresh venv with only torch: it loads the
# library it ships with no compiler on PATH, its commands start, convert works (tools/dist_check.sh).
dist-check: $(STAMP)
	BUILD_PYTHON=$(PYTHON) bash tools/dist_check.sh

# Every benchmark, its figures in $(BENCH_DIR)/bench.json, then the PNGs beside it (benchmarks/plots.py).
BENCH_DIR ?= runs/bench
bench: $(STAMP)
	mkdir -p $(BENCH_DIR)
	$(PYTHON) -m pytest benchmarks --benchmark-only --benchmark-json $(BENCH_DIR)/bench.json $(PYTEST_ARGS)
	$(PYTHON) -m benchmarks.plots $(BENCH_DIR)/bench.json

# The front page's temporal and split attention ratios, checked in under a minute on one thread;
# refused at a load average at or above the core count.
bench-quick: $(STAMP)
	mkdir -p $(BENCH_DIR)
	$(PYTHON) -m benchmarks.cpu_ratios --modes temporal,split --out $(BENCH_DIR)/cpu_ratios_quick.json

# For a GPU owner: every CUDA test, the compile inspection, the CUDA benchmarks and the memory
# planner against measured training steps, one report (runs/gpu-check/report.md and report.json).
# QUICK=1 runs a subset. Without a CUDA device it says so, compiles one slice of the inspection
# (sm_86 fp16 head dim 64 autotune candidates, about a minute), prints what the full inspection
# costs and its command, runs the memory checks on the CPU at a tiny config (seconds), and exits 0
# when those pass.
GPU_CHECK_DIR ?= runs/gpu-check
gpu-check: $(STAMP)
	$(PYTHON) tools/gpu_check.py --out $(GPU_CHECK_DIR) $(if $(QUICK),--quick)

# Mutation testing, not part of `make test`: hand-written mutants of the C++ and Triton kernels,
# then mutmut on the Python packages (runs/mutate/report.md and report.json). Each mutant runs in
# a scratch copy of the tree. MUTATE picks mutmut's modules: core (default: checks, ops, the
# reference backend, model, layers, checkpoint), all, or paths, comma-separated; MUTATE_SAMPLE=N
# runs N random mutants per module; MUTANTS=id,... some of the kernel mutants (tools/mutants.py --list);
# PARTS=kernels or python one part; REV=<commit> mutates that commit instead of the working tree.
MUTATE ?= core
MUTATE_DIR ?= runs/mutate
mutate: $(STAMP)
	$(PYTHON) -c "import mutmut" 2>/dev/null || $(PYTHON) -m pip install -q "mutmut==3.8.1"
	nice -n 10 $(PYTHON) tools/mutants.py --modules $(MUTATE) --out $(MUTATE_DIR) \
		$(if $(MUTATE_SAMPLE),--sample $(MUTATE_SAMPLE)) $(if $(MUTANTS),--only $(MUTANTS)) $(if $(PARTS),--parts $(PARTS)) $(if $(REV),--rev $(REV))

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks vivit_kernels/_csrc
