"""benchmarks/: every script imports as a module and answers `python -m benchmarks.NAME --help`.

Nothing here runs a benchmark (they load real models and take minutes to hours).
"""

from __future__ import annotations

import argparse
import importlib
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
