# `make demo` runs the main job, `make test` the tests; each sets up .venv on first use.
# In an environment of your own (e.g. with a CUDA build of torch): make test VENV=$$CONDA_PREFIX TORCH=
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.vivit-installed
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is pinned in the same pip call as everything else, so nothing can upgrade it.
$(STAMP): setup.py requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q $(TORCH) -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PYTHON) -m vivit_kernels.report

test: $(STAMP)
	$(PYTHON) -m pytest tests benchmarks --benchmark-disable -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PYTHON) -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks
