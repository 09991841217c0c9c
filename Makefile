# One command per job; every target calls `python -m compiler` (see README.md and docs/).
# On a fresh machine `make engine` and `make test` are the whole set-up: the first target that
# runs Python installs the project (see STAMP below).
#   make engine                                    MiniLM, PRECISION=hybrid: export ... build
#   make engine MODEL=bert-large WEIGHTS=random PRECISION=hybrid
#   make onnx   MODEL=minilm PRECISION=fp16 CALIB=../shared/data/sst2/dev.tsv
#   make engine MODEL=minilm PRECISION=int8        (PTQ; int8-qat: quantization-aware training)
#   make engine MODEL=minilm PRECISION=int8-qat SPARSITY=2:4
#   make engine MODEL=minilm SPARSITY=2:4 TRAIN_TEXT="deploy.tsv ../shared/data/wikitext-2/test.txt"
#                (fine-tuning text for QAT / 2:4 recovery: files mixed in even shares)
#   make onnx MODEL=minilm VOCAB_TEXT=../shared/data/sst2/train.tsv   (vocabulary pruning to a domain's tokens)
#   make benchmark BENCH=precision_modes ARGS="--samples 32"
VENV      ?= .venv
PYTHON    ?= $(VENV)/bin/python
MODEL     ?= minilm
WEIGHTS   ?= pretrained
PRECISION ?= hybrid
SAMPLES   ?= 64
CALIB     ?=
SPARSITY  ?=
TRAIN_TEXT ?=
VOCAB_TEXT ?=
BENCH     ?= precision_modes
ARGS      ?=

# Paths reach the CLI shell-quoted, so MODEL="/path/with space" is one argument. TRAIN_TEXT and
# VOCAB_TEXT are space-separated lists: pass a file whose path has a space through
# ARGS='--train-text "my text.tsv"' instead.
quote = '$(subst ','\'',$(1))'

COMMON = --model $(call quote,$(MODEL)) --weights $(WEIGHTS) --precision $(PRECISION) --samples $(SAMPLES) \
         $(if $(CALIB),--calib $(call quote,$(CALIB))) $(if $(SPARSITY),--sparsity $(SPARSITY)) \
         $(foreach t,$(TRAIN_TEXT),--train-text $(call quote,$(t))) \
         $(foreach t,$(VOCAB_TEXT),--prune-vocab $(call quote,$(t))) $(ARGS)

# The install stamp: one file per Python environment, `<env>/.trt-compiler-installed` (the folder
# above PYTHON's bin/), so `PYTHON=python` inside an activated .venv (what .ci/run does) finds the
# default's stamp, and another environment gets its own install. Remade when pyproject.toml
# changes. torch goes first and pinned: 2.13.0 is a local CPU build on these machines; a looser
# pin pulls the newest CUDA wheels (several GB). PYTHON must live in a writable environment.
PYTHON_BIN := $(or $(shell command -v $(PYTHON) 2>/dev/null),$(PYTHON))
STAMP      := $(abspath $(dir $(abspath $(PYTHON_BIN)))../.trt-compiler-installed)
NEW_VENV   := $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)

.PHONY: engine onnx export test test-gpu install benchmark clean

engine: $(STAMP)   ## export, precision, verify, TensorRT build (exit 2 with the ONNX kept where TensorRT/GPU are missing)
	$(PYTHON) -m compiler compile $(COMMON)

onnx: $(STAMP)     ## the same without the build step
	$(PYTHON) -m compiler compile --no-build $(COMMON)

export: $(STAMP)
	$(PYTHON) -m compiler export --model $(call quote,$(MODEL)) --weights $(WEIGHTS) $(ARGS)

test: $(STAMP)     ## the CPU test tier (what .ci/run runs)
	$(PYTHON) -m pytest -m "not gpu" -q

test-gpu: $(STAMP) ## tests that need TensorRT and a CUDA GPU (pip install -e '.[gpu]' first)
	$(PYTHON) -m pytest -m gpu -q

benchmark: $(STAMP)  ## python -m benchmarks.$(BENCH) $(ARGS); results under engines/benchmarks/
	$(PYTHON) -m benchmarks.$(BENCH) $(ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml | $(NEW_VENV)
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[test]'
	touch $@

$(VENV)/bin/python:
	python3 -m venv $(VENV)

clean:
	find engines -mindepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf calibration/cache engines/cache
