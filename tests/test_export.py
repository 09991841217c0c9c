"""Stage 1: export with dynamic axes, parity against PyTorch, reuse by content key."""

from __future__ import annotations

import dataclasses

import onnx
import pytest

from calibration import load_texts
from compiler.errors import ExportParityError, UnknownModelError
from compiler.training.export import onnx_from_torch
from compiler.training.models import REGISTRY, load_model
from compiler.settings import DataSettings, ExportSettings, ModelSettings

# A tiny checkpoint per family in REGISTRY: saved to a local directory, so that the local-directory
# loading path is what is tested.
TINY = {
    "encoder": ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
    "decoder": ("gpt2", dict(n_embd=32, n_layer=2, n_head=2, n_positions=256, vocab_size=30522)),
}


def _save_tiny(tmp_path, family: str):
    import torch
    from transformers import AutoConfig, AutoModel

    model_type, kwargs = TINY[family]
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    load_model(ModelSettings(name="minilm")).tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_every_registered_family_has_a_tiny_model():
    assert {spec.family for spec in REGISTRY.values()} <= set(TINY)


@pytest.fixture(scope="module")
def texts():
    return load_texts(DataSettings(samples=3))


@pytest.mark.parametrize("family", sorted(TINY))
def test_export_dynamic_axes_and_parity(tmp_path, family, texts):
    loaded = load_model(ModelSettings(name=str(_save_tiny(tmp_path / "ckpt", family))))
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
    assert max(p.max_abs_diff for p in report.parity) <= settings.parity_atol

    # Unchanged model and settings: the export is reused; a tighter tolerance fails with the names.
    _, again = onnx_from_torch(loaded, settings, path, texts)
    assert again.reused
    with pytest.raises(ExportParityError) as err:
        onnx_from_torch(loaded, dataclasses.replace(settings, parity_atol=1e-12), path, texts)
    assert "last_hidden_state at batch=" in str(err.value)


def test_minilm_export_parity(tmp_path, texts):
    loaded = load_model(ModelSettings(name="minilm"))
    assert loaded.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    _, report = onnx_from_torch(loaded, ExportSettings(), tmp_path / "minilm.onnx", texts)
    assert report.outputs[0] == "last_hidden_state"
    assert len(report.parity) == 12 and all(p.max_abs_diff < 1e-4 for p in report.parity)


def test_random_weights_use_standard_config_and_stand_in_tokenizer():
    loaded = load_model(ModelSettings(name="gpt2", weights="random"))
    assert loaded.module.config.n_layer == 12 and loaded.vocab_size == 50257
    assert "stands in" in loaded.tokenizer_note
    assert max(loaded.tokenizer.get_vocab().values()) < loaded.vocab_size


@pytest.mark.parametrize("name", ["no-such-model-xyz", "./missing/dir"])
def test_unknown_model_lists_known_names(name):
    with pytest.raises(UnknownModelError) as err:
        load_model(ModelSettings(name=name))
    msg = str(err.value)
    assert all(k in msg for k in REGISTRY) and "--weights random" in msg and "local directory" in msg
