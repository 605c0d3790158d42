# `make demo` and `make test` do all set-up on a fresh machine: create .venv, install torch 2.13.0
# when no torch is importable, install mmfast in editable mode (building the C++ kernels), then run.
# The install step re-runs only when the package definition or csrc/ changes.
PYTHON ?= python3
VENV ?= .venv
# This machine's pip resolves torch==2.13.0 to a local CPU wheel. Elsewhere, plain PyPI gives the CUDA
# build; for the CPU one: make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmfast-installed

.PHONY: setup demo test bench bench-full gpu-report lint clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || { echo "installing torch==2.13.0 $(TORCH_INDEX) (plain PyPI gives the CUDA" \
		"build; for the CPU one: TORCH_INDEX=\"--index-url https://download.pytorch.org/whl/cpu\")"; \
		$(PY) -m pip install -q torch==2.13.0 $(TORCH_INDEX); }
	$(PY) -m pip install -q "setuptools>=70" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,train]"
	$(PY) -m mmfast
	touch $@

setup: $(STAMP)

# The main job on the embedded default: the LLaVE example trains the tiny default model on the generated
# data and evaluates it on the held-out sets before and after (retrieval R@1, MMEB-style P@1 per
# meta-task, SugarCrepe, video); the table, runs/demo/results.json and runs/demo/loss.png.
demo: setup
	$(PY) examples/train_llave.py --output_dir runs/demo

test: setup
	$(PY) -m pytest -q

# The kernels' summary: the contrastive loss against the code people write, and pooling (a minute or two).
bench: setup
	$(PY) benchmarks/contrastive_loss.py --summary --quiet
	$(PY) benchmarks/pooling.py --batch 32 --tokens 512 --dim 1536 --repeats 3 --memory

# The full contrastive-loss sweep, written to benchmarks/results/ (JSON and plot).
bench-full: setup
	$(PY) benchmarks/contrastive_loss.py --memory --json benchmarks/results/contrastive_loss.json \
		--plot benchmarks/results/contrastive_loss.png

gpu-report: setup
	$(PY) benchmarks/gpu_report.py --json benchmarks/results/gpu_report.json --text benchmarks/results/gpu_report.txt

lint: setup
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info mmfast/_C*.so .pytest_cache
