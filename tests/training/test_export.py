"""Stage 1 (`compiler.training.export`): dynamic axes, parity against PyTorch, reuse by content key.

The parity check is the exporter's own; these tests compare ONNX Runtime with PyTorch themselves,
at a (batch, sequence) outside the parity set, and make sure a broken export is caught.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from calibration import load_texts
from compiler.errors import CompilerError, ExportParityError
from compiler.settings import DataSettings, ExportSettings, ModelSettings
from compiler.training.export import onnx_from_torch, output_names
from compiler.training.models import REGISTRY, load_model
from tests.models import minilm, minilm_dir, minilm_export, minilm_tokenizer, tiny_bert, tiny_gpt2, tiny_loaded

# A tiny checkpoint per family in REGISTRY, saved to a local directory and loaded from there.
TINY = {"encoder": tiny_bert, "decoder": tiny_gpt2}
UNSEEN = (2, 21)  # (batch, sequence): in no ExportSettings.parity_batches x parity_sequences


@pytest.fixture(scope="module")
def texts():
    return load_texts(DataSettings(samples=3))


def ort_against_torch(loaded, path, texts, batch: int, sequence: int) -> dict[str, float]:
    """{output: max abs difference} of ONNX Runtime (CPU, FP32) against PyTorch on `batch - 1`
    texts and a short line, padded / truncated to `sequence` tokens."""
    samples = [*texts[: batch - 1], "A short line."]  # the others are truncated, this one padded
    enc = loaded.tokenizer(samples, padding="max_length", truncation=True, max_length=sequence,
                           return_tensors="np")
    feeds = {n: enc[n].astype(np.int64) for n in loaded.input_names}
    assert (feeds["attention_mask"] == 0).any() and feeds["attention_mask"][0].all()  # padded and truncated
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, feeds)))
    with torch.no_grad():
        kwargs = {n: torch.from_numpy(v) for n, v in feeds.items()}
        if loaded.family == "decoder":
            kwargs["use_cache"] = False
        ref = loaded.module(**kwargs, return_dict=True)
    assert set(got) == set(output_names(loaded))
    out = {}
    for name, value in got.items():
        assert value.shape == tuple(ref[name].shape), name
        out[name] = float(np.abs(value - ref[name].numpy()).max())
    return out


def test_every_registered_family_has_a_tiny_model():
    assert {spec.family for spec in REGISTRY.values()} <= set(TINY)


@pytest.mark.parametrize("family", sorted(TINY))
def test_export_dynamic_axes_and_parity(tmp_path, family, texts):
    TINY[family]().save_pretrained(tmp_path / "ckpt")
    minilm_tokenizer().save_pretrained(tmp_path / "ckpt")
    loaded = load_model(ModelSettings(name=str(tmp_path / "ckpt")))
    assert loaded.family == family
    settings = ExportSettings()
    path, report = onnx_from_torch(loaded, settings, tmp_path / "model.onnx", texts)
    model = onnx.load(path)
    assert model.opset_import[0].version >= 17
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)
    for v in [*model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch", v.name
        if v.name != "pooler_output":
            assert dims[1].dim_param == "sequence", v.name
    shapes = {(p.batch, p.sequence) for p in report.parity}
    assert shapes == {(b, s) for b in (1, 3) for s in (8, 33, 128)}
    assert {p.output for p in report.parity} == set(report.outputs)
    # independent of the exporter's own check: another shape, our own comparison
    assert UNSEEN not in shapes
    diffs = ort_against_torch(loaded, path, texts, *UNSEEN)
    assert set(diffs) == set(report.outputs) and max(diffs.values()) < 1e-4

    # Unchanged model and settings: the export is reused; a tighter tolerance fails with the names.
    _, again = onnx_from_torch(loaded, settings, path, texts)
    assert again.reused
    with pytest.raises(ExportParityError) as err:
        onnx_from_torch(loaded, dataclasses.replace(settings, parity_atol=1e-12), path, texts)
    assert "last_hidden_state at batch=" in str(err.value)


class ShapeBranch(torch.nn.Module):
    """Doubles its states when the sequence is longer than 16 tokens: the tracer records the
    branch the (2, 16) export dummy takes, so the graph never doubles (a broken export)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(30522, 8)

    def forward(self, input_ids, attention_mask, return_dict=True):
        from transformers.modeling_outputs import BaseModelOutput

        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        if input_ids.shape[1] > 16:
            h = h * 2
        return BaseModelOutput(last_hidden_state=h)


def test_broken_export_raises_parity_error_naming_the_output(tmp_path, texts):
    loaded = tiny_loaded(ShapeBranch().eval(), "export-shape-branch-v1", ["input_ids", "attention_mask"])
    with pytest.raises(ExportParityError) as err:
        onnx_from_torch(loaded, ExportSettings(), tmp_path / "broken.onnx", texts)
    failed = {(name, b, s) for name, b, s, _diff in err.value.failures}
    # every shape longer than 16 fails, every shorter one agrees
    assert failed == {("last_hidden_state", b, s) for b in (1, 3) for s in (33, 128)}
    assert "last_hidden_state at batch=1 sequence=33" in str(err.value)
    assert all(diff > 0.1 for *_, diff in err.value.failures)


class FixedLength(torch.nn.Module):
    """Reads the sequence length as a Python int, which the tracer records as the (2, 16) dummy's
    constant: `reshape` makes the graph fail to run at other lengths, `slice` makes it cut every
    longer sequence to 16 tokens (an output of the wrong shape)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.how = torch.nn.Embedding(30522, 8), how

    def forward(self, input_ids, attention_mask, return_dict=True):
        from transformers.modeling_outputs import BaseModelOutput

        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        length = int(input_ids.shape[1])
        h = h.reshape(-1, length, 8) if self.how == "reshape" else h[:, :length]
        return BaseModelOutput(last_hidden_state=h)


def test_a_graph_that_fails_to_run_at_a_parity_shape_is_a_parity_error(tmp_path, texts):
    loaded = tiny_loaded(FixedLength("reshape").eval(), "export-fixed-reshape-v1", ["input_ids", "attention_mask"])
    with pytest.raises(ExportParityError) as err:
        onnx_from_torch(loaded, ExportSettings(), tmp_path / "fixed.onnx", texts)
    assert err.value.run_error and "Reshape" in err.value.run_error
    assert "fails in ONNX Runtime at batch=1 sequence=8" in str(err.value)
    assert "dynamic shapes" in str(err.value)
    assert pickle.loads(pickle.dumps(err.value)).run_error == err.value.run_error  # crosses the child process


def test_an_output_of_the_wrong_shape_is_a_parity_failure(tmp_path, texts):
    loaded = tiny_loaded(FixedLength("slice").eval(), "export-fixed-slice-v1", ["input_ids", "attention_mask"])
    with pytest.raises(ExportParityError) as err:
        onnx_from_torch(loaded, ExportSettings(), tmp_path / "sliced.onnx", texts)
    failed = {(name, b, s) for name, b, s, _diff in err.value.failures}
    assert failed == {("last_hidden_state", b, s) for b in (1, 3) for s in (33, 128)}
    assert all(diff == float("inf") for *_, diff in err.value.failures)


def test_minilm_export_matches_pytorch_at_an_unseen_shape(tmp_path_factory, texts):
    loaded = minilm()
    assert loaded.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    path, outputs = minilm_export(minilm_dir(tmp_path_factory))
    assert outputs[0] == "last_hidden_state"
    diffs = ort_against_torch(loaded, path, texts, 2, 50)
    assert set(diffs) == set(outputs) and max(diffs.values()) < 1e-4


def test_an_opset_the_exporter_cannot_write_is_a_clear_error(tmp_path):
    from compiler.errors import CompilerError
    from compiler.settings import ExportSettings
    from compiler.training.export import max_export_opset, onnx_from_torch

    assert max_export_opset() >= 17
    with pytest.raises(CompilerError, match=f"--opset 30: .* exports ONNX opsets 17..{max_export_opset()}") as e:
        onnx_from_torch(None, ExportSettings(opset=30), tmp_path / "model.onnx", [])  # was exit 3 in torch.onnx
    assert e.value.exit_code == 1 and not (tmp_path / "model.onnx").exists()


class ExpertCounts(torch.nn.Module):
    """Counts tokens per id bucket with `torch.histc`, as mixture-of-experts routing does (Mixtral)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(30522, 8)

    def forward(self, input_ids, attention_mask, return_dict=True):
        from transformers.modeling_outputs import BaseModelOutput

        counts = torch.histc(input_ids.float(), bins=4, min=0, max=30522)
        return BaseModelOutput(last_hidden_state=self.embed(input_ids) * counts.sum())


def test_an_operator_the_exporter_cannot_write_is_a_clear_error(tmp_path, texts):
    from compiler.errors import CompilerError

    loaded = tiny_loaded(ExpertCounts().eval(), "export-histc-v1", ["input_ids", "attention_mask"])
    with pytest.raises(CompilerError, match="cannot write an operator this model runs: .*aten::histc"):
        onnx_from_torch(loaded, ExportSettings(), tmp_path / "moe.onnx", texts)  # was exit 3 (in a child:
        # "the worker process died ... out of memory")


class EvenOnly(torch.nn.Module):
    """Runs only at sequence lengths divisible by 8 (as Nystromformer's landmark segments need)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(30522, 8)

    def forward(self, input_ids, attention_mask, return_dict=True):
        from transformers.modeling_outputs import BaseModelOutput

        h = self.embed(input_ids)
        return BaseModelOutput(last_hidden_state=h.view(h.shape[0], -1, 8, 8).mean(dim=2))


def test_a_model_that_fails_in_pytorch_at_some_length_is_a_clear_error(tmp_path, texts):
    from compiler.errors import CompilerError

    loaded = tiny_loaded(EvenOnly().eval(), "export-even-only-v1", ["input_ids", "attention_mask"])
    with pytest.raises(CompilerError, match=r"PyTorch model itself fails at batch=1 sequence=4 \(RuntimeError: "
                                            r".*every batch and sequence length .* dynamic shapes"):  # was exit 3
        onnx_from_torch(loaded, ExportSettings(), tmp_path / "even.onnx", texts)


class _Fails(torch.nn.Module):
    def forward(self, *inputs, **kwargs):
        raise ValueError("Cannot get conv state for non linear attention layer 0")


def test_a_trace_that_fails_in_pytorch_too_blames_the_model_not_the_exporter():
    """A model that fails in plain PyTorch on the example inputs was exit 3 ("internal error");
    with a KV cache where it runs without one, the message names the cache and the task."""
    from types import SimpleNamespace

    from compiler.training.export import blame_the_model

    ids = torch.ones((2, 16), dtype=torch.long)
    runs_alone = SimpleNamespace(task="text-generation-with-past", module=lambda **kw: None)
    with pytest.raises(CompilerError, match=r"fails with its KV cache .*conv state.*and runs without one.*"
                                            r"Use --task text-generation"):
        blame_the_model(runs_alone, _Fails(), (ids, ids))
    broken = SimpleNamespace(task="text-generation-with-past", module=_Fails())
    with pytest.raises(CompilerError, match=r"the PyTorch model itself fails on the export's example inputs "
                                            r"\(2, 16\) \(ValueError: Cannot get conv state"):
        blame_the_model(broken, _Fails(), (ids, ids))
    blame_the_model(broken, torch.nn.Identity(), (ids,))  # PyTorch runs it: the exporter's error stands
