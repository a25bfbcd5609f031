# lrpretrain: `make demo` (install + train on the embedded corpus) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: on a CPU-only machine the pinned version can come from a local CPU wheel;
# anywhere else PyPI's build of that version (CUDA on Linux). Override: make setup TORCH=torch==X.Y
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
# DeepSpeed JIT-compiles its CPU comm op on first use (~40 s); a cache outside the checkout keeps it
# across runs and fresh clones (CI)
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/lrpretrain/torch_extensions
export PATH := $(abspath $(BIN)):$(PATH)  # pip's ninja for those builds
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,slurm]"
	$(BIN)/python -m lrpretrain.distributed.deepspeed  # build DeepSpeed's JIT op now (cached)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/lrpretrain prepare-data embedded
	$(BIN)/lrpretrain train experiment=demo run.dir=$(DEMO_DIR)
	@echo "--- a sample from the trained model ($(DEMO_DIR)):"
	$(BIN)/lrpretrain generate run.dir=$(DEMO_DIR) prompt="ROMEO." max_new_tokens=120

test: setup
	$(BIN)/python -m lrpretrain.data_recipes.embedded --download-only
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check lrpretrain tests data_recipes kernels

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
