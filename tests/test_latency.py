"""benchmarks.latency on a tiny random BERT: the JSON's schema, a cell over budget recorded as
skipped, a rerun that keeps the cells it has, the plots and table written.

The runs time PyTorch (and once ONNX Runtime on the exported graph) for a few milliseconds per
cell; GPU backends are asked for too and must come back as skipped rows with their reason.
"""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import latency
from benchmarks.speed import timing
from benchmarks.speed.backends import BACKENDS, BASELINE, CPU_BACKENDS
from benchmarks.speed.plots import speedup_matrix

FAST = ["--grid", "quick", "--warmup-s", "0", "--duration-s", "0", "--min-iterations", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.models import minilm_tokenizer, tiny_bert

    path = tmp_path_factory.mktemp("tiny-bert-latency")
    tiny_bert().save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


def bench(tiny_model, out, *extra):
    args = latency.parse_args(["--model", str(tiny_model), "--weights", "random", "--samples", "4",
                               "--output-dir", str(out / "engines"), "--out", str(out / "bench"), *FAST, *extra])
    latency.run(args)
    folder = latency.result_dir(args)
    return folder, json.loads((folder / "latency.json").read_text())


def test_backend_list_puts_the_baseline_first_and_expands_groups():
    assert latency.backend_list("ort-cpu-fp32,torch-cpu-fp32") == [BASELINE, "ort-cpu-fp32"]
    assert latency.backend_list("cpu") == list(CPU_BACKENDS) and latency.backend_list("all") == list(BACKENDS)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown backend"):
        latency.backend_list("torch-cpu-fp64")


def test_rows_follow_the_schema_and_gpu_backends_say_why_they_did_not_run(tiny_model, tmp_path):
    folder, result = bench(tiny_model, tmp_path, "--backends", "torch-cpu-fp32,ort-cpu-fp32,torch-cuda-fp16")
    assert {"cpu", "cores", "threads", "gpu", "versions", "load_average_start", "load_average_end"} <= set(
        result["machine"])
    assert result["machine"]["threads"] == 1
    rows = result["rows"]
    assert len(rows) == 3 * 4  # backends x quick grid (2 batches x 2 sequences)
    for row in rows:
        assert set(latency.ROW_KEYS) <= set(row)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"torch-cpu-fp32", "ort-cpu-fp32"}
    for r in ok:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["iterations"] >= 2
        assert r["throughput_tok_s"] == pytest.approx(r["throughput_seq_s"] * r["sequence"], rel=1e-3)
        assert r["peak_rss_mib"] > 0
    gpu = [r for r in rows if r["backend"] == "torch-cuda-fp16"]
    if not any(r["status"] == "ok" for r in gpu):  # a CUDA host times them
        assert all(r["status"] == "skipped" and "GPU" in r["reason"] and r["p50_ms"] is None for r in gpu)
    accuracy = {a["backend"]: a for a in result["accuracy"]}
    for a in accuracy.values():
        assert set(latency.ACCURACY_KEYS) <= set(a)
    assert accuracy["torch-cpu-fp32"]["cosine_min"] == pytest.approx(1.0)
    assert accuracy["ort-cpu-fp32"]["cosine_min"] > 0.9999 and accuracy["ort-cpu-fp32"]["nonfinite"] == 0
    md = (folder / "latency.md").read_text()
    assert "ort-cpu-fp32" in md and "Speed-up over torch-cpu-fp32" in md
    for png in ("latency_p50.png", "latency_speedup.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_cell_over_its_budget_is_kept_as_skipped_with_the_estimate(tiny_model, tmp_path):
    _, result = bench(tiny_model, tmp_path, "--backends", "torch-cpu-fp32", "--cell-budget-s", "1e-6",
                      "--no-accuracy")
    assert len(result["rows"]) == 4
    for r in result["rows"]:
        assert r["status"] == "skipped" and r["reason"].startswith("over budget") and r["p50_ms"] is None
        assert r["iterations"] == 0
    first, *larger = result["rows"]  # 1x32 ran once and estimated; the larger cells follow from it
    assert first["first_iteration_ms"] > 0 and "estimate" in first["reason"]
    assert all("smaller cell 1x32" in r["reason"] for r in larger)


def test_a_rerun_keeps_timed_cells_and_fresh_redoes_them(tiny_model, tmp_path, monkeypatch):
    _, first = bench(tiny_model, tmp_path, "--backends", "torch-cpu-fp32", "--no-accuracy")
    calls = []
    real = timing.time_cell

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(latency, "time_cell", counted)
    _, again = bench(tiny_model, tmp_path, "--backends", "torch-cpu-fp32", "--no-accuracy")
    assert calls == [] and again["rows"] == first["rows"]
    _, fresh = bench(tiny_model, tmp_path, "--backends", "torch-cpu-fp32", "--no-accuracy", "--fresh")
    assert len(calls) == 4 and all(r["status"] == "ok" for r in fresh["rows"])


def test_speedup_matrix_divides_the_baseline_p50_and_leaves_untimed_cells_blank():
    def row(backend, p50, status="ok"):
        return {"backend": backend, "batch": 1, "sequence": 32, "p50_ms": p50, "status": status}

    backends, cells, grid = speedup_matrix([row(BASELINE, 10.0), row("ort-cpu-int8", 2.5),
                                            row("tensorrt", None, "skipped")], BASELINE)
    assert backends == [BASELINE, "ort-cpu-int8"] and cells == [(1, 32)]
    assert grid[:, 0].tolist() == [1.0, 4.0]


def test_a_run_without_the_baseline_says_so_instead_of_a_blank_speedup_table():
    from benchmarks.speed.report import markdown

    def row(backend, p50):
        return {"backend": backend, "batch": 1, "sequence": 32, "p50_ms": p50, "p90_ms": p50, "p99_ms": p50,
                "mean_ms": p50, "throughput_tok_s": 32e3 / p50, "status": "ok"}

    result = {"machine": {"cpu": "x", "usable_cores": 1, "threads": 1, "gpu": {"name": "GPU"},
                          "load_average_start": [0, 0, 0]},
              "policy": {"warmup_s": 0, "duration_s": 0, "min_iterations": 1, "budget_s": 1}, "model": "m",
              "weights": "random", "grid": "quick", "inputs": "text", "baseline": BASELINE, "accuracy": []}
    gpu_only = markdown({**result, "rows": [row("torch-cuda-fp16", 2.0)]}, ["torch-cuda-fp16"])
    assert f"not measured: {BASELINE} was not timed" in gpu_only
    both = markdown({**result, "rows": [row(BASELINE, 10.0), row("torch-cuda-fp16", 2.0)]},
                    [BASELINE, "torch-cuda-fp16"])
    assert "not measured" not in both and "| 1x32 | 5.00x |" in both
