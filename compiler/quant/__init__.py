"""INT8 post-training quantization around the Q/DQ and SmoothQuant passes.

- `calibrate`: calibration windows of real text, ONNX Runtime's calibrators, channel maxima.
- `budget`: `quantize_within_budget`, the accuracy-budget loop (held-out fidelity vs FP32).
"""
