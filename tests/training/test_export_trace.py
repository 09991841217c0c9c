"""`compiler.training.export.traced_onnx`: the export without PyTorch copying the weights into its
protobuf gives the plain export's model byte for byte (graph, names, initializers in order), for
an encoder, a decoder whose LM head is tied to its embeddings (the exporter's deduplicated
initializers), a classification head and a KV-cache graph; where the weights cannot all be put
back, the plain export runs."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from compiler.graph.onnx_io import load_onnx
from compiler.settings import ModelSettings
from compiler.training import export as export_module_
from compiler.training.export import export_module, traced_onnx
from compiler.training.models import load_model
from tests.models import minilm_tokenizer, tiny_bert, tiny_gpt2

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _checkpoint(path, kind):
    torch.manual_seed(0)
    if kind == "bert":
        model, task = tiny_bert(), None
    elif kind == "gpt2-lm":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=30522, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
        task = "text-generation"
    elif kind == "gpt2-past":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=30522, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
        task = "text-generation-with-past"
    elif kind == "bert-cls":
        model, task = BertForSequenceClassification(BertConfig(num_labels=3, **SMALL)), "text-classification"
    else:
        model, task = tiny_gpt2(), None
    model.save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return load_model(ModelSettings(name=str(path), task=task))


def _plain(loaded, path):
    """The reference: torch.onnx.export with its weights (export_params=True), loaded back."""
    wrapper = export_module(loaded)
    dummy, axes, names, outputs = _args(loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, dummy, str(path), input_names=names, output_names=outputs, dynamic_axes=axes,
                          opset_version=17, do_constant_folding=True, dynamo=False)
    return load_onnx(path, check=False)


def _args(loaded):
    from compiler.training.export import export_inputs, output_names

    outputs = output_names(loaded)
    return (*export_inputs(loaded, outputs), list(loaded.input_names), outputs)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "gpt2-lm", "gpt2-past", "bert-cls"])
def test_traced_export_is_the_plain_export_byte_for_byte(tmp_path, kind, monkeypatch):
    loaded = _checkpoint(tmp_path / "ckpt", kind)
    calls = []
    real_export = torch.onnx.export

    def spy(*args, **kwargs):
        calls.append(kwargs.get("export_params", True))
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    dummy, axes, names, outputs = _args(loaded)
    fast = traced_onnx(export_module(loaded), dummy, tmp_path / "fast.onnx", names, outputs, axes, 17)
    assert calls == [False]  # the weights were put back, no second export
    plain = _plain(loaded, tmp_path / "plain.onnx")
    assert len(fast.graph.initializer) == len(plain.graph.initializer) > 0
    assert [i.name for i in fast.graph.input] == [i.name for i in plain.graph.input]
    assert fast.SerializeToString() == plain.SerializeToString()


def test_the_plain_export_runs_when_the_weights_cannot_all_be_put_back(tmp_path, monkeypatch):
    loaded = _checkpoint(tmp_path / "ckpt", "bert")
    monkeypatch.setattr(export_module_, "_weights_back", lambda *a: False)
    calls = []
    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (calls.append(k.get("export_params")), real_export(*a, **k)))
    dummy, axes, names, outputs = _args(loaded)
    model = traced_onnx(export_module(loaded), dummy, tmp_path / "fast.onnx", names, outputs, axes, 17)
    assert calls == [False, True]
    assert model.SerializeToString() == _plain(loaded, tmp_path / "plain.onnx").SerializeToString()


def test_weights_not_all_accounted_for_leave_the_graph_alone(tmp_path):
    """A weight input missing from the captured weights, or one NumPy cannot hold (bfloat16):
    `_weights_back` says False and changes nothing, so the plain export runs."""
    from compiler.training.export import _weights_back

    loaded = _checkpoint(tmp_path / "ckpt", "bert")
    dummy, axes, names, outputs = _args(loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(export_module(loaded), dummy, str(tmp_path / "bare.onnx"), input_names=names,
                          output_names=outputs, dynamic_axes=axes, opset_version=17, dynamo=False,
                          export_params=False)
    bare = load_onnx(tmp_path / "bare.onnx", check=False)
    weights = {i.name: torch.zeros(2) for i in bare.graph.input if i.name not in names}
    assert weights and not bare.graph.initializer
    snapshot = bare.SerializeToString()
    missing = dict(list(weights.items())[1:])
    assert not _weights_back(bare, len(names), missing) and bare.SerializeToString() == snapshot
    bf16 = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    assert not _weights_back(bare, len(names), bf16) and bare.SerializeToString() == snapshot
    assert _weights_back(bare, len(names), weights)
    assert [i.name for i in bare.graph.input] == names and len(bare.graph.initializer) == len(weights)
