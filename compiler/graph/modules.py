"""ONNX node -> PyTorch module: the exporter's node names carry the module path."""

from __future__ import annotations


def module_for_node(node_name: str) -> str:
    """ONNX node name of the exporter -> PyTorch module path.

    `/model/encoder/layer.0/attention/self/query/MatMul` -> `encoder.layer.0.attention.self.query`
    (the export wrapper holds the Hugging Face model as `model`).
    """
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts[:-1])
