# recipe-lab: `make demo` runs the embedded lab end to end; `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CACHE  := $(CURDIR)/.cache

# Offline by construction: nothing is fetched from a model hub (NOTES.md).
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_CLI_PROMPT := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
# One torch thread per process: on 2 cores, two threads ran training 24x and lm-eval 7x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: install demo serve lint format test test-fast bench gpu-wheels clean

install: $(VENV)/.installed

# torch is pinned in every pip call (constraints.txt): unpinned, pip pulls the CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip check
	touch $@

demo: install
	$(BIN)/lab demo

# Local Prefect server + UI (:4200), the lab pool, every deployment and a worker (README, Operations).
serve: install
	$(BIN)/lab serve

# ruff (lint + format check) and the import contracts (layers, no Prefect below tasks/, no cycles;
# [tool.importlinter] in pyproject.toml) run first in `make test`.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install lint
	mkdir -p $(CACHE)/prefect-test
	RECIPE_LAB_CACHE=$(CACHE)/recipe-lab HF_HOME=$(CACHE)/hf PREFECT_HOME=$(CACHE)/prefect-test \
		$(BIN)/python -m pytest -q -ra --durations=15

test-fast: install
	RECIPE_LAB_CACHE=$(CACHE)/recipe-lab $(BIN)/python -m pytest -q -m "not slow"

bench: install
	RECIPE_LAB_CACHE=$(CACHE)/recipe-lab $(BIN)/python bench/train_throughput.py
	RECIPE_LAB_CACHE=$(CACHE)/recipe-lab $(BIN)/python bench/eval_throughput.py
	RECIPE_LAB_CACHE=$(CACHE)/recipe-lab $(BIN)/python bench/data_prep.py

# Wheels that bench/gpu_check.sh needs on the device machine (Python 3.12, its own torch / transformers,
# no pydantic, no network): pydantic and its deps, and the gpu extra's pinned liger-kernel (pure Python).
gpu-wheels: install
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		--platform manylinux_2_17_x86_64 -d $(CACHE)/gpu-wheels "pydantic>=2.7"
	$(BIN)/pip download -q --only-binary=:all: --no-deps -d $(CACHE)/gpu-wheels "liger-kernel==0.8.5"
	ls $(CACHE)/gpu-wheels

clean:
	rm -rf $(VENV) $(CACHE) runs
