"""The TensorRT build stage; imports only `compiler.graph` and the foundation (settings, errors,
artifacts), never training or pass code, so a deployment host needs no PyTorch.

- `engine`: the strongly typed engine build, manifest and timing cache (`engine_from_onnx`).
- `profiles`: optimization profile shapes from the ONNX inputs.
- `device`: the GPU and its compute capability through the CUDA driver API (no PyTorch).
"""
