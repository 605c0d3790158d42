# `make demo` and `make test` do all set-up on a fresh machine: create .venv, install torch 2.13.0
# when no torch is importable, install mmfast in editable mode (building the C++ kernels), then run.
# Every install is pinned by the lock, constraints.txt: the exact versions CI last passed with, so a fresh
# machine gets what was tested, not whatever the registry serves today. The install step re-runs when the
# package definition, the lock or csrc/ changes (and then brings an existing venv to the lock's versions).
# `make test-latest` tries the newest versions pyproject.toml allows, in a venv of its own; `make lock`
# then records them as the new lock.
PYTHON ?= python3
VENV ?= .venv
LOCK ?= constraints.txt
LATEST_VENV ?= .venv-latest
# This machine's pip resolves torch==2.13.0 to a local CPU wheel. Elsewhere, plain PyPI gives the CUDA
# build; for the CPU one: make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmfast-installed
PIN := $(if $(LOCK),-c $(LOCK))
EXTRAS := .[test,bench,train]
# pip's own version is not pinned; torch's local label (+cpu) is dropped so the lock serves CUDA builds too.
FREEZE_FILTER := grep -v '^pip==' | sed 's/^torch==\([^+]*\)+.*/torch==\1/' | sort -f

.PHONY: setup demo test test-latest lock bench bench-full gpu-report lint clean

# venv, python, constraint flags: installs torch, the build tools and mmfast (editable, C++ kernels built).
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -c "import torch" 2>/dev/null || { echo "installing torch==2.13.0 $(TORCH_INDEX) (plain PyPI gives the CUDA" \
		"build; for the CPU one: TORCH_INDEX=\"--index-url https://download.pytorch.org/whl/cpu\")"; \
		$(1)/bin/python -m pip install -q $(2) torch==2.13.0 $(TORCH_INDEX); }
	$(1)/bin/python -m pip install -q $(2) "setuptools>=70" wheel ninja
	$(1)/bin/python -m pip install -q $(2) --no-build-isolation -e "$(EXTRAS)"
	$(1)/bin/python -m mmfast
endef

$(STAMP): pyproject.toml setup.py $(LOCK) $(wildcard csrc/*.cpp csrc/*.h)
	$(call install,$(VENV),$(PIN))
	touch $@

setup: $(STAMP)

# The main job on the embedded default: the LLaVE example trains the tiny default model on the generated
# data and evaluates it on the held-out sets before and after (retrieval R@1, MMEB-style P@1 per
# meta-task, SugarCrepe, video); the table, runs/demo/results.json and runs/demo/loss.png.
demo: setup
	$(PY) examples/train_llave.py --output_dir runs/demo

# The suite runs on every core (pytest-xdist, one worker per core, each worker's torch on its share of
# the cores): TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# The newest versions pyproject.toml's bounds allow, in a fresh venv of its own (torch stays 2.13.0): the
# early warning of a release that breaks a fresh install. Prints what differs from the lock, then the tests.
# Its editable install rebuilds the in-place C++ module against the same torch, so the two venvs share it.
test-latest:
	rm -rf $(LATEST_VENV)
	$(call install,$(LATEST_VENV),)
	$(LATEST_VENV)/bin/python -m pip install -q ruff
	$(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | $(FREEZE_FILTER) > $(LATEST_VENV)/versions.txt
	@echo "versions that differ from $(LOCK) (< lock, > latest):"
	@grep -v '^#' $(LOCK) | sort -f | diff - $(LATEST_VENV)/versions.txt || true
	$(LATEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Records the versions `make test-latest` installed (and passed with) as the new lock.
lock:
	test -f $(LATEST_VENV)/versions.txt || { echo "run make test-latest first"; exit 2; }
	{ echo "# The lock: exact versions of every package make installs, taken from the venv of a passing"; \
	  echo "# 'make test-latest' by 'make lock' ($$(date -u +%Y-%m-%d), $$($(LATEST_VENV)/bin/python -V), $$(uname -m))."; \
	  echo "# make passes it to pip with -c; LOCK= (empty) installs without it."; \
	  cat $(LATEST_VENV)/versions.txt; } > $(LOCK)

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
	$(PY) -m pip install -q $(PIN) ruff && $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info mmfast/_C*.so .pytest_cache
