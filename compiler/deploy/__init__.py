"""The deployment side: what happens after the build.

- `bundle`: a Triton model repository (TensorRT plan + ONNX Runtime fallback + tokenizer + manifest),
  prepared here and completed by a build on the target GPU host;
- `triton`: `config.pbtxt` written and checked with Triton's own protobuf schema;
- `plan`: a plan file's header, read without TensorRT;
- `checks`: the refusals made before anything is loaded (hashes, TensorRT version, compute
  capability, shapes outside the optimization profile, host code);
- `inspect`: what a plan, an ONNX or a bundle holds, and what this host can run of it;
- `runtime`: `Bundle.load(path)`, on TensorRT where present, else ONNX Runtime.
- `generation`: `Bundle.generate` / `run --generate N`: greedy decoding on the bundle's backend,
  reusing the KV cache (context profile, then decode profile).
"""
