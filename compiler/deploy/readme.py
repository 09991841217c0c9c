"""The bundle's README.md: how to serve the model repository and send it a request."""

from __future__ import annotations

from typing import Any, Mapping

BUILD_COMMAND = "python -m compiler build --bundle {dir}"


def bundle_readme(manifest: Mapping[str, Any]) -> str:
    """README.md of a bundle: its two Triton models, the `tritonserver` command, a `tritonclient`
    (HTTP) request with the model's real input and output names, and how to build the plan.

    Args:
        manifest: the bundle's manifest (name, status, io, profiles, engines, tokenizer).
    """
    name, io = manifest["name"], manifest["io"]
    inputs = [t["name"] for t in io["inputs"]]
    first_output = io["outputs"][0]["name"]
    profile = manifest["profiles"][0][inputs[0]] if manifest["profiles"] else None
    shapes = " and ".join(f"{p[inputs[0]]['min']}..{p[inputs[0]]['max']}" for p in manifest["profiles"])
    engines = manifest.get("engines") or []
    plans = ", ".join(f"`{e['file']}` (compute capability {e['compute_capability']}, TensorRT "
                      f"{e['tensorrt_version']}, {e['gpu']['name']})" for e in engines) or "none yet"
    status = ("**Status: prepared** — everything but the TensorRT plan. Build it on the GPU host that will "
              f"serve it (TensorRT 11 and the NVIDIA driver needed):\n\n    {BUILD_COMMAND.format(dir='.')}\n\n"
              "(run from this folder, or pass the bundle's path). Building on another GPU type adds one plan "
              "per compute capability, mapped by `cc_model_filenames` in the config.\n"
              if manifest["status"] == "prepared" else f"**Status: built** — plans: {plans}.\n")
    feeds = "\n".join(
        f'    ("{n}", enc["{n}"] if "{n}" in enc else np.zeros_like(enc["input_ids"])),' for n in inputs)
    return f"""# Triton model repository: {name}

Made by `{manifest.get('command', 'python -m compiler bundle')}` from {manifest['model']['name']}
({manifest['model']['weights']} weights), precision `{manifest['variant']}`.

{status}
| folder | Triton model | runs on |
|---|---|---|
| `{name}/` | `platform: "tensorrt_plan"`, plan in `1/` | an NVIDIA GPU of a compute capability the bundle was built for |
| `{name}_onnxruntime/` | `platform: "onnxruntime_onnx"`, `1/model.onnx` | any host (CPU instances) |
| `{name}/tokenizer/` | - (Triton skips non-numeric subfolders) | the tokenizer (`AutoTokenizer.from_pretrained("{name}/tokenizer")`) |
| `{name}/reference/` | - | the FP32 ONNX the fidelity figures were measured against (`run --check`) |

Inputs {', '.join(f'`{n}`' for n in inputs)} are int64 (batch, sequence); the optimization
profile(s) admit shapes {shapes} (batch x sequence), nothing larger
(`tokenizer.max_length` {manifest['tokenizer']['max_length']}). `manifest.json` lists every file's
sha256, the I/O, the profiles, the precision recipe and the fidelity measured before shipping.

## Serve

With the plan built, on its GPU (both models load); then on a CPU-only host, or before the build:

    tritonserver --model-repository=$PWD
    tritonserver --model-repository=$PWD --model-control-mode=explicit --load-model={name}_onnxruntime

## Request (tritonclient, HTTP)

```python
import numpy as np
import tritonclient.http as httpclient
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}/tokenizer")
enc = tokenizer(["A sentence to embed."], return_tensors="np", padding=True)
client = httpclient.InferenceServerClient("localhost:8000")
inputs = []
for name, value in [
{feeds}
]:
    tensor = httpclient.InferInput(name, list(value.shape), "INT64")
    tensor.set_data_from_numpy(value.astype(np.int64))
    inputs.append(tensor)
result = client.infer("{name}", inputs, outputs=[httpclient.InferRequestedOutput("{first_output}")])
print(result.as_numpy("{first_output}").shape)
```

## Without a server

    python -m compiler run . --text "A sentence to embed."            # TensorRT where present, else ONNX Runtime
    python -m compiler run . --text "A sentence to embed." --check    # against reference/model.fp32.onnx
    python -m compiler inspect .                                       # hashes, and what this host can run

Before loading anything, `run` checks every file's sha256, the plan's TensorRT version and compute
capability against this host, and each request's batch and sequence against the profile
(opt {profile['opt'] if profile else '-'}).
"""
