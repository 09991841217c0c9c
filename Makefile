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
#   make bench MODEL=minilm GRID=paper BACKENDS=cpu   (latency grid; make bench-compile: compile cost)
#   make bundle MODEL=minilm PRECISION=hybrid      (Triton model repository, docs/deploy.md); then:
#     python -m compiler build --bundle DIR        (on the GPU host: the plan, one per compute capability)
#     python -m compiler run DIR --text "..." [--backend tensorrt|onnxruntime] [--check]   (checks first)
#     python -m compiler inspect FILE|DIR          (a plan header, an ONNX, a bundle; no TensorRT needed)
#   make matrix SPEC=docs/examples/matrix-minilm.yaml   (models x precisions x GPU targets on Ray, docs/matrix.md)
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
TASK      ?=
BENCH     ?= precision_modes
GRID      ?= quick
SPEC      ?= docs/examples/matrix-minilm.yaml
BACKENDS  ?= cpu
ARGS      ?=

# Paths reach the CLI shell-quoted, so MODEL="/path/with space" is one argument. TRAIN_TEXT and
# VOCAB_TEXT are space-separated lists: pass a file whose path has a space through
# ARGS='--train-text "my text.tsv"' instead.
quote = '$(subst ','\'',$(1))'

COMMON = --model $(call quote,$(MODEL)) --weights $(WEIGHTS) --precision $(PRECISION) --samples $(SAMPLES) \
         $(if $(TASK),--task $(TASK)) \
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

.PHONY: engine onnx bundle export matrix test test-gpu install benchmark bench bench-compile clean

engine: $(STAMP)   ## export, precision, verify, TensorRT build (exit 2 with the ONNX kept where TensorRT/GPU are missing)
	$(PYTHON) -m compiler compile $(COMMON)

onnx: $(STAMP)     ## the same without the build step
	$(PYTHON) -m compiler compile --no-build $(COMMON)

bundle: $(STAMP)   ## Triton model repository in <variant>/bundle/ (the plan is built where TensorRT and a GPU are)
	$(PYTHON) -m compiler bundle $(COMMON)

matrix: $(STAMP)   ## the build matrix of SPEC on Ray (local by default; ARGS="--address ray://head:10001 --retries 2 --fresh")
	$(PYTHON) -m compiler matrix $(call quote,$(SPEC)) $(ARGS)

export: $(STAMP)
	$(PYTHON) -m compiler export --model $(call quote,$(MODEL)) --weights $(WEIGHTS) $(if $(TASK),--task $(TASK)) $(ARGS)

test: $(STAMP)     ## the CPU test tier (what .ci/run runs)
	$(PYTHON) -m pytest -m "not gpu" -q

test-gpu: $(STAMP) ## tests that need TensorRT and a CUDA GPU (pip install -e '.[gpu]' first)
	$(PYTHON) -m pytest -m gpu -q

benchmark: $(STAMP)  ## python -m benchmarks.$(BENCH) $(ARGS); results under engines/benchmarks/
	$(PYTHON) -m benchmarks.$(BENCH) $(ARGS)

bench: $(STAMP)      ## latency/throughput over GRID (quick|paper) per backend (BACKENDS: cpu, all, or a,b,...)
	$(PYTHON) -m benchmarks.latency --model $(call quote,$(MODEL)) --weights $(WEIGHTS) --grid $(GRID) --backends $(BACKENDS) $(ARGS)

bench-compile: $(STAMP)  ## each stage's wall time and peak memory per model x precision, from scratch (compile.json)
	$(PYTHON) -m benchmarks.compile_cost $(ARGS)

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
