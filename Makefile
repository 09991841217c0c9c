# One command per job; every target calls `python -m compiler` (see README.md).
#   make engine MODEL=bert-large WEIGHTS=random PRECISION=hybrid
#   make onnx   MODEL=minilm PRECISION=fp16 CALIB=../shared/data/sst2/dev.tsv
#   make engine MODEL=minilm PRECISION=int8        (PTQ; int8-qat: quantization-aware training)
#   make engine MODEL=minilm PRECISION=int8-qat SPARSITY=2:4
#   make engine MODEL=minilm SPARSITY=2:4 TRAIN_TEXT="deploy.tsv ../shared/data/wikitext-2/test.txt"
#                (fine-tuning text for QAT / 2:4 recovery: files mixed in even shares)
PYTHON    ?= python
MODEL     ?= minilm
WEIGHTS   ?= pretrained
PRECISION ?= hybrid
SAMPLES   ?= 64
CALIB     ?=
SPARSITY  ?=
TRAIN_TEXT ?=
ARGS      ?=

COMMON = --model $(MODEL) --weights $(WEIGHTS) --precision $(PRECISION) --samples $(SAMPLES) \
         $(if $(CALIB),--calib $(CALIB)) $(if $(SPARSITY),--sparsity $(SPARSITY)) \
         $(foreach t,$(TRAIN_TEXT),--train-text $(t)) $(ARGS)

.PHONY: engine onnx export test test-gpu install clean

engine:  ## export, precision, verify, TensorRT build (exit 2 with the ONNX kept where TensorRT/GPU are missing)
	$(PYTHON) -m compiler compile $(COMMON)

onnx:    ## the same without the build step
	$(PYTHON) -m compiler compile --no-build $(COMMON)

export:
	$(PYTHON) -m compiler export --model $(MODEL) --weights $(WEIGHTS) $(ARGS)

test:    ## the CPU test tier (what CI runs)
	$(PYTHON) -m pytest -m "not gpu" -q

test-gpu:  ## tests that need TensorRT and a CUDA GPU
	$(PYTHON) -m pytest -m gpu -q

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[test]'

clean:
	find engines -mindepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf calibration/cache
