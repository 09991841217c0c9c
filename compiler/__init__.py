"""Model compilation toolchain for NVIDIA TensorRT 11.

The stages, in the order `compiler.pipeline.run_pipeline` runs them:
export -> sparsity -> quantize -> precision -> verify -> build. One folder per kind of work:
`graph` (reading ONNX), `passes` (ONNX -> ONNX rewrites), `quant` (calibration, the INT8
budget), `training` (PyTorch: loading, export, pruning, QAT), `eval` (the fidelity probe,
verification), `build` (TensorRT). Importing this package imports neither torch nor TensorRT.
"""

__version__ = "0.1.0"
