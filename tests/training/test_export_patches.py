"""compiler/training/export_patches.py: ops the TorchScript exporter writes wrong or not at all,
traced as equivalents during the export only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler.training.export import traced_onnx
from compiler.training.export_patches import exportable_ops


def test_the_replacements_compute_the_same_values_and_are_restored():
    x = torch.randn(2, 3, 4, 6)
    expected = {d: torch.repeat_interleave(x, 3, dim=d) for d in (0, 1, -1, -2)}
    plain, plain_norm = torch.repeat_interleave, torch.nn.functional.rms_norm
    norm = torch.nn.RMSNorm(6, eps=1e-5)
    torch.manual_seed(0)
    torch.nn.init.normal_(norm.weight)
    expected_norm = norm(x)
    torch.manual_seed(0)
    with exportable_ops():
        assert torch.repeat_interleave is not plain
        for d, want in expected.items():
            assert torch.equal(torch.repeat_interleave(x, 3, dim=d), want)
            assert torch.equal(x.repeat_interleave(3, dim=d), want)
        # what the replacement does not cover goes to PyTorch's own
        assert torch.equal(torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1])), torch.tensor([1, 1, 2]))
        assert torch.equal(x.repeat_interleave(2), plain(x, 2))
        assert torch.equal(torch.repeat_interleave(torch.tensor([2, 1])), torch.tensor([0, 0, 1]))
        small = torch.tensor([-3.0, -0.5, 0.25, 2.0])
        assert torch.allclose(torch.expm1(small), torch.special.expm1(small), atol=1e-6)
        assert torch.allclose(small.expm1(), torch.special.expm1(small), atol=1e-6)
        norm = torch.nn.RMSNorm(6, eps=1e-5)
        torch.nn.init.normal_(norm.weight)
        assert torch.allclose(norm(x), expected_norm, atol=1e-6)
        assert torch.allclose(torch.nn.RMSNorm(6)(x), plain_norm(x, (6,)), atol=1e-6)  # eps None: the dtype's
    assert torch.repeat_interleave is plain and torch.nn.functional.rms_norm is plain_norm
    assert torch.equal(torch.expm1(torch.tensor([1e-8])), torch.tensor([1e-8]))  # the exact one again


class RotaryLike(torch.nn.Module):
    """GLM-4's rotary pattern (interleaved cos, the rotated halves stacked), then the cat with the
    past keys where the unpatched export fails; an nn.RMSNorm and an expm1."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(16)

    def forward(self, key: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(key.shape[2]).float()[None, :, None]  # (1, sequence, 1)
        freqs = pos * torch.linspace(0.1, 1.0, key.shape[-1] // 2)[None, None]
        cos = torch.cat([freqs, freqs], dim=-1).cos()
        cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1).unsqueeze(1)
        x1, x2 = key[..., 0::2], key[..., 1::2]
        k = key * cos + torch.stack((-x2, x1), dim=-1).flatten(-2) * cos
        return torch.cat([past, self.norm(k)], dim=-2), torch.expm1(key)


@pytest.mark.filterwarnings("ignore")
def test_export_writes_the_patched_ops_and_the_graph_runs_at_other_shapes(tmp_path):
    import onnxruntime as ort

    key, past = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 5, 16)
    axes = {"key": {0: "batch", 2: "sequence"}, "past": {0: "batch", 2: "past"}}
    module = RotaryLike()
    model = traced_onnx(module, (key, past), tmp_path / "m.onnx", ["key", "past"], ["present", "e"], axes, 17)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    key, past = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 4, 16)  # not the traced shapes
    present, e = sess.run(None, {"key": key.numpy(), "past": past.numpy()})
    with torch.no_grad():
        want_present, want_e = module(key, past)
    np.testing.assert_allclose(present, want_present.numpy(), atol=1e-5)  # cos: ONNX Runtime vs PyTorch ulps
    np.testing.assert_allclose(e, want_e.numpy(), atol=1e-6)
