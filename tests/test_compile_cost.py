"""benchmarks.compile_cost: which cells run, how a cell's row is made from the child's report.json,
and that a rerun keeps measured cells. The compile itself is replaced by a stand-in that writes
the report a real one would (a real compile takes minutes); `benchmarks.peak_memory.measure`,
which the cells use, is tested on a real child process."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from benchmarks import compile_cost
from benchmarks.peak_memory import measure
from benchmarks.speed.timing import CPU_FEATURES


def test_selection_by_model_mode_or_explicit_cells():
    args = compile_cost.parse_args(["--models", "bert-base"])
    assert args.cell_list == [("bert-base", "hybrid"), ("bert-base", "auto"), ("bert-base", "int8")]
    args = compile_cost.parse_args(["--modes", "auto"])
    assert args.cell_list == [("minilm", "auto"), ("bert-base", "auto"), ("bert-large", "auto")]
    args = compile_cost.parse_args(["--cells", "gpt2:fp16,/models/my:bert:int8", "--", "--samples", "8"])
    assert args.cell_list == [("gpt2", "fp16"), ("/models/my:bert", "int8")] and args.extra == ["--samples", "8"]
    with pytest.raises(argparse.ArgumentTypeError):
        compile_cost.parse_cells("minilm")
    with pytest.raises(SystemExit):
        compile_cost.parse_args(["--models", "gpt9"])


def fake_measure(calls):
    """A stand-in for the compile: writes report.json with timings where the CLI would."""

    def run(cmd, interval, log=None, env=None, timeout_s=None):
        calls.append(cmd)
        out = cmd[cmd.index("--output-dir") + 1]
        model, mode = cmd[cmd.index("--model") + 1], cmd[cmd.index("--precision") + 1]
        report = compile_cost.Path(out) / model / compile_cost.weights_of(model) / mode / "report.json"
        report.parent.mkdir(parents=True)
        report.write_text(json.dumps({"timings": {"seconds": {"export": 2.0, "precision": 0.5, "verify": 1.0},
                                                  "peak_rss_mib": {"export": 300, "precision": 310, "verify": 900}}}))
        return {"command": cmd, "returncode": 0, "wall_s": 5.0, "peak_tree_rss_mib": 950, "peak_single_rss_mib": 900}

    return run


def test_rows_carry_stage_timings_and_a_rerun_keeps_them(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(compile_cost, "measure", fake_measure(calls))
    argv = ["--cells", "minilm:hybrid,bert-base:int8", "--output-dir", str(tmp_path / "eng"), "--out",
            str(tmp_path / "out")]
    result = compile_cost.run(compile_cost.parse_args(argv))
    assert len(calls) == 2 and "--no-build" in calls[0] and calls[1][calls[1].index("--weights") + 1] == "random"
    row = result["rows"][0]
    assert row["status"] == "ok" and row["stages"]["verify"] == {"seconds": 1.0, "peak_rss_mib": 900}
    assert row["outside_stages_s"] == 1.5 and row["peak_tree_rss_mib"] == 950
    assert set(row["cpu"]) == {"model", "features"} and set(row["cpu"]["features"]) <= set(CPU_FEATURES)
    assert not (tmp_path / "eng" / "minilm-pretrained-hybrid").exists()  # removed after the cell
    assert "| minilm | pretrained | hybrid | ok |" in (tmp_path / "out" / "compile.md").read_text()
    compile_cost.run(compile_cost.parse_args(argv))
    assert len(calls) == 2  # both kept
    compile_cost.run(compile_cost.parse_args([*argv, "--fresh"]))
    assert len(calls) == 4


def test_measure_sums_the_child_tree_and_reports_the_exit_code(tmp_path):
    code = "import subprocess, sys; x = bytearray(64 << 20); sys.exit(subprocess.call([sys.executable, '-c', " \
           "'import time; y = bytearray(64 << 20); time.sleep(1.5)']) + 3)"
    r = measure([sys.executable, "-c", code], 0.05, log=tmp_path / "log.txt")
    assert r["returncode"] == 3 and r["peak_tree_rss_mib"] >= 128 > r["peak_single_rss_mib"]


def test_cpu_features_tell_two_machines_of_one_model_name_apart():
    from benchmarks.speed.timing import cpu_features

    avx2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
    bf16 = "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n"
    assert cpu_features(avx2) == ["avx2"]
    assert cpu_features(bf16) == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert cpu_features("no flags here") == []
