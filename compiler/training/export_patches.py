"""PyTorch functions that the TorchScript ONNX exporter writes wrong or not at all, replaced by
equivalent ones while the model is traced (as Optimum's exporter does with its model patchers,
`optimum.exporters.onnx.model_patcher`).

- `repeat_interleave(x, n, dim)` with an int `n`: the exporter's symbolic gives the result a
  wrong rank (a (2, 2, 3, 16) key came out rank 6), and a later `cat` with the KV cache fails
  ("All tensors must have the same rank"): Cohere 2's and GLM-4's rotary embeddings. Traced
  instead as unsqueeze -> expand -> reshape, the same values.
- `torch.nn.functional.rms_norm` (`nn.RMSNorm`): no symbolic at opset 17 (RMSNormalization is
  opset 23): DiffLlama's head norm. Traced as x * rsqrt(mean(x^2) + eps) * weight, the
  decomposed form Hugging Face's own RMSNorm modules export (and the hybrid rule pins).
- `expm1`: no symbolic at opset 17 (`UnsupportedOperatorError`): Apertus's xIELU activation.
  Traced as exp(x) - 1; the export's parity check against the unpatched model bounds the
  difference (exp(x) - 1 loses expm1's relative accuracy only where |x| < ~1e-4, absolutely
  below float32's spacing near 1).

The PyTorch model itself (training, the parity reference) runs unpatched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def exportable_ops() -> Iterator[None]:
    """Within the block, `torch.repeat_interleave` / `Tensor.repeat_interleave` (int repeats and a
    dim), `torch.nn.functional.rms_norm` and `torch.expm1` / `Tensor.expm1` trace as the
    equivalents above; restored on exit."""
    import torch
    import torch.nn.functional as F

    saved = {(owner, name): getattr(owner, name) for owner in (torch, torch.Tensor)
             for name in ("repeat_interleave", "expm1")}
    plain_repeat = saved[(torch, "repeat_interleave")]

    def repeat_interleave(x: Any, repeats: Any = None, dim: Any = None, **kw: Any) -> Any:
        if isinstance(repeats, int) and isinstance(dim, int) and not kw and x.dim() > 0:
            d = dim % x.dim()
            shape = list(x.shape)
            wide = x.unsqueeze(d + 1).expand(*shape[:d + 1], repeats, *shape[d + 1:])
            return wide.reshape(*shape[:d], shape[d] * repeats, *shape[d + 1:])
        if dim is not None:
            kw["dim"] = dim
        return plain_repeat(x, *(() if repeats is None else (repeats,)), **kw)

    def expm1(x: Any, **kw: Any) -> Any:
        if kw:  # out=...: not traced into an export
            return saved[(torch, "expm1")](x, **kw)
        return torch.exp(x) - 1

    def rms_norm(x: Any, normalized_shape: Any, weight: Any = None, eps: Any = None) -> Any:
        dims = tuple(range(-len(normalized_shape), 0))
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + (torch.finfo(x.dtype).eps if eps is None else eps))
        return y if weight is None else y * weight

    saved[(F, "rms_norm")] = F.rms_norm
    try:
        F.rms_norm = rms_norm
        for owner in (torch, torch.Tensor):
            setattr(owner, "repeat_interleave", repeat_interleave)
            setattr(owner, "expm1", expm1)
        yield
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)
