"""Crash-safe artifact writing and content hashes.

Every artifact is written to a temporary name beside its destination and renamed into place
(`os.replace` is atomic on POSIX), so a crash never leaves a half-written `.plan` or ONNX.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then rename `tmp_path` to `path`.

    Args:
        path: destination; its parent directories are created.
        write: writes the whole artifact to the temporary path it is given.

    Returns:
        The destination as a Path. On any exception the temporary file is removed and the
        destination is left as it was.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600: artifacts follow the umask
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write `data` to `path`."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON (keys kept in insertion order)."""
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


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


def _child_entry(level: int, fn: Any, args: tuple) -> Any:
    import logging

    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return fn(*args)


def run_in_child(fn: Any, *args: Any, what: str) -> Any:
    """`fn(*args)` in a fresh (spawned) Python process; returns its result.

    For memory-heavy steps whose allocations would otherwise stay resident in the pipeline's
    process (PyTorch and its export; activation statistics): everything the child touched goes
    back to the OS when it exits. The child logs at the parent's level. `fn`, `args` and the
    result must be picklable; exceptions raised in the child are re-raised here.

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
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_child_entry, level, fn, args).result()
    except BrokenProcessPool as e:
        raise CompilerError(f"{what}: the worker process died ({e}); it may have run out of memory. "
                            "Free memory or use fewer samples, and rerun.") from e
