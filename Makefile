# hierseg developer commands. `make demo` and `make test` set up .venv themselves.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test test-fast lint format bench clean

setup: $(STAMP)

# Install the pinned CPU torch first when none is present, so a fresh machine never pulls a
# multi-GB CUDA build through the `torch>=2.4` range; GPU users install their own build first.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_CPU) numpy
	$(BIN)/python -m pip install -q -e '.[dev]' 'mlflow==3.17.2'
	touch $(STAMP)

demo: setup
	$(BIN)/python jobs/demo.py

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: setup
	$(BIN)/python -m pytest -q tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slow and not slurm"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Side-by-side benchmarks (each prints ratios measured in one run); ~15 min on 2 cores.
# The full real-data comparison takes hours on 2 cores: python bench/realdata.py (see bench/README.md);
# the joint three-source model vs one model per source: python bench/partial_labels.py (~65 min);
# blockwise prediction at issue 13's size (32 x 2048 x 2048): python bench/blockwise.py (see bench/README.md).
bench: setup
	$(BIN)/python bench/realdata.py --quick
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/step.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/infer.py --depth 4 --size 512
	$(BIN)/python bench/blockwise.py --quick

clean:
	rm -rf $(VENV) .pytest_cache hierseg_runs mlflow.db mlruns
