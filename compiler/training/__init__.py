"""The PyTorch side: model loading (`models`), export to ONNX (`export`), the distillation loop
(`distill`), 2:4 pruning and recovery (`prune`), and quantization-aware training (`qat`)."""
