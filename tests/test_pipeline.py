"""compiler/pipeline.py end to end on a tiny BERT checkpoint: auto precision, INT8 PTQ, INT8 QAT,
2:4 sparsity and sparse QAT (the TensorRT 8 recipe), each through `run_pipeline`.

Fidelity figures are checked against an independent measure: the verify stage and the budgets
that chose the variant (auto's search, the INT8 loop, QAT's report) measure the same graph on the
same held-out text against the same dense FP32 reference, so their figures must agree."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest

from calibration.layout import TokenSets
from compiler.eval.verify import verify_variant
from compiler.pipeline import run_pipeline
from compiler.settings import (BuildSettings, DataSettings, EngineSettings, ModelSettings, PrecisionSettings,
                               QuantSettings, SparsitySettings, TrainSettings)

LAYERS, LINEARS_PER_LAYER = 2, 6  # query, key, value, attention output, FFN in, FFN out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    from compiler.training.models import load_model

    path = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
                        vocab_size=30522)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    load_model(ModelSettings(name="minilm")).tokenizer.save_pretrained(path)
    return path


def settings_for(tiny_bert, out, mode, **kw) -> BuildSettings:
    return BuildSettings(
        model=ModelSettings(name=str(tiny_bert)),
        precision=PrecisionSettings(mode=mode),
        data=DataSettings(samples=8, calib_samples=16, train_samples=16, max_length=32, batch_size=8,
                          cache_dir=str(out / "cache")),
        quant=QuantSettings(min_cosine=0.9, max_excluded=2, sensitivity_samples=4),
        train=TrainSettings(steps=3, lr=1e-4, batch_size=4),
        output_dir=str(out), **kw)


def ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_int8_ptq_composes_with_hybrid(tiny_bert, tmp_path):
    settings = settings_for(tiny_bert, tmp_path, "int8")
    state = run_pipeline(settings, until="verify")
    q = state.report["quantization"]
    assert q["quantized_matmuls"] >= LAYERS * LINEARS_PER_LAYER and q["int8_mac_fraction"] > 0.5
    assert q["method"] == "max" and q["float_mode"] == "hybrid"
    assert state.qdq_onnx.name == "model.qdq.onnx" and state.reference_onnx.name == "model.fp32.opset19.onnx"
    model = onnx.load(str(state.variant_onnx))
    counts = ops(model)
    assert counts["QuantizeLinear"] >= 1 and counts["DequantizeLinear"] >= q["quantized_matmuls"]
    assert counts["LayerNormalization"] == 2 * LAYERS + 1  # hybrid: the rest is FP16 with FP32 islands
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert state.report["fidelity"]["real"]["nonfinite_count"] == 0
    # verify measures the graph the INT8 budget measured last, on the same held-out text: reused
    assert state.report["fidelity"]["real"]["reused"] is True
    saved = json.loads((settings.variant_dir() / "quant_report.json").read_text())
    assert saved["ptq"]["thresholds"] and saved["summary"]["quantized_matmuls"] == q["quantized_matmuls"]
    # unchanged inputs: the Q/DQ graph is reused by its content key
    again = run_pipeline(settings, until="quantize")
    assert again.report["quantization"] == q


def test_int8_qat_keeps_ptq_placement(tiny_bert, tmp_path):
    base = settings_for(tiny_bert, tmp_path, "int8-qat")
    settings = replace(base, quant=replace(base.quant, qat_fallback=False))  # the fine-tuned graph, always
    state = run_pipeline(settings, until="verify")
    saved = json.loads((settings.variant_dir() / "quant_report.json").read_text())
    assert sorted(saved["qat"]["quantized_nodes"]) == sorted(saved["ptq"]["quantized_nodes"])
    assert saved["training"]["steps"] == 3 and saved["qat_export"]["parity_worst"] < 1e-3
    assert {"ptq_same_placement", "qat"} <= set(saved["heldout"])
    assert state.report["quantization"]["method"] == "qat"
    counts = ops(onnx.load(str(state.variant_onnx)))
    assert counts["DequantizeLinear"] >= saved["summary"]["quantized_matmuls"]
    # QAT's own report and verify measure the same graph on the same text
    real = state.report["fidelity"]["real"]
    assert real["cosine_min"] == pytest.approx(saved["heldout"]["qat"]["cosine_min"], abs=1e-6)
    assert real["cosine_mean"] > 0.9 and real["nonfinite_count"] == 0


def test_int8_qat_that_got_worse_ships_ptq(tiny_bert, tmp_path):
    """A learning rate that wrecks the weights: QAT's held-out cosine falls below PTQ's, so the
    stage ships PTQ's graph (same placement) and says so; verify measures what was shipped."""
    settings = replace(settings_for(tiny_bert, tmp_path, "int8-qat"), train=TrainSettings(steps=3, lr=1.0))
    state = run_pipeline(settings, until="verify")
    saved = json.loads((settings.variant_dir() / "quant_report.json").read_text())
    ptq, qat = saved["heldout"]["ptq_same_placement"], saved["heldout"]["qat"]
    assert qat["cosine_min"] < ptq["cosine_min"]
    assert saved["summary"]["qat_kept"] is False and saved["summary"]["method"] == "ptq (qat rejected)"
    assert state.report["fidelity"]["real"]["cosine_min"] == pytest.approx(ptq["cosine_min"], abs=1e-6)


def test_sparsity_2_4_sets_sparse_weights_and_keeps_dense_reference(tiny_bert, tmp_path):
    settings = settings_for(tiny_bert, tmp_path, "fp16", sparsity=SparsitySettings(pattern="2:4", recover_samples=16,
                                                                                 recover_steps=2, recover_batch_size=2))
    state = run_pipeline(settings, until="verify")
    sp = state.report["sparsity"]
    assert len(sp["prune"]["pruned"]) == LAYERS * LINEARS_PER_LAYER
    assert sp["variant_check"]["eligible"] == LAYERS * LINEARS_PER_LAYER  # FP16 kept every zero
    assert sp["variant_check"]["sparse_weights_flag"] is True
    assert state.fp32_onnx.parent == settings.model_dir() / "sparse24"
    assert state.reference_onnx.parent == settings.model_dir()  # fidelity against the dense model
    assert settings.variant_dir() == settings.model_dir() / "sparse24" / "fp16"
    assert sp["recovery"]["steps"] == 2
    # the held-out curve: before the first step and after each (the 5 % progress points of 2 steps)
    assert [p[0] for p in sp["recovery"]["curve"]] == [0, 1, 2]
    assert all(-1.0 <= p[2] <= 1.0 for p in sp["recovery"]["curve"])
    assert sp["recovery"]["bf16"] in (True, False) and sp["recovery"]["train_text"]
    assert sp["recovery"]["batch_size"] == 2 != settings.train.batch_size  # the recovery's own batch
    # the sparse FP16 variant against the DENSE FP32 model: pruning half the weights moves the
    # outputs (cosine below 1), two recovery steps do not make them non-finite
    real = state.report["fidelity"]["real"]
    assert 0.3 < real["cosine_min"] < 0.9999 and real["nonfinite_count"] == 0


def test_sparse_weights_flag_follows_the_graph(tiny_bert, tmp_path):
    from compiler.build.engine import sparse_weights_flag

    dense = settings_for(tiny_bert, tmp_path, "fp16")
    state = run_pipeline(dense, until="precision")
    assert sparse_weights_flag(state.variant_onnx, dense.engine)[0] is False
    flag, check = sparse_weights_flag(state.variant_onnx, replace(dense.engine, sparse_weights=True))
    assert flag is True and check["forced"] and check["eligible"] == 0
    assert EngineSettings().sparse_weights is None  # default: decided by the graph


def test_sparse_int8_qat_keeps_the_pattern_in_int8_weights(tiny_bert, tmp_path):
    sparse = SparsitySettings(pattern="2:4", recover_samples=16, recover_steps=2)
    first = run_pipeline(settings_for(tiny_bert, tmp_path, "fp16", sparsity=sparse), until="sparsity")
    settings = settings_for(tiny_bert, tmp_path, "int8-qat", sparsity=sparse)
    state = run_pipeline(settings, until="verify")  # QAT starts from the saved, recovered weights
    assert state.report["sparsity"]["recovery"] == first.report["sparsity"]["recovery"]  # reused, not redone
    assert (settings.base_dir() / "student.safetensors").is_file()
    check = state.report["sparsity"]["variant_check"]
    assert check["eligible"] == LAYERS * LINEARS_PER_LAYER and check["sparse_weights_flag"] is True
    assert state.report["quantization"]["quantized_matmuls"] >= LAYERS * LINEARS_PER_LAYER
    real = state.report["fidelity"]["real"]
    assert 0.3 < real["cosine_min"] < 0.9999 and real["nonfinite_count"] == 0


def test_sparse_int8_qat_on_a_classifier_trains_towards_its_logits(tiny_bert, tmp_path):
    """2:4 + QAT on a head task (`--task text-classification`): the distillation matches the last
    block's output and the head's logits; the classifier and pooler stay dense, QAT quantizes
    the classifier too, and verify reports label agreement."""
    import torch
    from transformers import BertForSequenceClassification

    cls_dir = tmp_path / "cls"
    torch.manual_seed(1)
    BertForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3).save_pretrained(cls_dir)
    for f in Path(tiny_bert).iterdir():  # the tokenizer's files
        if f.is_file() and not (cls_dir / f.name).exists():
            (cls_dir / f.name).write_bytes(f.read_bytes())
    sparse = SparsitySettings(pattern="2:4", recover_samples=16, recover_steps=2)
    settings = replace(settings_for(cls_dir, tmp_path, "int8-qat", sparsity=sparse),
                       model=ModelSettings(name=str(cls_dir), task="text-classification"))
    state = run_pipeline(settings, until="verify")
    sp = state.report["sparsity"]
    assert len(sp["prune"]["pruned"]) == LAYERS * LINEARS_PER_LAYER
    assert not any(n.startswith(("classifier", "bert.pooler")) for n in sp["prune"]["pruned"])
    assert sp["recovery"]["loss_first"] > 0
    saved = json.loads((settings.variant_dir() / "quant_report.json").read_text())
    assert saved["training"]["steps"] == 3
    assert any("classifier" in n for n in saved["qat"]["quantized_nodes"])
    assert 0 <= state.report["fidelity"]["task"]["label_agreement"] <= 1


def test_sparse_recovery_continues_from_an_earlier_student(tiny_bert, tmp_path):
    """`recover_from` starts the recovery from a saved 2:4 student: its zeros are the masks and
    stay zero; a student that is not 2:4, or this run's own output, is refused with the fix."""
    import torch
    from safetensors.torch import load_file, save_file

    from compiler.errors import CompilerError

    sparse = SparsitySettings(pattern="2:4", recover_samples=16, method="magnitude", recover_steps=2)
    first = run_pipeline(settings_for(tiny_bert, tmp_path / "a", "fp16", sparsity=sparse), until="sparsity")
    saved = first.report["sparsity"]["weights"]
    before = load_file(saved)
    more = replace(sparse, recover_steps=3, recover_lr=1e-4, recover_from=saved)
    second = run_pipeline(settings_for(tiny_bert, tmp_path / "b", "fp16", sparsity=more), until="sparsity")
    rep = second.report["sparsity"]
    assert rep["recovery"]["steps"] == 3 and rep["prune"]["method"].startswith("from ")
    assert rep["check"]["eligible"] == LAYERS * LINEARS_PER_LAYER
    after = load_file(rep["weights"])
    for name in rep["prune"]["pruned"]:
        w0, w1 = before[name + ".weight"], after[name + ".weight"]
        assert torch.equal(w1 == 0, w0 == 0) and not torch.equal(w1, w0)  # same masks, trained on
    dense = dict(before)
    dense[rep["prune"]["pruned"][0] + ".weight"] = torch.ones_like(dense[rep["prune"]["pruned"][0] + ".weight"])
    save_file(dense, str(tmp_path / "dense.safetensors"))
    bad = replace(more, recover_from=str(tmp_path / "dense.safetensors"))
    with pytest.raises(CompilerError, match="is not 2:4"):
        run_pipeline(settings_for(tiny_bert, tmp_path / "c", "fp16", sparsity=bad), until="sparsity")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00 not a safetensors file")
    with pytest.raises(CompilerError, match="does not fit this model"):  # one line, not a SafetensorError
        run_pipeline(settings_for(tiny_bert, tmp_path / "c", "fp16",
                                  sparsity=replace(more, recover_from=str(tmp_path / "corrupt.safetensors"))),
                     until="sparsity")
    with pytest.raises(CompilerError, match="another --output-dir"):
        run_pipeline(settings_for(tiny_bert, tmp_path / "a", "fp16", sparsity=replace(more, recover_from=saved)),
                     until="sparsity")
    with pytest.raises(CompilerError, match="no such file"):
        run_pipeline(settings_for(tiny_bert, tmp_path / "c", "fp16",
                                  sparsity=replace(more, recover_from=str(tmp_path / "nothing.safetensors"))),
                     until="sparsity")


def test_qat_with_zero_steps_starts_where_ptq_ends(tiny_bert, tmp_path):
    # SmoothQuant factors and PTQ thresholds carried into PyTorch: before any training step the
    # QAT graph computes what the PTQ graph computes.
    settings = replace(settings_for(tiny_bert, tmp_path, "int8-qat"), train=TrainSettings(steps=0))
    run_pipeline(settings, until="quantize")
    saved = json.loads((settings.variant_dir() / "quant_report.json").read_text())
    assert saved["ptq"]["smoothquant_alpha"] == 0.8 and saved["ptq"]["smoothquant"]["tensors"]
    ptq, qat = saved["heldout"]["ptq_same_placement"], saved["heldout"]["qat"]
    assert abs(qat["cosine_mean"] - ptq["cosine_mean"]) < 1e-3
    assert abs(qat["cosine_min"] - ptq["cosine_min"]) < 2e-3


def test_qat_of_a_sentence_transformers_chain_with_a_dense_layer(tiny_bert, tmp_path):
    """The Dense layer after the pooling lies outside the model QAT fine-tunes: it keeps PTQ's
    smoothing and scale (was refused, naming --precision int8). Zero steps: QAT computes PTQ's graph."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(1)
    word = models.Transformer(str(tiny_bert))
    dense = models.Dense(32, 16, activation_function=torch.nn.Tanh())
    SentenceTransformer(modules=[word, models.Pooling(32, pooling_mode="mean"), dense, models.Normalize()],
                        device="cpu").save(str(tmp_path / "st-dense"))
    settings = replace(settings_for(tmp_path / "st-dense", tmp_path, "int8-qat"), train=TrainSettings(steps=0))
    settings = replace(settings, model=replace(settings.model, task="sentence-embedding"))
    run_pipeline(settings, until="quantize")
    saved = json.loads((settings.variant_dir() / "quant_report.json").read_text())
    assert any(n.startswith("/dense.0/") for n in saved["qat"]["quantized_nodes"])
    ptq, qat = saved["heldout"]["ptq_same_placement"], saved["heldout"]["qat"]
    assert abs(qat["cosine_min"] - ptq["cosine_min"]) < 1e-4  # without PTQ's smoothing on the Dense: 0.97 vs 0.9999


def test_auto_meets_its_budget_and_verify_agrees(tiny_bert, tmp_path):
    settings = settings_for(tiny_bert, tmp_path, "auto")
    state = run_pipeline(settings, until="verify")
    search = state.report["precision"]["search"]
    assert search["budget"]["met"] is True and search["evaluations"] >= 1
    real = state.report["fidelity"]["real"]
    # auto's budget and verify: the same variant, text and reference, so verify reads the
    # budget's figures back (content-keyed) instead of running the variant again ...
    assert real["reused"] is True and state.report["fidelity"]["random"]["reused"] is False
    assert real["cosine_min"] == pytest.approx(search["heldout_fidelity"]["cosine_min"], abs=1e-9)
    assert real["cosine_min"] >= settings.precision.min_cosine and real["nonfinite_count"] == 0
    # ... and they are what an independent measure of the saved graph, without any cache, gives
    heldout = TokenSets(settings.data, state.loaded.tokenizer, settings.train.batch_size,
                        heldout=state.export.heldout_texts).heldout
    again = verify_variant(str(state.reference_onnx), onnx.load(str(state.variant_onnx)), state.output_names,
                           heldout, settings.data.batch_size, 30522)
    assert {k: v for k, v in again["real"].items() if k not in ("seconds", "reused")} == \
        {k: v for k, v in real.items() if k not in ("seconds", "reused")}
    # the FP32 references: real text from the budget, random ids from the statistics pass (the
    # same set); an uncached reference run gives the same random-id figures
    assert set(state.report["fidelity"]["fp32_outputs_reused"]) == {"real", "random"}
    assert again["fp32_outputs_reused"] == []
    rand = state.report["fidelity"]["random"]
    assert again["random"]["cosine_min"] == pytest.approx(rand["cosine_min"], abs=1e-6)
    assert again["random"]["max_abs_err"] == pytest.approx(rand["max_abs_err"], rel=1e-3, abs=1e-6)
    report = json.loads((settings.variant_dir() / "report.json").read_text())
    assert report["settings"]["precision"]["mode"] == "auto" and report["variant"] == "auto"


def test_token_sets_are_built_once_per_run(tiny_bert, tmp_path, monkeypatch):
    import calibration.layout as layout

    calls = []
    real_tokenized_set = layout.tokenized_set
    monkeypatch.setattr(layout, "tokenized_set", lambda texts, *a, **k: calls.append(tuple(texts))
                        or real_tokenized_set(texts, *a, **k))
    run_pipeline(settings_for(tiny_bert, tmp_path, "int8"), until="verify")
    # calibration (INT8 thresholds) and held-out (budget, verify): one tokenization each
    assert len(calls) == 2 and len(set(calls)) == 2
    assert sorted(len(c) for c in calls) == [8, 16]


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="until='deploy'"):
        run_pipeline(BuildSettings(), until="deploy")


def test_vocabulary_pruning_keeps_domain_outputs_and_the_contract(tiny_bert, tmp_path):
    """`--prune-vocab`: the engine still takes the original ids; on the domain text (every token
    kept) the pruned FP32 graph gives the unpruned outputs exactly; general text shows its OOV."""
    from compiler.settings import VocabSettings

    domain = tmp_path / "domain.txt"
    domain.write_text("\n".join(["the film is a charming and often affecting journey of the heart ."] * 3
                                 + ["a dull , lifeless movie that never finds its way ."] * 3) + "\n")
    settings = settings_for(tiny_bert, tmp_path, "hybrid", vocab=VocabSettings(texts=(str(domain),)))
    state = run_pipeline(settings, until="verify")
    v = state.report["vocabulary"]
    assert settings.variant_dir().name == "hybrid-vocab" and state.variant_onnx.parent == settings.variant_dir()
    assert 5 < v["kept"] < 40 and v["vocab_size"] == 30522  # the words above, their pieces, the specials
    # the kept rows of the 32-wide table, plus the int32 remap (one entry per original id)
    assert v["embedding_params_before"] == 30522 * 32 and v["embedding_params_after"] == v["kept"] * 32 + 30522
    assert v["onnx_mib"]["after"] < v["onnx_mib"]["before"]
    assert v["oov_rate"]["domain"] == 0.0 and v["oov_rate"]["heldout"] > 0.3  # WikiText-2 is not this domain
    dom = v["fidelity_vs_unpruned"]["domain"]
    # FP32 rounding only: ONNX Runtime optimizes the reference's graph, not the measured one
    assert dom["max_abs_err"] < 1e-5 and dom["cosine_min"] == pytest.approx(1.0, abs=1e-9)
    held = v["fidelity_vs_unpruned"]["heldout"]
    assert held["cosine_min"] < dom["cosine_min"]  # out-of-vocabulary tokens do change outputs
    model = onnx.load(str(state.variant_onnx))
    ids = next(i for i in model.graph.input if i.name == "input_ids")
    assert ids.type.tensor_type.elem_type == onnx.TensorProto.INT64  # the tokenizer's ids, unchanged
    assert state.report["fidelity"]["real"]["nonfinite_count"] == 0


def test_vocabulary_pruning_composes_with_int8(tiny_bert, tmp_path):
    """The vocab stage runs on the Q/DQ graph (the embedding Gather is not quantized)."""
    from compiler.settings import VocabSettings

    domain = tmp_path / "domain.txt"
    domain.write_text("a charming and often affecting journey .\nthe film never finds its way .\n")
    settings = settings_for(tiny_bert, tmp_path, "int8", vocab=VocabSettings(texts=(str(domain),)))
    state = run_pipeline(settings, until="verify")
    counts = ops(onnx.load(str(state.variant_onnx)))
    assert counts["DequantizeLinear"] >= state.report["quantization"]["quantized_matmuls"]  # one per INT8 weight
    assert state.report["vocabulary"]["kept"] < 40
    dom = state.report["vocabulary"]["fidelity_vs_unpruned"]["domain"]  # against the unpruned Q/DQ graph
    assert dom["max_abs_err"] < 1e-5 and state.report["fidelity"]["real"]["nonfinite_count"] == 0


def test_vocabulary_pruning_leaves_out_tokenizer_ids_past_the_table(tiny_bert, tmp_path):
    """A tokenizer with an added special token the embedding table has no row for (30522 of a
    30522-row table): was exit 3 in the pass ("kept ids must be ... within [0, 30522)")."""
    import shutil

    from transformers import AutoTokenizer

    from compiler.settings import VocabSettings

    model = shutil.copytree(tiny_bert, tmp_path / "added-token")
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tok.save_pretrained(model)
    assert tok.convert_tokens_to_ids("<|extra|>") == 30522
    domain = tmp_path / "domain.txt"
    domain.write_text("a charming and often affecting journey .\nthe film never finds its way .\n")
    settings = settings_for(model, tmp_path, "fp32", vocab=VocabSettings(texts=(str(domain),)))
    v = run_pipeline(settings, until="verify").report["vocabulary"]
    assert v["vocab_size"] == 30522 and 5 < v["kept"] < 40


def test_a_stale_report_is_dropped_and_an_unchanged_one_not_rewritten(tmp_path):
    from compiler.pipeline import _drop_stale_report, write_report

    path = tmp_path / "report.json"
    path.write_text(json.dumps({"onnx_sha256": "old"}))
    _drop_stale_report(path, "new")
    assert not path.exists()  # an earlier run's report never stays beside a new graph
    write_report(path, {"onnx_sha256": "new", "fidelity": {"real": {"cosine_min": 0.5, "seconds": 1.0}}})
    stamp = path.stat().st_mtime_ns
    _drop_stale_report(path, "new")
    write_report(path, {"onnx_sha256": "new", "fidelity": {"real": {"cosine_min": 0.5, "seconds": 2.0}}})
    assert path.stat().st_mtime_ns == stamp  # only a wall time differs: not written (read-only folders)
    write_report(path, {"onnx_sha256": "new", "fidelity": {"real": {"cosine_min": 0.6, "seconds": 2.0}}})
    assert json.loads(path.read_text())["fidelity"]["real"]["cosine_min"] == 0.6
