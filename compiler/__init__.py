"""Model compilation toolchain for NVIDIA TensorRT 11.

Stages (one module each, run in this order by `compiler.pipeline`):
`export` (PyTorch -> ONNX), `precision` (strongly typed FP32/FP16 ONNX), `verify` (fidelity
against FP32 on real text), `build` (TensorRT engine + manifest). Importing this package
imports neither torch nor TensorRT.
"""

__version__ = "0.1.0"
