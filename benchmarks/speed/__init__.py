"""The parts of `benchmarks.latency` (not scripts of their own):

- `timing`: the trtexec-style timing loop of one cell, peak RSS and GPU memory, machine facts;
- `backends`: one adapter per backend (PyTorch, ONNX Runtime, OpenVINO, TensorRT), each
  answering `available()` with a reason and `open()` with a runner of (batch, sequence) feeds;
- `accuracy`: held-out cosine against PyTorch FP32 and SST-2 dev accuracy with a fixed probe;
- `plots`: p50 latency against sequence length per batch, and the speed-up heatmap.
"""
