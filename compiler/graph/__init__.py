"""Reading ONNX graphs: load/save and sessions (`onnx_io`), types, shapes and MAC counts
(`analysis`), ONNX node -> PyTorch module (`modules`), the 2:4 pattern check (`sparsity`).

Every other package reads graphs through these modules; they import nothing above
`compiler.settings`, `compiler.errors` and `compiler.artifacts`.
"""
