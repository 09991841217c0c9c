"""compiler/artifacts.py: atomic writes that follow the umask, and the one `cached` reuse rule."""

from __future__ import annotations

import os
import stat

import pytest

from compiler.artifacts import atomic_write, cached, read_key, write_json


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "a" / "report.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by a service user, like any tool's output
    os.umask(0o077)
    try:
        private = write_json(tmp_path / "private.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "model.onnx"
    dest.write_text("old")

    def fail(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(dest, fail)
    assert dest.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_cached_computes_once_per_key(tmp_path):
    a, b = tmp_path / "model.onnx", tmp_path / "report.json"
    runs = []

    def compute():
        runs.append(1)
        a.write_text(f"model {len(runs)}")
        b.write_text("{}")

    assert cached("k1", [a, b], compute, "test") is False and read_key(a) == "k1"
    assert cached("k1", [a, b], compute, "test") is True and len(runs) == 1  # same key: reused
    assert cached("k2", [a, b], compute, "test") is False and len(runs) == 2  # new key: computed
    b.unlink()
    assert cached("k2", [a, b], compute, "test") is False and len(runs) == 3  # an artifact gone: computed


def test_cached_records_no_key_when_compute_fails_or_writes_nothing(tmp_path):
    a = tmp_path / "model.onnx"

    def fail():
        a.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached("k", [a], fail, "test")
    assert read_key(a) is None
    with pytest.raises(RuntimeError, match="did not write"):
        cached("k", [tmp_path / "never.onnx"], lambda: None, "test")
