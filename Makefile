# make install   .venv with torch 2.13.0 (CPU), fairseq-fixed, the recipes' tools and this project (editable)
# make test      the whole test suite (installs first)
# make check     the fast lane for everyday work: the libraries' unit tests and doctests, no fairseq tools,
#                no multi-process runs, no builds (installs first)
# make test-gpu  the GPU lane: the tests marked cuda (needs a CUDA device)
# make gpu-check the GPU lane, the CUDA speed tables and a paper-budget run in one command, no install:
#                make gpu-check PYTHON=python3 OUT=results/gpu/<machine>  (CPU smoke scale without CUDA)
# make docs      the docs site (mkdocs-material + mkdocstrings), warnings as errors, into site/
# make demo      the main job: deep Post-LN vs Admin vs Pre-LN with the real fairseq-train (installs first)
# make bench     every benchmark under benchmarks/
#
# Another environment instead of .venv:  make install test VENV=/path/to/env  (installs into it).

SHELL        := /bin/bash
PYTHON       ?= python3
VENV         ?= .venv
PY           := $(VENV)/bin/python
PIP          := $(PY) -m pip --disable-pip-version-check -q
# The fairseq build compiles C++ for ~3 minutes: keep its wheel outside .venv so a rebuilt .venv reuses it.
WHEEL_CACHE  ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/stability-toolbox/wheels
FAIRSEQ      := fairseq-fixed==0.12.3.1
FAIRSEQ_WHEEL := fairseq_fixed-0.12.3.1+numpy2-*.whl
STAMP        := $(VENV)/.installed
# what the recipes, the benchmarks, the tests and the docs use besides torch and fairseq
RECIPE_TOOLS := hydra-core omegaconf regex sacrebleu tqdm bitarray cffi scikit-learn packaging sentencepiece \
                matplotlib tensorboardX lion-pytorch transformers accelerate pytorch-lightning pytest pytest-xdist \
                hypothesis expecttest triton==3.9.0 trainscope==1.8.1 zclip==1.0.0 mkdocs-material "mkdocstrings[python]"
PYTEST_ARGS  ?=
# test processes: one per core (pytest-xdist); every test is single-threaded (tests/conftest.py)
TEST_JOBS    ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install test check test-gpu gpu-check docs demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py sign_optim/csrc/fused_sign.cpp constraints.txt Makefile tools/patch_fairseq_numpy2.py tools/patch_fairscale_amp.py \
           tools/patch_fairseq_imports.py tools/installed_package.py
	@echo "== creating $(VENV) (torch 2.13.0 CPU, $(FAIRSEQ), recipe tools)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0 numpy cython setuptools wheel 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch" # fail here, not later, if torch did not install
	mkdir -p "$(WHEEL_CACHE)"
	@# fairseq's source is repaired for NumPy 2 (tools/patch_fairseq_numpy2.py) before its wheel is built
	ls "$(WHEEL_CACHE)"/$(FAIRSEQ_WHEEL) >/dev/null 2>&1 || \
	  { echo "== building $(FAIRSEQ), repaired for NumPy 2, once (about 3 minutes), cached in $(WHEEL_CACHE)"; \
	    src=$$(mktemp -d) && \
	    $(PIP) download --no-deps --no-binary :all: --no-build-isolation -d $$src $(FAIRSEQ) && \
	    tar xzf $$src/fairseq_fixed-0.12.3.1.tar.gz -C $$src && \
	    $(PY) tools/patch_fairseq_numpy2.py $$src/fairseq_fixed-0.12.3.1 && \
	    $(PIP) wheel --no-build-isolation --no-deps -w "$(WHEEL_CACHE)" $$src/fairseq_fixed-0.12.3.1 && \
	    rm -rf $$src; }
	$(PIP) install --no-deps --force-reinstall "$$(ls "$(WHEEL_CACHE)"/$(FAIRSEQ_WHEEL) | head -n 1)"
	@# every fairseq tool imported scikit-learn and scipy.stats at start for two metrics (~0.9 s of CPU a start)
	$(PY) tools/patch_fairseq_imports.py
	@# the rest through uv (Astral's installer: the same versions as pip under constraints.txt, in ~10 s instead of
	@# ~55 s from a warm cache). torch stays pip's: pip takes the machine's wheel file, uv would download a CUDA build.
	@# uv reads no pip configuration (an index or mirror set for pip): where it cannot install them, pip does.
	@# --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, every process would compile them again
	$(PIP) install -c constraints.txt uv 2>&1 | grep -v "is ignored" || true
	$(PY) -m uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt $(RECIPE_TOOLS) || \
	  { echo "== uv could not install the recipe tools: pip installs them"; \
	    $(PIP) install -c constraints.txt $(RECIPE_TOOLS); }
	@# fairscale (fairseq's --zero-sharding os and --ddp-backend fully_sharded): its sdist, without CUDA extensions
	BUILD_CUDA_EXTENSIONS=0 $(PIP) install --no-build-isolation --no-deps -c constraints.txt fairscale==0.4.13
	@# its import-time FutureWarnings would precede every fairseq tool's output (tools/patch_fairscale_amp.py)
	$(PY) tools/patch_fairscale_amp.py
	$(PIP) install --no-build-isolation --no-deps -e .
	@# the public packages this toolbox is compared with, importable only through tests/peers.py
	$(PIP) install --no-deps --upgrade --target $(VENV)/peers admin-torch==0.1.0 reinmax==0.1.0
	$(PY) -c "import fairseq, fairscale, admin_torch, reinmax, sign_optim, sentencepiece, sacrebleu, matplotlib"
	touch $(STAMP)
	@echo "== $(VENV) is ready"

test: install
	$(VENV)/bin/pytest -n $(TEST_JOBS) --dist loadgroup $(PYTEST_ARGS)

# the fast lane: what make test runs minus the end-to-end parts (slow-marked fairseq tool runs, multi-process
# and packaging tests, the docs build, the recipes)
CHECK_IGNORE := tests/distributed tests/fairseq_plugins tests/recipes tests/packaging tests/docs tests/tools \
                tests/gpu tests/admin_torch/test_hf_trainer.py fairseq_plugins benchmarks
check: install
	$(VENV)/bin/pytest -n $(TEST_JOBS) -m "not slow" $(addprefix --ignore=,$(CHECK_IGNORE)) $(PYTEST_ARGS)

# the GPU lane: the tests marked cuda (every estimator, layer, residual and optimizer on CUDA, no host syncs)
test-gpu: install
	$(VENV)/bin/pytest -m cuda -n 1 $(PYTEST_ARGS)

# needs only a Python with torch (no .venv, no network): see tools/gpu_check.py for the parts and budgets
OUT ?= gpu-check-output
gpu-check:
	$(PYTHON) tools/gpu_check.py --out "$(OUT)"

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash recipes/demo/run.sh

bench: install
	# bench_monitor has subcommands: its speed measurement is "overhead"
	for b in benchmarks/bench_*.py; do m=benchmarks.$$(basename $$b .py); args=; \
	  [ $$m = benchmarks.bench_monitor ] && args=overhead; \
	  echo "== $$m $$args"; $(PY) -m $$m $$args || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache site
