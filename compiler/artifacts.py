"""Crash-safe artifact writing and content hashes.

Every artifact is written to a temporary name beside its destination and renamed into place
(`os.replace` is atomic on POSIX), so a crash never leaves a half-written `.plan` or ONNX.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from compiler.errors import CompilerError

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], nbytes: int | None = None) -> Path:
    """Call `write(tmp_path)`, then rename `tmp_path` to `path`.

    Args:
        path: destination; its parent directories are created.
        write: writes the whole artifact to the temporary path it is given.
        nbytes: the artifact's size in bytes when known (named by the full-disk error).

    Returns:
        The destination as a Path. On any exception the temporary file is removed and the
        destination is left as it was.

    Raises:
        compiler.errors.CompilerError: the disk is full, or the folder is not writable
            (`write_error`); other exceptions of `write` pass through.
    """
    dest = Path(path)
    with writing(dest, nbytes) as tmp:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600: artifacts follow the umask
        os.replace(tmp, dest)
    return dest


@contextlib.contextmanager
def writing(dest: Path, nbytes: int | None = None, directory: bool = False) -> Iterator[Path]:
    """A fresh temporary file (or folder) beside `dest`, removed on exit, with disk errors made clear.

    Creates the parent folders, removes temporaries of `dest` that dead processes left
    (`remove_stale_temps`), and yields `temp_beside(dest, directory)`; the caller writes it and
    renames it (or its content) into place. An OSError for a full disk or a folder that cannot
    be written becomes the one-line `write_error`.

    Raises:
        compiler.errors.CompilerError: see `write_error`.
    """
    tmp: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)
        tmp = temp_beside(dest, directory)
        yield tmp
    except OSError as e:
        written = _size(tmp)
        _remove(tmp)  # first: the free space reported is what the disk has without it
        error = write_error(dest, e, nbytes if nbytes is not None else written, exact=nbytes is not None)
        if error is None:
            raise
        raise error from e
    finally:
        _remove(tmp)


def _remove(tmp: Path | None) -> None:
    if tmp is not None and tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp is not None and tmp.exists():
        tmp.unlink()


def temp_beside(dest: Path, directory: bool = False) -> Path:
    """Create an empty temporary file (or folder) in `dest`'s folder and return its path.

    Named `.<dest name>.<pid>.<random>` (a file gets `.tmp` appended), hidden, so that
    `remove_stale_temps` can tell whether the process that made it is still alive.
    """
    prefix = f".{dest.name}.{os.getpid()}."
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return Path(tmp)


def remove_stale_temps(dest: Path) -> list[Path]:
    """Remove the temporaries of `dest` (`temp_beside`) whose process is gone; returns them.

    A process killed while writing (kill -9, out of memory, power loss) leaves its temporary
    file or folder beside the artifact; the next write of the same destination removes it.
    Temporaries of live processes (a concurrent run into the same folder) are kept. Failures
    to remove (a read-only folder) are ignored: the write that follows reports the folder.
    """
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)\.[A-Za-z0-9_]+(\.tmp)?$")
    removed = []
    for p in dest.parent.glob(glob.escape(f".{dest.name}.") + "*"):
        m = pattern.match(p.name)
        if not m or process_alive(int(m.group(1))):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError:
            continue
        removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by ended processes beside %s", len(removed), dest)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (unknown: assumed alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    try:  # Linux: a zombie (dead, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def write_error(dest: Path, e: OSError, nbytes: int | None = None, exact: bool = True) -> CompilerError | None:
    """The one-line error for an OSError met while writing `dest`, or None for any other error.

    Args:
        dest: the artifact being written.
        e: the error.
        nbytes: the bytes being written (`exact`), or written before the error (not `exact`).

    Returns:
        A CompilerError (exit 1) for a full disk or quota (ENOSPC, EDQUOT: names the space needed
        and the space free, from `shutil.disk_usage`) or for a folder that cannot be written
        (EACCES, EPERM, EROFS on `dest`, a file beside it or a folder above it), or an output
        folder that cannot be created (a file in its place or above it: EEXIST, ENOTDIR; a
        filesystem such as /proc that refuses it: ENOENT); else None.
    """
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        need = (f"{_human(nbytes)} to write" if exact else f"more than the {_human(nbytes)} written") if nbytes \
            else "more space"
        return CompilerError(f"{dest}: no space left on the device ({e.strerror}; {need}, "
                             f"{_human(_free(dest.parent))} free). Free space there, or write to a disk with room "
                             "(--output-dir; --out for `precision`).")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = Path(e.filename) if e.filename else dest.parent
        if where == dest or where.parent == dest.parent:  # the artifact, or a temporary beside it
            folder = dest.parent
        elif where in dest.parents:  # a folder above: mkdir of `where` failed in its parent
            folder = where if where.exists() else where.parent
        else:
            return None  # about another file (one being read): not the output folder
        return CompilerError(f"{folder}: cannot write {dest.name} there ({e.strerror}). Make the folder "
                             "writable, or write to a writable folder (--output-dir; --out for `precision`).")
    if e.errno in (errno.EEXIST, errno.ENOTDIR, errno.ENOENT) and e.filename:
        where = Path(e.filename)
        if where == dest.parent or where in dest.parents:  # creating an output folder failed
            blocker = next((p for p in [where, *where.parents] if p.exists() and not p.is_dir()), None)
            why = f"{blocker} is a file, not a folder" if blocker else f"{e.strerror} (the filesystem refuses it)"
            return CompilerError(f"{where}: cannot create the output folder ({why}). Write to a folder that can "
                                 "hold it (--output-dir; --out for `precision`, `bundle` and `run`).")
    return None


def output_folder(path: str | os.PathLike) -> Path:
    """Create the output folder `path` (and its parents) before any work, so that a folder that
    cannot hold artifacts stops the command in a second, not after the model has loaded.

    Raises:
        compiler.errors.CompilerError: (exit 1, `write_error`) a file in its place or above it,
            a folder that is not writable, a read-only or refusing filesystem.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
    except OSError as e:
        error = write_error(folder / "artifacts", e)
        if error is None:
            raise
        raise error from e
    return folder


def _size(path: Path | None) -> int | None:
    """Bytes under `path` (a file or a folder), None when there is nothing."""
    if path is None or not path.exists():
        return None
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) or None


def _free(folder: Path) -> int:
    """Free bytes on the file system of `folder` (or of its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _human(nbytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} bytes"


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write `data` to `path` (errors: as `atomic_write`)."""
    return atomic_write(path, lambda p: p.write_bytes(data), nbytes=len(data))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON (keys kept in insertion order).

    A file that already holds exactly this text is left alone, so a run that changes nothing
    writes nothing (and works in a read-only output folder). Errors: as `atomic_write`.
    """
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    dest = Path(path)
    try:
        if dest.is_file() and dest.stat().st_size == len(text.encode()) and dest.read_text() == text:
            return dest
    except (OSError, UnicodeDecodeError):
        pass
    return atomic_write(dest, lambda p: p.write_text(text), nbytes=len(text.encode()))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk_mib: int = 16) -> str:
    """sha256 hex digest of a file, read in `chunk_mib` MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_mib << 20):
            h.update(chunk)
    return h.hexdigest()


def read_key(path: str | os.PathLike) -> str | None:
    """The content key recorded beside an artifact by `write_key`, or None."""
    key_path = Path(f"{path}.key")
    return key_path.read_text().strip() if key_path.exists() and Path(path).exists() else None


def write_key(path: str | os.PathLike, key: str) -> None:
    """Record the content key that produced the artifact at `path` (for reuse checks)."""
    write_bytes(f"{path}.key", (key + "\n").encode())


def cached(key: str, artifacts: Sequence[str | os.PathLike], compute: Callable[[], None], what: str) -> bool:
    """Run `compute` unless the artifacts it writes are already there for this content key.

    The one reuse rule of every stage: `compute()` writes each path of `artifacts` (atomically);
    afterwards `key` is recorded beside the first (`<artifact>.key`). A later call with the same
    key finds every artifact present and the recorded key equal, and skips `compute`. The key is
    a `compiler.settings.settings_hash` of everything the artifacts depend on (input bytes,
    settings, texts), so only what a content hash shows unchanged is reused.

    Args:
        key: the content key (hex string).
        artifacts: the files `compute` writes; the first carries the key.
        compute: writes them; on an exception no key is recorded and nothing counts as cached.
        what: a name for the log line ("export", "precision", ...).

    Returns:
        True when the artifacts were reused, False when `compute` ran.
    """
    paths = [Path(a) for a in artifacts]
    if read_key(paths[0]) == key and all(p.is_file() for p in paths):
        log.info("%s: reused %s (content key %s)", what, paths[0], key[:12])
        return True
    log.debug("%s: computing %s (recorded key %s, new %s)", what, paths[0], read_key(paths[0]), key[:12])
    compute()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"{what}: compute() did not write {missing}")
    write_key(paths[0], key)
    return False


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`); a no-op elsewhere.

    Stages that allocate and free many large, differently sized arrays (activation statistics:
    one array per tensor per sample) otherwise leave the process's resident size at its high
    mark, and the next stage's peak stacks on top of it.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fix_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve allocations >= `nbytes` by mmap for good (glibc `mallopt(M_MMAP_THRESHOLD)`).

    glibc raises its mmap threshold after large frees, so later large arrays come from the heap
    and stay resident after being freed; a fixed threshold returns them to the OS at once.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"


@contextlib.contextmanager
def transparent_huge_pages() -> Iterator[None]:
    """Processes started inside this block have glibc's malloc ask for transparent huge pages
    (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc >= 2.35: `madvise(MADV_HUGEPAGE)` on the
    memory it maps); this process's environment is restored on leaving.

    Where the kernel's THP mode is `madvise` (`/sys/kernel/mm/transparent_hugepage/enabled`), a
    process that keeps mapping and unmapping large buffers otherwise takes one page fault per
    4 KiB page, each time: the export child (`fix_mmap_threshold`: every weight copy of the
    exporter is a fresh mapping) spent about a third of its time zeroing newly faulted pages
    (`perf`). Measured on BERT-large's export worker: 52-53 -> 36-37 s (two runs each), the same
    peak. A no-op where
    THP is `never` or already `always`, and outside glibc. A `glibc.malloc.hugetlb` the user
    set is kept (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns this off).
    """
    old = os.environ.get("GLIBC_TUNABLES")
    if old is not None and "glibc.malloc.hugetlb" in old:
        yield
        return
    os.environ["GLIBC_TUNABLES"] = f"{old}:{HUGETLB_TUNABLE}" if old else HUGETLB_TUNABLE
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = old


def die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process end when process `parent_pid`, its parent, ends.

    The initializer of `run_in_child`'s worker: without it a worker whose parent was killed
    (kill -9, out of memory) lives on under PID 1, writes its cache for nobody and blocks
    forever on the pipe to the dead parent. On Linux the kernel sends SIGKILL when the parent
    dies (`prctl(PR_SET_PDEATHSIG)`, man 2 prctl); elsewhere a daemon thread polls the parent
    pid twice a second. A parent that died before this ran is caught by `os.getppid()`.
    """
    import ctypes
    import signal
    import sys
    import threading
    import time

    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent is already gone
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _child_entry(level: int, fn: Any, args: tuple) -> Any:
    import logging
    import pickle

    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return fn(*args)
    except Exception as e:  # one the parent cannot unpickle would break the pool ("process died")
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:  # noqa: BLE001 - any failure to travel: send its type, message and traceback
            import traceback

            raise RuntimeError(f"{type(e).__name__}: {e}\n{''.join(traceback.format_exception(e))}") from None
        raise


def run_in_child(fn: Any, *args: Any, what: str) -> Any:
    """`fn(*args)` in a fresh (spawned) Python process; returns its result.

    For memory-heavy steps whose allocations would otherwise stay resident in the pipeline's
    process (PyTorch and its export; activation statistics): everything the child touched goes
    back to the OS when it exits. The child logs at the parent's level, dies with the parent
    (`die_with_parent`) and maps its large buffers in transparent huge pages
    (`transparent_huge_pages`). `fn`, `args` and the result must be picklable; exceptions raised in
    the child are re-raised here.

    Raises:
        compiler.errors.CompilerError: the child died (killed, e.g. out of memory).
    """
    import logging
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from compiler.errors import CompilerError

    level = logging.getLogger().getEffectiveLevel()
    try:
        with transparent_huge_pages(), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                           initializer=die_with_parent,
                                                           initargs=(os.getpid(),)) as pool:
            return pool.submit(_child_entry, level, fn, args).result()
    except BrokenProcessPool as e:
        raise CompilerError(f"{what}: the worker process died ({e}); it may have run out of memory. "
                            "Free memory or use fewer samples, and rerun.") from e
