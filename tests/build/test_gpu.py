"""compiler.build.engine on a real GPU: build engines, run them, compare with ONNX Runtime FP32.

Needs TensorRT 11 and an NVIDIA GPU, both found the way the builder finds them (TensorRT's
import, the CUDA driver through `compiler.build.device`; no PyTorch CUDA); skipped with the
reason where either is missing. Each built engine is run with Polygraphy's `TrtRunner` and
compared, on the same real-text inputs, with Polygraphy's `OnnxrtRunner` on the FP32 ONNX
(the independent reference): a hybrid FP16/FP32 tiny BERT, its INT8 Q/DQ graph, and a 2:4
pruned FP16 graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.build.device import find_gpu
from compiler.build.engine import MANIFEST_NAME, PLAN_NAME, engine_from_onnx
from compiler.errors import EngineBuildError
from compiler.settings import (
    BuildSettings,
    DataSettings,
    EngineSettings,
    ExportSettings,
    ModelSettings,
    PrecisionSettings,
    ProfileSettings,
    QuantSettings,
    SparsitySettings,
)
from tests.build.gpu_tier import gpu_marks


pytestmark = gpu_marks()

HIDDEN, OUT = 8, 4
PROFILES = (
    ProfileSettings(min_shape=(1, 1), opt_shape=(2, 8), max_shape=(4, 16)),
    ProfileSettings(min_shape=(1, 1), opt_shape=(8, 32), max_shape=(16, 64)),
)
BERT_PROFILE = ProfileSettings(min_shape=(1, 1), opt_shape=(4, 32), max_shape=(8, 64))
LAYERS, LINEARS_PER_LAYER = 2, 6  # query, key, value, attention output, FFN in, FFN out
# Weights ~ N(0, 0.2) rather than BERT's 0.02: at 0.02 the two layers barely move the residual
# stream (the output's cosine to the embeddings is 0.9999), so an engine that got the layers
# wrong would still match; at 0.2 that cosine is ~0.3.
INIT_RANGE = 0.2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- a hand-made graph: manifest, timing cache, parser errors ----------------------------------


def _matmul_add_onnx(path: Path) -> Path:
    """y = Cast32(Cast16(x) @ W + b): FP16 weights, FP32 I/O, dynamic batch and sequence.

    Saved with external data so that parsing from the file must find `model.onnx.data`.
    """
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((HIDDEN, OUT)).astype(np.float16), "W")
    bias = numpy_helper.from_array(rng.standard_normal(OUT).astype(np.float16), "b")
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], name="cast_in", to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["x16", "W"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "b"], ["y16"], name="add"),
        helper.make_node("Cast", ["y16"], ["y"], name="cast_out", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "matmul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", OUT])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path


def _settings(tmp_path: Path, profiles=PROFILES, mode="fp16", **engine) -> BuildSettings:
    return BuildSettings(
        model=ModelSettings(name="tiny-matmul", weights="random"),
        precision=PrecisionSettings(mode=mode),
        engine=EngineSettings(
            profiles=profiles, workspace_mib=256, optimization_level=1,
            timing_cache_dir=str(tmp_path / "timing_cache"), **engine,
        ),
        output_dir=str(tmp_path / "engines"),
    )


def _run_plan(plan_path: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs of the engine at `plan_path` on each feed dict (Polygraphy's TrtRunner)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(plan_path.read_bytes())) as runner:
        return [{k: np.array(v) for k, v in runner.infer(feed).items()} for feed in feeds]


def test_engine_and_manifest(tmp_path):
    import tensorrt as trt

    onnx_path = _matmul_add_onnx(tmp_path / "model.onnx")
    report = {"precision": {"mode": "fp16"}, "fidelity": {"max_abs_diff": 0.01}}

    plan_path, manifest = engine_from_onnx(onnx_path, _settings(tmp_path), report)

    assert plan_path == onnx_path.parent / PLAN_NAME
    assert json.loads((plan_path.parent / MANIFEST_NAME).read_text()) == manifest
    assert manifest["model"] == {"name": "tiny-matmul", "weights": "random"}
    assert manifest["variant"] == "fp16"
    assert manifest["tensorrt_version"] == trt.__version__
    assert manifest["gpu"] == find_gpu().to_dict()  # find_gpu is checked against nvidia-smi
    assert manifest["profiles"] == [
        {"x": {"min": [1, 1, HIDDEN], "opt": [2, 8, HIDDEN], "max": [4, 16, HIDDEN]}},
        {"x": {"min": [1, 1, HIDDEN], "opt": [8, 32, HIDDEN], "max": [16, 64, HIDDEN]}},
    ]
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, -1, HIDDEN]}]
    assert manifest["outputs"] == [{"name": "y", "dtype": "float32", "shape": [-1, -1, OUT]}]
    assert manifest["plan"] == {"file": PLAN_NAME, "bytes": plan_path.stat().st_size,
                                "sha256": _sha256(plan_path)}
    assert manifest["onnx"] == {"path": str(onnx_path), "sha256": _sha256(onnx_path)}
    assert manifest["build_seconds"] > 0
    # The timing cache is named after the GPU and the TensorRT version, in timing_cache_dir.
    gpu = manifest["gpu"]
    slug = "-".join(w for w in "".join(c if c.isalnum() or c == "." else " "
                                       for c in gpu["name"].lower()).split())
    expected_cache = (tmp_path / "timing_cache"
                      / f"{slug}_cc{gpu['compute_capability']}_trt{trt.__version__}.cache")
    assert manifest["builder"] == {
        "workspace_mib": 256, "optimization_level": 1, "sparse_weights": False,
        "strongly_typed": True, "timing_cache": str(expected_cache),
    }
    assert list((tmp_path / "timing_cache").iterdir()) == [expected_cache]
    assert expected_cache.stat().st_size > 0
    assert manifest["precision"] == report["precision"]
    assert manifest["fidelity"] == report["fidelity"]
    assert manifest["quantization"] is None

    # Run it (profile 0: batch 1..4, sequence 1..16) against NumPy on the same FP16 weights.
    model = onnx.load(str(onnx_path))
    weights = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((b, s, HIDDEN)).astype(np.float32)} for b, s in ((3, 5), (1, 16))]
    for feed, out in zip(feeds, _run_plan(plan_path, feeds)):
        expected = feed["x"].astype(np.float16).astype(np.float32) @ weights["W"] + weights["b"]
        assert out["y"].shape == expected.shape
        np.testing.assert_allclose(out["y"], expected, rtol=1e-2, atol=1e-2)


def test_rebuild_reuses_timing_cache_and_forced_sparse_flag(tmp_path, caplog):
    onnx_path = _matmul_add_onnx(tmp_path / "model.onnx")
    caplog.set_level(logging.INFO, logger="compiler.build.engine")
    _, first = engine_from_onnx(onnx_path, _settings(tmp_path), {})
    assert "built TensorRT engine" in caplog.text  # INFO is captured...
    assert "using timing cache" not in caplog.text  # ...and the first build starts empty
    caplog.clear()

    plan_path, manifest = engine_from_onnx(onnx_path, _settings(tmp_path, sparse_weights=True), {})

    assert f"using timing cache {first['builder']['timing_cache']}" in caplog.text
    assert manifest["builder"]["timing_cache"] == first["builder"]["timing_cache"]
    assert len(list((tmp_path / "timing_cache").iterdir())) == 1
    assert manifest["builder"]["sparse_weights"] is True
    assert manifest["sparsity"]["forced"] is True and manifest["sparsity"]["eligible"] == 0
    assert manifest["precision"] is None and manifest["fidelity"] is None
    assert manifest["plan"]["sha256"] == _sha256(plan_path)


def test_parser_errors_name_the_node_and_nothing_is_written(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery_node", domain="com.example")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    onnx_path = tmp_path / "bad.onnx"
    onnx.save_model(model, str(onnx_path))

    with pytest.raises(EngineBuildError, match=r"mystery_node.*NoSuchOp") as excinfo:
        engine_from_onnx(onnx_path, _settings(tmp_path), {})
    assert "node #0" in str(excinfo.value)
    # The builder writes beside the ONNX and into timing_cache_dir: neither got anything.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


# --- a tiny BERT: hybrid, INT8 Q/DQ and 2:4 engines against ONNX Runtime FP32 -------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT checkpoint (hidden 32, weights ~ N(0, INIT_RANGE)) with MiniLM's
    WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from tests.models import minilm

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=64, vocab_size=30522, initializer_range=INIT_RANGE)
    BertModel(config).save_pretrained(path)
    minilm().tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from calibration import load_texts

    return load_texts(DataSettings(samples=16))


@pytest.fixture(scope="module")
def feeds(bert_dir, texts) -> list[dict[str, np.ndarray]]:
    """Two batches of real text: (4, 32) padded, and (3, 17) at an odd length."""
    from compiler.training.models import load_model

    loaded = load_model(ModelSettings(name=str(bert_dir)))
    batches = []
    for rows, (batch, length) in ((texts[:4], (4, 32)), (texts[4:7], (3, 17))):
        enc = loaded.tokenizer(rows, padding="max_length", truncation=True, max_length=length,
                               return_tensors="np")
        batches.append({n: enc[n].astype(np.int64) for n in loaded.input_names})
        assert batches[-1]["input_ids"].shape == (batch, length)
    return batches


def _export(bert_dir: Path, texts: list[str], folder: Path, prune: bool = False) -> Path:
    """The FP32 ONNX of the tiny BERT (2:4 pruned by magnitude first when `prune`)."""
    from compiler.training.export import onnx_from_torch
    from compiler.training.models import load_model
    from compiler.training.prune import prune_2_4

    loaded = load_model(ModelSettings(name=str(bert_dir)))
    if prune:
        prune_2_4(loaded.module, SparsitySettings(pattern="2:4", method="magnitude"))
    folder.mkdir(parents=True, exist_ok=True)
    path, _ = onnx_from_torch(loaded, ExportSettings(parity_sequences=(8, 33)),
                              folder / "model.fp32.onnx", texts)
    return path


@pytest.fixture(scope="module")
def fp32_onnx(bert_dir, texts, tmp_path_factory) -> Path:
    return _export(bert_dir, texts, tmp_path_factory.mktemp("dense"))


def _convert(model, mode: str, path: Path) -> Path:
    from compiler.graph.onnx_io import save_onnx
    from compiler.passes.precision import convert_precision

    converted, _ = convert_precision(model, PrecisionSettings(mode=mode))
    return save_onnx(converted, path)


def _qdq_onnx(fp32_path: Path, feeds: list[dict[str, np.ndarray]], path: Path) -> Path:
    """Max-calibrated INT8 Q/DQ graph (opset 19) with hybrid FP16/FP32 float parts."""
    from compiler.graph.onnx_io import session_with_outputs
    from compiler.passes.qdq import MIN_OPSET, calibration_tensors, insert_qdq, upgrade_opset

    model = upgrade_opset(onnx.load(str(fp32_path)), MIN_OPSET)
    tensors = calibration_tensors(model)
    session = session_with_outputs(fp32_path, tensors)
    absmax = dict.fromkeys(tensors, 0.0)
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed)):
            absmax[name] = max(absmax[name], float(np.abs(value).max()))
    qdq, _ = insert_qdq(model, absmax, QuantSettings())
    return _convert(qdq, "hybrid", path)


def _compare_with_fp32(plan_path: Path, fp32_path: Path, feeds, min_cosine: float) -> dict:
    """Run the engine (TrtRunner) and ONNX Runtime FP32 (OnnxrtRunner) on `feeds`, compare
    every output by cosine with Polygraphy's Comparator, and return the worst cosine and the
    largest absolute error per output (worked out here with NumPy from the same results)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CosineSimilarityCompareFunc

    trt_runner = TrtRunner(EngineFromBytes(plan_path.read_bytes()), name="trt")
    ort_runner = OnnxrtRunner(SessionFromOnnx(str(fp32_path), providers=["cpu"]), name="ort-fp32")
    results = Comparator.run([trt_runner, ort_runner], data_loader=feeds)
    accuracy = Comparator.compare_accuracy(
        results, compare_func=CosineSimilarityCompareFunc(cosine_similarity_threshold=min_cosine))
    engine_runs, reference_runs = results[trt_runner.name], results[ort_runner.name]
    assert len(engine_runs) == len(reference_runs) == len(feeds)
    worst: dict[str, tuple[float, float]] = {}
    for got, want in zip(engine_runs, reference_runs):
        assert set(got.keys()) == set(want.keys())
        for name in want.keys():
            a, b = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
            assert a.shape == b.shape and np.isfinite(a).all(), name
            cosine = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
            error = float(np.abs(a - b).max())
            old = worst.get(name, (1.0, 0.0))
            worst[name] = (min(old[0], cosine), max(old[1], error))
    assert bool(accuracy), f"cosine below {min_cosine}: {worst}"
    return worst


def _build(onnx_path: Path, tmp_path: Path, mode: str) -> tuple[Path, dict]:
    return engine_from_onnx(onnx_path, _settings(tmp_path, profiles=(BERT_PROFILE,), mode=mode), {})


def test_hybrid_bert_engine_matches_onnxruntime_fp32(fp32_onnx, feeds, tmp_path):
    hybrid = _convert(onnx.load(str(fp32_onnx)), "hybrid", tmp_path / "hybrid" / "model.onnx")
    plan_path, manifest = _build(hybrid, tmp_path, "hybrid")

    assert [t["dtype"] for t in manifest["inputs"]] == ["int64"] * len(feeds[0])
    assert manifest["builder"]["sparse_weights"] is False
    # ONNX Runtime CPU on the same hybrid graph: cosine 0.9999998, max |error| 0.0024.
    worst = _compare_with_fp32(plan_path, fp32_onnx, feeds, min_cosine=0.999)
    assert worst["last_hidden_state"][1] < 0.05, worst  # LayerNorm'd output, ~N(0, 1)


def test_int8_qdq_bert_engine_matches_onnxruntime_fp32(fp32_onnx, feeds, tmp_path):
    qdq = _qdq_onnx(fp32_onnx, feeds, tmp_path / "int8" / "model.onnx")
    assert any(t.data_type == TensorProto.INT8 for t in onnx.load(str(qdq)).graph.initializer)
    plan_path, _ = _build(qdq, tmp_path, "int8")

    # ONNX Runtime CPU on the same Q/DQ graph: cosine 0.99976, max |error| 0.098.
    worst = _compare_with_fp32(plan_path, fp32_onnx, feeds, min_cosine=0.995)
    assert worst["last_hidden_state"][1] < 0.5, worst


def test_sparse_2_4_bert_engine_sets_the_flag_and_matches_onnxruntime_fp32(
        bert_dir, texts, feeds, tmp_path):
    pruned = _export(bert_dir, texts, tmp_path / "sparse24", prune=True)
    fp16 = _convert(onnx.load(str(pruned)), "fp16", tmp_path / "sparse24" / "fp16" / "model.onnx")
    plan_path, manifest = _build(fp16, tmp_path, "fp16")

    assert manifest["builder"]["sparse_weights"] is True  # decided by the graph, not forced
    assert manifest["sparsity"]["forced"] is False
    assert manifest["sparsity"]["eligible"] == LAYERS * LINEARS_PER_LAYER  # not the pooler
    # ONNX Runtime CPU on the same FP16 graph: cosine 0.9999997, max |error| 0.004.
    worst = _compare_with_fp32(plan_path, pruned, feeds, min_cosine=0.999)
    assert worst["last_hidden_state"][1] < 0.05, worst
