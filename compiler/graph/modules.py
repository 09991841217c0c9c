"""ONNX node -> PyTorch module: the exporter's node names carry the module path."""

from __future__ import annotations


def module_for_node(node_name: str) -> str:
    """ONNX node name of the TorchScript exporter -> PyTorch module path.

    `/model/encoder/layer.0/attention/self/query/MatMul` -> `encoder.layer.0.attention.self.query`:
    the scopes of the name are the module path, the last part is the op; a leading `model`
    scope (the export wrapper holds the Hugging Face model as `model`,
    `compiler.training.export`) is dropped.

    Args:
        node_name: the node's name, e.g. `/model/h.0/attn/c_attn/Gemm`.

    Returns:
        The dotted module path relative to the Hugging Face model (`h.0.attn.c_attn`); "" for a
        node outside any module (e.g. `/MatMul` or an unscoped name).
    """
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts[:-1])
