"""The FP32 reference outputs of a `FidelityProbe`: computed once per input set, cached on disk by
content key, or streamed where they would not fit in memory.

- Cache: `<cache_dir>/fp32-outputs-<key>.npz`, key = sha256 over the graph file(s), the output
  name, the set's feeds and the ONNX Runtime version (`set_keys`). The `auto` budget, the INT8
  budget and verify run the FP32 graph on the same held-out batches; the second reads them
  back. Outputs over `REFERENCE_CACHE_MAX_MIB` per set are not cached.
- Memory: a set whose outputs would exceed `REFERENCE_MEMORY_MAX_MIB` (estimated from one
  row) is not kept (None): the probe runs the reference again beside each variant, a few rows
  at a time (`chunked_batches`: `STREAMED_CHUNK_MIB` of output a run). LM logits over a large
  vocabulary (XLM-R's 250k: 64 samples x 128 tokens are 8 GB a set; one row at 512 tokens,
  0.5 GB) would otherwise fill the host's memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from compiler.eval.fp16_reference import session

Batch = tuple[dict[str, np.ndarray], np.ndarray]  # (feeds of (batch, sequence) int64, valid lengths (batch,))
REFERENCE_CACHE_MAX_MIB = 256  # larger reference outputs (per set and output) are not cached
REFERENCE_MEMORY_MAX_MIB = 2048  # a set's outputs kept in memory at most; larger sets are streamed
STREAMED_CHUNK_MIB = 512  # a streamed set runs as many rows at a time as give this much output


def _set_digest(batches: list[Batch]) -> str:
    import hashlib

    h = hashlib.sha256()
    for feeds, lengths in batches:
        for name in sorted(feeds):
            a = np.ascontiguousarray(feeds[name])
            h.update(f"{name}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
        h.update(np.asarray(lengths, np.int64).tobytes())
    return h.hexdigest()


def set_keys(reference: Any, sets: Mapping[str, list[Batch]], cache_dir: str | None,
              graph_sha256: str | None = None) -> dict[str, str]:
    """{set: key of the FP32 reference on that set}: sha256 over the graph file(s), the set's feeds
    and the ONNX Runtime version; empty without a cache folder or with a ModelProto reference.
    `graph_sha256`: the file's `onnx_sha256` when the caller has it (saves reading it again)."""
    if not cache_dir or not isinstance(reference, (str, os.PathLike)):
        return {}
    import onnxruntime

    from compiler.graph.onnx_io import onnx_sha256
    from compiler.settings import settings_hash

    graph = graph_sha256 or onnx_sha256(reference)
    return {name: settings_hash("fp32-reference-v1", graph, _set_digest(b), onnxruntime.__version__)
            for name, b in sets.items()}


def _output_key(set_key: str, output: str) -> str:
    from compiler.settings import settings_hash

    return settings_hash("fp32-reference-outputs-v2", set_key, output)


def _output_path(cache_dir: str, key: str) -> Path:
    return Path(str(cache_dir)) / f"fp32-outputs-{key[:32]}.npz"


def _write_reference(cache_dir: str, set_key: str, run_names: list[str], results: list[list[np.ndarray]],
                     wanted: list[str]) -> None:
    """Store one set's FP32 outputs (`results[batch][k]` is output `run_names[k]`): every output
    when they fit `REFERENCE_CACHE_MAX_MIB` together, else only `wanted`, each within it."""
    from compiler.artifacts import atomic_write, write_key

    per = {o: {f"b{i}": r[k] for i, r in enumerate(results)} for k, o in enumerate(run_names)}
    cap = REFERENCE_CACHE_MAX_MIB << 20
    store = run_names if sum(a.nbytes for d in per.values() for a in d.values()) <= cap else wanted
    for o in store:
        if o not in per or sum(a.nbytes for a in per[o].values()) > cap:
            continue  # e.g. LM logits over a 50k vocabulary: recomputing beats the disk

        def write(tmp: Path, arrays: dict = per[o]) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, **arrays)

        key = _output_key(set_key, o)
        path = _output_path(cache_dir, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
        write_key(path, key)


def store_reference_outputs(reference: str | os.PathLike, graph_sha256: str, batches: list[Batch],
                            output_names: list[str], results: list[list[np.ndarray]], cache_dir: str) -> None:
    """Put FP32 outputs computed elsewhere into the reference cache, where a `FidelityProbe` of
    the same graph file and the same batches finds them (the `auto` statistics pass runs the
    FP32 graph over verify's random-id set and stores its outputs here).

    Args:
        reference: the FP32 ONNX file; graph_sha256: its `onnx_sha256`.
        batches: the (feeds, lengths) batches run, as the probe will receive them.
        output_names: the graph outputs in `results`' order.
        results: per batch, one array per output, (batch, ...) float32.
        cache_dir: the probe's cache folder.
    """
    key = set_keys(reference, {"set": batches}, cache_dir, graph_sha256)["set"]
    _write_reference(cache_dir, key, list(output_names), results, list(output_names))


def reference_cached(reference: Any, batches: list[Batch], output_names: list[str], cache_dir: str | None,
                     graph_sha256: str | None = None) -> bool:
    """Whether a `FidelityProbe` of `reference` (an ONNX path) would read the FP32 outputs of
    `batches` for every one of `output_names` from `cache_dir` instead of running the graph.
    `graph_sha256`: as `FidelityProbe`'s."""
    from compiler.artifacts import read_key

    keys = set_keys(reference, {"set": batches}, cache_dir, graph_sha256)
    return bool(keys) and all(read_key(_output_path(str(cache_dir), k)) == k
                              for k in (_output_key(keys["set"], o) for o in output_names))


def reference_outputs(reference: Any, output_names: list[str], sets: Mapping[str, list[Batch]],
                       set_keys: Mapping[str, str],
                       cache_dir: str | None) -> tuple[dict[str, list[list[np.ndarray]] | None], list[str]]:
    """{set: [per batch: [per output: array]]} of the FP32 reference, read from the cache where a
    content key shows them unchanged (see `FidelityProbe`); the names of the sets reused. A set
    whose outputs would exceed `REFERENCE_MEMORY_MAX_MIB` (estimated from its first batch) maps to
    None: not kept and not cached.

    A set computed here with a cache stores every output of the graph, not only the ones asked
    for (the forward pass computes them all anyway; a later probe of more outputs, like verify
    after a one-output budget, then finds them), unless they exceed `REFERENCE_CACHE_MAX_MIB`
    together; then only the outputs asked for, each within that limit.
    """
    from compiler.artifacts import read_key

    out: dict[str, list[list[np.ndarray]] | None] = {}
    reused = []
    for name in sets if set_keys and cache_dir else []:
        keys = [_output_key(set_keys[name], o) for o in output_names]
        if all(read_key(_output_path(cache_dir, k)) == k for k in keys):
            per_output = []
            for k in keys:
                with np.load(_output_path(cache_dir, k)) as z:
                    per_output.append([z[f"b{i}"] for i in range(len(sets[name]))])
            out[name] = [list(row) for row in zip(*per_output)]
            reused.append(name)
    todo = [name for name in sets if name not in out]
    if todo:
        ref = session(reference, faithful_fp16=False)
        every = [o.name for o in ref.get_outputs()] if set_keys and cache_dir else []
        run_names = list(output_names) + [o for o in every if o not in output_names]
        for name in todo:
            feeds0, lengths0 = next(iter(row_chunks(*sets[name][0], 1)))  # one row: the set's size, cheaply
            one_row = ref.run(list(output_names), feeds0)
            if _estimated_bytes(one_row, feeds0, sets[name]) > REFERENCE_MEMORY_MAX_MIB << 20:
                out[name] = None  # streamed: `FidelityProbe._compare` runs the reference a few rows at a time
                continue
            results = [ref.run(run_names, feeds) for feeds, _ in sets[name]]
            out[name] = [r[: len(output_names)] for r in results]
            if set_keys and cache_dir:
                _write_reference(cache_dir, set_keys[name], run_names, results, list(output_names))
            del results
        del ref
    return {name: out[name] for name in sets}, reused


def row_chunks(feeds: dict[str, np.ndarray], lengths: np.ndarray, rows: int) -> Iterable[Batch]:
    """A batch as batches of `rows` samples (every feed is batch-major; samples do not interact
    on the CPU references, so each row's outputs are those of the whole batch)."""
    for i in range(0, len(lengths), rows):
        yield {k: v[i:i + rows] for k, v in feeds.items()}, lengths[i:i + rows]


def chunked_batches(batches: list[Batch], run: Callable[[dict[str, np.ndarray]], list[np.ndarray]]) -> Iterator[Batch]:
    """`batches`, each cut into runs of as many rows as give `STREAMED_CHUNK_MIB` of outputs, as
    `run` (a session's run on feeds) gives them for the first batch's first row (the longest
    where batched longest first); a batch within that stays whole."""
    if not batches:
        return
    one_row = run(next(iter(row_chunks(*batches[0], 1)))[0])
    rows = max(1, (STREAMED_CHUNK_MIB << 20) // max(sum(a.nbytes for a in one_row), 1))
    del one_row
    for feeds, lengths in batches:
        yield from row_chunks(feeds, lengths, rows) if len(lengths) > rows else [(feeds, lengths)]


def _estimated_bytes(one_row: list[np.ndarray], feeds: dict[str, np.ndarray], batches: list[Batch]) -> float:
    """Bytes of a set's outputs, from one row's (`one_row`, run on `feeds`): scaled by the input
    elements of all batches over that row's (exact for (batch, sequence, ...) outputs of the
    set's longest row, an overestimate for pooled ones, which are small)."""
    def elements(f: dict[str, np.ndarray]) -> int:
        return max(int(a.size) for a in f.values())

    return sum(a.nbytes for a in one_row) * sum(elements(f) for f, _ in batches) / max(elements(feeds), 1)
