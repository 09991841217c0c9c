"""benchmarks/: every script imports as a module and answers `python -m benchmarks.NAME --help`.

Nothing here runs a benchmark on a real model (they take minutes to hours); `op_profile` runs on a tiny graph.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks
from benchmarks.common import markdown_table, named_path

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_lists_every_benchmark_script():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "common"}
    assert set(benchmarks.BENCHMARKS) == scripts
    for name in benchmarks.BENCHMARKS:  # the package docstring says what each one writes
        assert f"`{name}`" in benchmarks.__doc__


@pytest.mark.parametrize("name", benchmarks.BENCHMARKS)
def test_benchmark_imports_and_documents_its_module_command(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)
    assert f"python -m benchmarks.{name}" in module.__doc__


@pytest.mark.parametrize("name", benchmarks.BENCHMARKS)
def test_benchmark_help_runs_as_a_module(name):
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--out" in done.stdout  # every benchmark writes under its --out folder


def test_named_path_splits_at_the_first_equals_sign_and_rejects_a_bare_path():
    assert named_path("int8=engines/a=b/model.onnx") == ("int8", Path("engines/a=b/model.onnx"))
    for bad in ("engines/model.onnx", "=model.onnx", "int8="):
        with pytest.raises(argparse.ArgumentTypeError):
            named_path(bad)


def test_markdown_table_aligns_the_columns_it_is_told_to():
    table = markdown_table(["graph", "ms"], [["fp32", "1.50"], ["int8", 0.7]], align="lr")
    assert table == "| graph | ms |\n| --- | ---: |\n| fp32 | 1.50 |\n| int8 | 0.7 |"


def test_op_profile_sums_node_time_per_operator_type(tmp_path):
    """A tiny Gather -> MatMul -> MatMul graph: both MatMuls are found, times are positive and
    the JSON holds them per shape; a float input is refused with the reason."""
    import numpy as np
    import onnx

    from benchmarks.op_profile import main, op_times, parse_shape
    from tests.quant.test_calibrate import ids_model

    r = np.random.default_rng(0)
    path = tmp_path / "m.onnx"
    onnx.save(ids_model(*(r.standard_normal(s).astype(np.float32) for s in ((64, 32), (32, 32), (32, 32)))), path)
    got = op_times(path, (2, 16), iterations=3, threads=1)
    assert got["nodes"]["MatMul"] == 2 and got["ops"]["MatMul"] > 0
    assert got["ms_per_run"] == pytest.approx(sum(got["ops"].values()), abs=1e-3)
    main([f"tiny={path}", "--shape", "1x8", "--shape", "2x16", "--iterations", "2", "--threads", "1",
          "--out", str(tmp_path)])
    result = json.loads((tmp_path / "op_profile.json").read_text())
    assert set(result["shapes"]) == {"1x8", "2x16"} and "MatMul" in result["shapes"]["1x8"]["tiny"]["ops"]
    with pytest.raises(Exception, match="BATCHxSEQUENCE"):
        parse_shape("32")


def test_forward_cost_times_both_graphs_and_the_reductions(tmp_path):
    """A tiny Gather -> MatMul -> MatMul graph and its FP16 conversion: per-sample times and the
    reductions' throughput are positive and in the JSON; a missing graph is refused by name."""
    import numpy as np
    import onnx

    from benchmarks.forward_cost import main
    from compiler.passes.precision import convert_precision
    from compiler.settings import PrecisionSettings
    from tests.quant.test_calibrate import ids_model

    r = np.random.default_rng(0)
    fp32 = ids_model(*(r.standard_normal(s).astype(np.float32) for s in ((20000, 8), (8, 16), (16, 8))))
    onnx.save(fp32, tmp_path / "fp32.onnx")
    onnx.save(convert_precision(fp32, PrecisionSettings(mode="fp16"))[0], tmp_path / "fp16.onnx")
    main(["--fp32", str(tmp_path / "fp32.onnx"), "--variant", str(tmp_path / "fp16.onnx"), "--batch", "2",
          "--sequence", "8", "--repeat", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "forward_cost.json").read_text())
    assert len(result["rows"]) == 2 and all(row["ms_per_sample"] > 0 for row in result["rows"])
    assert result["reductions"]["shape"] == [2, 8, 4096] and result["reductions"]["gb_per_s"] > 0
    with pytest.raises(SystemExit, match="missing.onnx: no such ONNX file"):
        main(["--fp32", str(tmp_path / "missing.onnx"), "--out", str(tmp_path)])


def test_recovery_curve_reads_runs_keeps_other_labels_and_refuses_a_run_without_a_curve(tmp_path):
    from benchmarks import recovery_curve

    def report(name, curve):
        path = tmp_path / name / "sparsity_report.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"prune": {"method": "sparsegpt"},
                                    "recovery": {"steps": 4, "seconds": 9.0, "curve": curve}}))
        return path

    a = report("a", [[0, 0.0, 0.8], [4, 120.0, 0.9]])
    recovery_curve.main([f"first={a}", "--out", str(tmp_path / "out")])
    b = report("b", [[0, 0.0, 0.85], [4, 60.0, 0.95]])
    recovery_curve.main([f"second={b}", "--out", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "recovery_curve.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["first", "second"]
    assert rows[0]["curve"][1] == {"step": 4, "train_minutes": 2.0, "cosine_mean": 0.9}
    empty = report("c", [])
    with pytest.raises(SystemExit, match="no recovery curve"):
        recovery_curve.main([f"c={empty}", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no such file"):
        recovery_curve.main([f"d={tmp_path / 'missing.json'}", "--out", str(tmp_path / "out")])


def test_split_batches_counts_padding_by_hand_and_times_the_loop():
    import compiler.training.distill as distill_module
    from benchmarks.split_batches import padding_counts, seconds_per_step
    from tests.models import BERT_INPUTS, tiny_bert, training_tokens

    # one batch of 4: two samples of 100 tokens, two of 4; padded 4 x 100, split 2 x 100 + 2 x 4
    rows = padding_counts([100, 4, 100, 4], batch_size=4, costs=[0, 1000], epochs=1)
    assert rows[0] == {"cost": None, "positions": 400, "valid": 208, "share_of_padded": 1.0, "groups_per_batch": 1.0}
    assert rows[1]["positions"] == 208 and rows[1]["groups_per_batch"] == 2.0 and rows[1]["share_of_padded"] == 0.52
    assert rows[2]["positions"] == 400 and rows[2]["groups_per_batch"] == 1.0  # a sub-batch costs more than it saves
    tokens = training_tokens(4, max_length=16)
    teacher = tiny_bert(layers=1)
    assert all(seconds_per_step(teacher, tokens, BERT_INPUTS, 2, cost) > 0 for cost in (None, 0))
    assert distill_module.SPLIT_COST_TOKENS == 128  # restored
