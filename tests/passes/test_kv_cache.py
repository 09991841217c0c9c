"""compiler/passes/kv_cache.py: an FP16 variant of a KV-cache graph takes and returns its cache in
FP16; the faithful FP16 reference and the generate loop run it; profiles cover the past axis."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.build.profiles import profile_shapes
from compiler.graph.analysis import FLOAT, FLOAT16
from compiler.settings import ExportSettings, ModelSettings, PrecisionSettings, ProfileSettings
from compiler.training.tasks import kv_cache_profiles
from tests.models import TINY_HIDDEN, TINY_LAYERS, minilm_tokenizer


@pytest.fixture(scope="module")
def cache_graph(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from compiler.training.export import onnx_from_torch
    from compiler.training.models import load_model

    root = tmp_path_factory.mktemp("kv")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=TINY_HIDDEN, n_layer=TINY_LAYERS, n_head=2, vocab_size=30522, n_positions=128,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(str(root / "ckpt"))
    minilm_tokenizer().save_pretrained(str(root / "ckpt"))
    loaded = load_model(ModelSettings(name=str(root / "ckpt"), task="text-generation-with-past"))
    path, _ = onnx_from_torch(loaded, ExportSettings(parity_batches=(1,), parity_sequences=(5,)),
                              root / "model.onnx", ["The tower is tall and old ."])
    return path


@pytest.mark.parametrize("mode", ["fp16", "hybrid"])
def test_fp16_variant_keeps_the_cache_fp16(cache_graph, mode):
    from compiler.eval.fp16_reference import fp16_emulation
    from compiler.eval.generate import greedy_generate, ort_step
    from compiler.graph.onnx_io import load_onnx
    from compiler.passes.kv_cache import fp16_cache_io
    from compiler.passes.precision import convert_precision

    variant, _ = convert_precision(load_onnx(cache_graph), PrecisionSettings(mode=mode))
    variant, report = fp16_cache_io(variant)
    types = {v.name: v.type.tensor_type.elem_type for v in [*variant.graph.input, *variant.graph.output]}
    assert len(report["fp16_inputs"]) == len(report["fp16_outputs"]) == 2 * TINY_LAYERS
    assert all(types[n] == FLOAT16 for n in report["fp16_inputs"] + report["fp16_outputs"])
    assert types["logits"] == FLOAT and not report["kept_fp32"]
    prompt = np.array([[101, 1996, 3578, 2003]], dtype=np.int64)
    ref = greedy_generate(*ort_step(cache_graph), prompt, 6)
    for graph in (variant, fp16_emulation(variant)):  # ORT on the FP16 graph, and the faithful reference
        got = greedy_generate(*ort_step(graph), prompt, 6)
        cos = [float((a @ b.T).item() / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(ref.logits, got.logits)]
        assert min(cos) > 0.999
    step, names, cache = ort_step(variant)
    out = step({"input_ids": prompt, "attention_mask": np.ones_like(prompt), **{c: c.empty(1) for c in cache}})
    assert out["present.0.key"].dtype == np.float16 and out["present.0.key"].shape[2] == prompt.shape[1]


def test_profiles_cover_the_past_and_the_mask_spans_past_plus_sequence():
    inputs = [("input_ids", (-1, -1)), ("attention_mask", (-1, -1)), ("past_key_values.0.key", (-1, 2, -1, 16))]
    context, decode = kv_cache_profiles(ProfileSettings(min_shape=(1, 1), opt_shape=(1, 128), max_shape=(8, 256)), 255)
    c, d = profile_shapes(inputs, context), profile_shapes(inputs, decode)
    assert c["past_key_values.0.key"] == {"min": (1, 2, 0, 16), "opt": (1, 2, 0, 16), "max": (8, 2, 0, 16)}
    assert c["attention_mask"]["max"] == (8, 256)
    assert d["input_ids"] == {"min": (1, 1), "opt": (1, 1), "max": (8, 1)}
    assert d["past_key_values.0.key"]["max"] == (8, 2, 255, 16) and d["past_key_values.0.key"]["min"][2] == 1
    assert d["attention_mask"] == {"min": (1, 2), "opt": (1, 128), "max": (8, 256)}
    with pytest.raises(ValueError, match="profile past"):
        ProfileSettings(min_past=3, opt_past=2, max_past=4)


def test_resolve_task_gives_the_cache_graph_two_profiles():
    from compiler.settings import BuildSettings
    from compiler.training.models import resolve_task

    s = resolve_task(BuildSettings(model=ModelSettings(name="gpt2", weights="random", task="text-generation-with-past")))
    assert [(p.max_shape, p.min_past, p.max_past) for p in s.engine.profiles] == [((32, 512), 0, 0), ((32, 1), 1, 511)]
    plain = resolve_task(BuildSettings(model=ModelSettings(name="gpt2", weights="random")))
    assert plain.model.task is None and len(plain.engine.profiles) == 1


def test_int8_pipeline_on_a_cache_graph(cache_graph, tmp_path):
    """Calibration, Q/DQ, the precision pass and verify all run a KV-cache graph (empty past):
    the INT8 variant keeps its cache FP16, and the report carries the task metrics and greedy
    generation through the cache against FP32."""
    from compiler.pipeline import run_pipeline
    from compiler.settings import BuildSettings, DataSettings, EngineSettings

    ckpt = str(cache_graph.parent / "ckpt")
    settings = BuildSettings(
        model=ModelSettings(name=ckpt, task="text-generation-with-past"), precision=PrecisionSettings(mode="int8"),
        data=DataSettings(samples=4, calib_samples=8, max_length=32),
        export=ExportSettings(parity_batches=(1,), parity_sequences=(8,)), output_dir=str(tmp_path),
        engine=EngineSettings(profiles=(ProfileSettings(opt_shape=(1, 32), max_shape=(2, 64)),)))
    report = run_pipeline(settings, until="verify").report
    assert len(report["precision"]["kv_cache"]["fp16_inputs"]) == 2 * TINY_LAYERS
    task = report["fidelity"]["task"]
    assert task["task"] == "text-generation-with-past" and task["top1_token_agreement"] > 0.9
    assert task["generation"]["prompts"] >= 1 and task["generation"]["logits_cosine_min"] > 0.99
    assert report["fidelity"]["real"]["outputs"]["present.0.key"]["cosine_min"] > 0.99
