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


# ---------------------------------------------------------------------------------------------
# orphans, leftovers, full disks and read-only folders (issue 16)

import errno  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from compiler import artifacts  # noqa: E402
from compiler.artifacts import remove_stale_temps, write_bytes  # noqa: E402
from compiler.errors import CompilerError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def record_pid_and_sleep(path: str) -> None:
    """Runs in run_in_child's worker: says who it is, then outlives any test."""
    Path(path).write_text(str(os.getpid()))
    time.sleep(120)
    Path(path + ".late").write_text("written after the parent died")


def running(pid: int) -> bool:
    """Independent of compiler.artifacts: /proc says the process exists and is no zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_run_in_child_worker_dies_with_a_killed_parent(tmp_path):
    marker = tmp_path / "child.pid"
    script = ("from compiler.artifacts import run_in_child\n"
              "from tests.test_artifacts import record_pid_and_sleep\n"
              f"run_in_child(record_pid_and_sleep, {str(marker)!r}, what='sleep')\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent ended before its worker started"
            time.sleep(0.1)
        child = int(marker.read_text())
        assert running(child)
        parent.send_signal(signal.SIGKILL)  # kill -9: no cleanup code of the parent runs
        parent.wait()
        deadline = time.monotonic() + 10
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(child), "the worker outlived its parent"
        assert not Path(f"{marker}.late").exists()
    finally:
        parent.kill()
        if marker.exists() and marker.read_text() and running(int(marker.read_text())):
            os.kill(int(marker.read_text()), signal.SIGKILL)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_ended_processes_are_removed(tmp_path):
    dest = tmp_path / "report.json"
    gone, alive = dead_pid(), os.getppid()
    stale_file = tmp_path / f".report.json.{gone}.ab12cd_9.tmp"
    stale_dir = tmp_path / f".report.json.{gone}.x1y2z3w4"
    live = tmp_path / f".report.json.{alive}.ab12cd_9.tmp"  # a concurrent run's: kept
    other = tmp_path / f".report.json.key.{gone}.ab12cd_9.tmp"  # another artifact's: not ours to judge
    for p in (stale_file, live, other):
        p.write_text("half")
    stale_dir.mkdir()
    (stale_dir / "report.json").write_text("half")
    write_json(dest, {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, live.name, other.name])
    assert remove_stale_temps(tmp_path / "report.json.key") == [other]


def test_full_disk_names_the_path_the_size_and_the_fix(tmp_path, monkeypatch):
    def full(p, data=b""):
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr(Path, "write_bytes", full)
    dest = tmp_path / "model.plan"
    with pytest.raises(CompilerError) as e:
        write_bytes(dest, b"x" * 3 * 1024 * 1024)
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 1
    assert msg.startswith(f"{dest}: no space left") and "3.0 MiB to write" in msg and "--output-dir" in msg
    assert " free)" in msg and sorted(tmp_path.iterdir()) == []  # no temporary left


def test_full_disk_with_unknown_size_reports_what_was_written(tmp_path):
    def half(p):
        p.write_bytes(b"x" * 2048)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CompilerError, match=r"more than the 2\.0 KiB written"):
        atomic_write(tmp_path / "a.bin", half)


def read_only(folder: Path, monkeypatch) -> None:
    """Make `folder` unwritable: chmod 0o555, or (root ignores permissions) refuse its temporaries."""
    folder.chmod(0o555)
    if os.geteuid() == 0:
        def refuse(dest, directory=False):
            raise PermissionError(errno.EACCES, "Permission denied", str(dest.parent / f".{dest.name}.tmp"))

        monkeypatch.setattr(artifacts, "temp_beside", refuse)


def test_read_only_folder_names_the_folder_and_reuse_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    a = out / "model.onnx"
    cached("k", [a], lambda: write_bytes(a, b"model"), "test")
    report = write_json(out / "export_report.json", {"nodes": 3})
    read_only(out, monkeypatch)
    try:
        assert cached("k", [a], lambda: pytest.fail("recomputed"), "test") is True
        assert write_json(report, {"nodes": 3}) == report  # unchanged: not rewritten
        with pytest.raises(CompilerError) as e:
            write_json(report, {"nodes": 4})
        assert str(e.value).startswith(f"{out}: cannot write export_report.json there (Permission denied)")
        assert "writable" in str(e.value) and "--output-dir" in str(e.value) and e.value.exit_code == 1
        assert json.loads(report.read_text()) == {"nodes": 3}
    finally:
        out.chmod(0o755)


def test_permission_errors_name_the_folder_that_refuses(tmp_path):
    dest = tmp_path / "ro" / "new" / "x.json"
    mkdir_refused = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro" / "new"))
    assert str(artifacts.write_error(dest, mkdir_refused)).startswith(f"{tmp_path / 'ro'}: cannot write x.json")
    elsewhere = PermissionError(errno.EACCES, "Permission denied", "/etc/some/input.txt")
    assert artifacts.write_error(dest, elsewhere) is None  # not about the output: passes through
    assert artifacts.write_error(dest, OSError(errno.EIO, "I/O error")) is None


def test_an_output_folder_that_a_file_blocks_is_a_clear_error_and_the_file_is_kept(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    for dest in (blocker / "x.json", blocker / "run" / "x.npy"):  # EEXIST (the folder itself), ENOTDIR (above)
        with pytest.raises(CompilerError) as e:
            write_bytes(dest, b"data")
        assert f"{blocker} is a file, not a folder" in str(e.value) and "--output-dir" in str(e.value)
        assert e.value.exit_code == 1
    assert blocker.read_text() == "keep me"


def test_a_folder_the_filesystem_refuses_is_a_clear_error():
    dest = Path("/proc/trt-compiler-test/run/x.npy")  # /proc: mkdir is ENOENT
    with pytest.raises(CompilerError) as e:
        write_bytes(dest, b"data")
    assert "cannot create the output folder" in str(e.value) and e.value.exit_code == 1


def glibc_tunables() -> str | None:
    """Runs in run_in_child's worker: the environment glibc read at its start."""
    return os.environ.get("GLIBC_TUNABLES")


def test_children_ask_for_transparent_huge_pages_and_the_parent_environment_is_restored(monkeypatch):
    from compiler.artifacts import HUGETLB_TUNABLE, run_in_child

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert run_in_child(glibc_tunables, what="env") == HUGETLB_TUNABLE
    assert "GLIBC_TUNABLES" not in os.environ
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # other tunables are kept
    assert run_in_child(glibc_tunables, what="env") == f"glibc.malloc.arena_max=2:{HUGETLB_TUNABLE}"
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's choice wins
    assert run_in_child(glibc_tunables, what="env") == "glibc.malloc.hugetlb=0"


class _Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.hook = lambda: None  # as some library errors hold: cannot travel back to the parent


def raise_unpicklable() -> None:
    """Runs in run_in_child's worker."""
    raise _Unpicklable("the exporter says no")


def test_an_exception_that_cannot_travel_back_keeps_its_message():
    from compiler.artifacts import run_in_child

    with pytest.raises(RuntimeError, match="_Unpicklable: the exporter says no") as e:  # was "the worker
        run_in_child(raise_unpicklable, what="export")  # process died ... out of memory" (CompilerError)
    assert not isinstance(e.value, CompilerError)
