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

.PHONY: setup demo test test-fast lint clean gpu-wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,slurm,eval,kernels]"
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

# Everything the GPU suite needs on a bare machine with torch and triton but no network (see README,
# "Measuring on a GPU"): wheels for CPython 3.12 / manylinux x86_64 and the prepared embedded corpus.
GPU_WHEELS ?= .gpu-wheels
GPU_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014,--platform $(p)_x86_64)
gpu-wheels: setup
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)/cache/embedded
	$(BIN)/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 $(GPU_PLATFORMS) -r benchmarks/gpu_requirements.txt -d $(GPU_WHEELS)
	$(BIN)/python -m pip wheel -q --disable-pip-version-check --no-deps antlr4-python3-runtime==4.9.3 -w $(GPU_WHEELS)
	$(BIN)/lrpretrain prepare-data embedded
	cp -r "$$($(BIN)/python -c 'from lrpretrain.data_recipes.embedded import corpus_dir; print(corpus_dir())')" \
		$(GPU_WHEELS)/cache/embedded/
	@du -ch $(GPU_WHEELS)/*.whl | tail -1 | sed 's/total/of wheels in $(GPU_WHEELS)/'; du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
