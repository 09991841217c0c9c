"""Tasks (compiler.training.tasks / heads / export): each task's graph on tiny checkpoints, its
outputs, parity with PyTorch, the KV cache's shapes, and greedy generation through the cache equal
to transformers' generate(do_sample=False) token for token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compiler.errors import CompilerError, UnknownModelError
from compiler.settings import ExportSettings, ModelSettings
from compiler.training.export import onnx_from_torch
from compiler.training.models import load_model
from compiler.training.tasks import natural_task, sentence_transformers_pooling
from tests.models import TINY_HIDDEN, TINY_INTER, TINY_LAYERS, minilm_tokenizer

PARITY = ExportSettings(parity_batches=(1, 2), parity_sequences=(5, 9))
TEXTS = ["The tower is the tallest building in the city and was finished in 1889 .",
         "A quiet film that never finds its footing , though the cast tries hard ."]


def _save(model, directory: Path) -> str:
    model.save_pretrained(str(directory))
    minilm_tokenizer().save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    import torch
    from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, \
        BertForTokenClassification, BertModel, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("tasks")
    torch.manual_seed(0)
    bert = BertConfig(hidden_size=TINY_HIDDEN, num_hidden_layers=TINY_LAYERS, num_attention_heads=2,
                      intermediate_size=TINY_INTER, vocab_size=30522)
    gpt2 = GPT2Config(n_embd=TINY_HIDDEN, n_layer=TINY_LAYERS, n_head=2, vocab_size=30522, n_positions=64,
                      bos_token_id=0, eos_token_id=0)
    out = {"base": _save(BertModel(bert), root / "base"),
           "cls": _save(BertForSequenceClassification(bert), root / "cls"),
           "qa": _save(BertForQuestionAnswering(bert), root / "qa"),
           "tok": _save(BertForTokenClassification(BertConfig(**{**bert.to_dict(), "num_labels": 5})), root / "tok"),
           "gpt2": _save(GPT2LMHeadModel(gpt2), root / "gpt2")}
    st = Path(_save(BertModel(bert), root / "st"))  # a sentence-transformers layout: CLS pooling, no Normalize
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    out["st"] = str(st)
    return out


def _export(tmp_path, name: str, task: str, weights: str = "pretrained"):
    loaded = load_model(ModelSettings(name=name, task=task, weights=weights))
    path, report = onnx_from_torch(loaded, PARITY, tmp_path / f"{task}.onnx", TEXTS)
    return loaded, path, report


@pytest.mark.parametrize("key, task, outputs", [
    ("st", "sentence-embedding", ["sentence_embedding"]),
    ("cls", "text-classification", ["logits"]),
    ("qa", "question-answering", ["start_logits", "end_logits"]),
    ("tok", "token-classification", ["logits"]),
    ("gpt2", "text-generation", ["logits"]),
])
def test_task_graph_outputs_and_parity(checkpoints, tmp_path, key, task, outputs):
    import onnx

    _, path, report = _export(tmp_path, checkpoints[key], task)
    assert report.outputs == outputs
    assert max(p.max_abs_diff for p in report.parity) <= PARITY.parity_atol
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    if task in ("question-answering", "token-classification", "text-generation"):
        assert dims[outputs[0]][:2] == ["batch", "sequence"]
    else:
        assert dims[outputs[0]][0] == "batch" and len(dims[outputs[0]]) == 2
    # only batch and sequence are dynamic: the hidden size / label count / vocabulary is static,
    # so the Triton config and the manifest state it (the tracer leaves a name after a Div)
    assert all(isinstance(d, int) and d > 0 for o in dims.values() for d in o[2 if task in (
        "question-answering", "token-classification", "text-generation") else 1:]), dims
    if task == "token-classification":
        assert dims["logits"] == ["batch", "sequence", 5]


def test_sentence_embedding_pools_as_configured(checkpoints, tmp_path):
    """The st checkpoint asks for CLS pooling without Normalize: the graph returns the CLS state."""
    import onnxruntime as ort
    import torch

    loaded, path, _ = _export(tmp_path, checkpoints["st"], "sentence-embedding")
    assert sentence_transformers_pooling(checkpoints["st"]).mode == "cls_token"
    enc = minilm_tokenizer()(TEXTS, padding=True, return_tensors="np")
    feeds = {n: enc[n].astype(np.int64) for n in loaded.input_names}
    got = ort.InferenceSession(str(path)).run(None, feeds)[0]
    with torch.no_grad():
        cls = loaded.module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(got, cls, atol=1e-5)


def test_fill_mask_on_random_weights_and_natural_tasks(checkpoints, tmp_path):
    from transformers import AutoConfig

    loaded, _, report = _export(tmp_path, checkpoints["base"], "fill-mask", weights="random")
    assert report.outputs == ["logits"] and type(loaded.module).__name__ == "BertForMaskedLM"
    assert natural_task(checkpoints["st"], AutoConfig.from_pretrained(checkpoints["st"])) == "sentence-embedding"
    assert natural_task(checkpoints["gpt2"], AutoConfig.from_pretrained(checkpoints["gpt2"])) == \
        "text-generation-with-past"
    assert natural_task(checkpoints["cls"], AutoConfig.from_pretrained(checkpoints["cls"])) == "text-classification"
    assert natural_task(checkpoints["tok"], AutoConfig.from_pretrained(checkpoints["tok"])) == "token-classification"
    assert natural_task(checkpoints["base"], AutoConfig.from_pretrained(checkpoints["base"])) == "feature-extraction"


def test_a_head_no_task_exports_falls_back_to_the_base_model_with_a_warning(tmp_path, caplog):
    from transformers import BertConfig

    config = BertConfig(architectures=["BertForMultipleChoice"])
    assert natural_task(tmp_path, config) == "feature-extraction"
    assert "BertForMultipleChoice names a head no task here exports" in caplog.text


def test_missing_head_is_refused_with_what_the_checkpoint_has(checkpoints):
    with pytest.raises(UnknownModelError, match="no weights for its head.*BertModel.*--weights random"):
        load_model(ModelSettings(name=checkpoints["base"], task="text-classification"))
    with pytest.raises(CompilerError, match="needs an encoder model"):
        load_model(ModelSettings(name=checkpoints["gpt2"], task="question-answering"))


def test_parity_stays_within_the_position_limit(checkpoints, tmp_path):
    """The tiny GPT-2 has 64 positions: a parity sequence of 64 checks the context pass there
    and skips the decode step (it would need position 65); longer sequences are capped."""
    from dataclasses import replace

    loaded = load_model(ModelSettings(name=checkpoints["gpt2"], task="text-generation-with-past"))
    texts = [" ".join(TEXTS * 8)] * 2
    _, report = onnx_from_torch(loaded, replace(PARITY, parity_batches=(1,), parity_sequences=(63, 64, 100)),
                                tmp_path / "p.onnx", texts)
    decode = sorted({p.output.split("past ")[1] for p in report.parity if "decode" in p.output})
    assert decode == ["63)"] and {p.sequence for p in report.parity} == {1, 63, 64}


def test_kv_cache_graph_shapes_and_parity(checkpoints, tmp_path):
    import onnxruntime as ort

    loaded, path, report = _export(tmp_path, checkpoints["gpt2"], "text-generation-with-past")
    assert report.inputs == ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(TINY_LAYERS)
                                                               for kv in ("key", "value")]
    assert report.outputs[1:] == [f"present.{i}.{kv}" for i in range(TINY_LAYERS) for kv in ("key", "value")]
    assert any("decode" in p.output for p in report.parity)
    assert max(p.max_abs_diff for p in report.parity) <= PARITY.parity_atol
    sess = ort.InferenceSession(str(path))
    past = np.random.default_rng(0).standard_normal((3, 2, 7, TINY_HIDDEN // 2)).astype(np.float32)
    feeds = {"input_ids": np.ones((3, 4), np.int64), "attention_mask": np.ones((3, 11), np.int64),
             **{n: past for n in report.inputs[2:]}}
    out = dict(zip(report.outputs, sess.run(None, feeds)))
    assert out["logits"].shape == (3, 4, 30522)
    assert out["present.0.key"].shape == (3, 2, 11, TINY_HIDDEN // 2)
    np.testing.assert_array_equal(out["present.1.value"][:, :, :7], past)  # the past is kept, new tokens appended


def test_generate_through_the_cache_equals_transformers_generate(checkpoints, tmp_path):
    import torch

    from compiler.eval.generate import greedy_generate, ort_step

    loaded, path, _ = _export(tmp_path, checkpoints["gpt2"], "text-generation-with-past")
    step, names, cache = ort_step(path)
    prompt = np.array([[101, 1996, 3578, 2003, 1996]], dtype=np.int64)
    cached = greedy_generate(step, names, cache, prompt, 12)
    fresh = greedy_generate(step, names, cache, prompt, 12, use_cache=False)
    with torch.no_grad():
        ref = loaded.module.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                                     max_new_tokens=12, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(cached.tokens, ref[:, prompt.shape[1]:].numpy())
    np.testing.assert_array_equal(fresh.tokens, cached.tokens)
    assert len(cached.logits) == 12 and cached.logits[0].shape == (1, 30522)
    with pytest.raises(ValueError, match="no KV-cache inputs"):
        _, path2, _ = _export(tmp_path, checkpoints["gpt2"], "text-generation")
        greedy_generate(*ort_step(path2), prompt, 2)


def test_a_tied_lm_head_cannot_lose_vocabulary():
    from compiler.settings import BuildSettings, PrecisionSettings, VocabSettings
    from compiler.training.tasks import check_training

    cls = ModelSettings(name="x", task="text-classification")
    check_training(BuildSettings(model=cls, precision=PrecisionSettings(mode="int8-qat")))  # distils the logits too
    with pytest.raises(CompilerError, match="vocab-tied"):
        check_training(BuildSettings(model=ModelSettings(name="gpt2", task="text-generation-with-past"),
                                     vocab=VocabSettings(texts=("a.txt",), tied=True)))
    check_training(BuildSettings(model=ModelSettings(name="x", task="sentence-embedding"),
                                 precision=PrecisionSettings(mode="int8-qat")))  # distils hidden states: fine


@pytest.mark.parametrize("config, task", [
    ("GPT2Config", "text-generation-with-past"),
    ("OpenAIGPTConfig", "text-generation"),  # no use_cache: its forward ignores past_key_values
    ("MambaConfig", "text-generation"),  # stateful: a recurrent state, no KV cache
])
def test_a_causal_lm_defaults_to_with_past_only_where_it_keeps_a_kv_cache(tmp_path, config, task):
    import transformers

    cfg = getattr(transformers, config)()
    cfg.architectures = [transformers.AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
    assert natural_task(tmp_path, cfg) == task


def test_a_cache_of_layers_unlike_each_other_is_refused_naming_text_generation():
    """Gemma 4's sliding and global layers have different head_dim: no one past_key_values shape
    (was exit 3 reading config.head_dim); a cache of a layer without keys is refused the same way."""
    import torch
    import transformers

    from compiler.training.tasks import cache_spec

    config = transformers.AutoConfig.for_model(
        "gemma4_text", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    module = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(CompilerError, match=r"layers by key shape: \{\(1, 1, 2, \d+\): 1, \(1, 1, 2, \d+\): 1\}.*"
                                             r"Use --task text-generation"):
        cache_spec(config, module)
    with pytest.raises(CompilerError, match=r"layers differ in their KV cache .*Use --task text-generation"):
        cache_spec(config)  # no module: the config's per-layer head_dim
