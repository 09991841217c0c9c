"""Activation statistics of an FP32 ONNX graph over real text, reduced as they stream.

Every floating-point tensor that a node produces is exposed as a graph output and run through
ONNX Runtime (CPU, FP32) one batch at a time; each batch is folded into per-tensor running
maxima and a log2 histogram of |x| (16 bins an octave from 2**-24 to 2**24) and then dropped,
so memory stays at one batch's activations whatever the number of samples (ModelOpt's AutoCast
keeps every tensor of every sample: 18 GB for BERT-large with 16 samples). Integer tensors
(token ids, shapes) are not activations and are never collected.

`cached_activation_stats` keeps the result as JSON in `DataSettings.cache_dir`, keyed by the
graph's sha256, the token set's key and the collection settings (`compiler.artifacts.cached`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from compiler.artifacts import cached, fix_mmap_threshold, release_freed_memory, write_json
from compiler.graph.analysis import FLOAT
from compiler.graph.onnx_io import ort_session, session_with_outputs, without_weights
from compiler.settings import settings_hash

log = logging.getLogger(__name__)

_LOG2_MIN, _LOG2_MAX, _BINS_PER_OCTAVE = -24, 24, 16
_NBINS = (_LOG2_MAX - _LOG2_MIN) * _BINS_PER_OCTAVE
_SUBSAMPLE = 1 << 16  # elements per tensor per batch that enter the histogram (strided)


@dataclass
class TensorStats:
    """Statistics of |x| for one tensor.

    Attributes:
        absmax: largest |x| seen (inf when a value was non-finite).
        percentile: the `ActivationStats.percentile`-th percentile of |x| (from the histogram).
        elements: values seen.
    """

    absmax: float
    percentile: float
    elements: int


@dataclass
class ActivationStats:
    """Per-tensor statistics of one graph over one input set."""

    source: str
    samples: int
    percentile: float
    tensors: dict[str, TensorStats]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActivationStats":
        return cls(d["source"], d["samples"], d["percentile"],
                   {k: TensorStats(**v) for k, v in d["tensors"].items()})


class _Running:
    """Running absmax and |x| histogram of one tensor."""

    __slots__ = ("absmax", "hist", "zeros", "elements")

    def __init__(self) -> None:
        self.absmax = 0.0
        self.hist = np.zeros(_NBINS, dtype=np.int64)
        self.zeros = 0
        self.elements = 0

    def add(self, x: np.ndarray) -> None:
        a = np.abs(x.ravel())
        self.elements += a.size
        if not a.size:
            return
        m = float(a.max()) if np.isfinite(a).all() else np.inf
        self.absmax = max(self.absmax, m)
        a = a[:: max(1, a.size // _SUBSAMPLE)]
        nz = a[a > 0]
        self.zeros += a.size - nz.size
        bins = np.floor((np.log2(np.minimum(nz, 2.0**_LOG2_MAX)) - _LOG2_MIN) * _BINS_PER_OCTAVE)
        self.hist += np.bincount(np.clip(bins, 0, _NBINS - 1).astype(np.int64), minlength=_NBINS)

    def percentile(self, q: float) -> float:
        total = self.zeros + int(self.hist.sum())
        rank = q / 100.0 * total
        if rank <= self.zeros or total == 0:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.hist), rank - self.zeros))
        return float(min(2.0 ** (_LOG2_MIN + (k + 1) / _BINS_PER_OCTAVE), self.absmax))


def float_activations(model: Any) -> list[str]:
    """Names of the FP32 tensors produced by nodes (initializers and integer tensors excluded)."""
    import onnx

    g = onnx.shape_inference.infer_shapes(without_weights(model)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.output]}
    return [t for n in model.graph.node if n.op_type != "Constant"
            for t in n.output if t and types.get(t) == FLOAT]


@contextlib.contextmanager
def exposed_outputs(model: Any, names: list[str]) -> Iterator[Any]:
    """Temporarily add `names` as graph outputs of `model` (in place; restored on exit)."""
    import onnx

    graph = model.graph
    before = len(graph.output)
    present = {o.name for o in graph.output}
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names if t not in present)
    try:
        yield model
    finally:
        del graph.output[before:]


def collect_activation_stats(model: Any, batches: Iterator[tuple[dict[str, np.ndarray], np.ndarray]],
                             source: str, percentile: float = 99.99,
                             tensors: list[str] | None = None) -> ActivationStats:
    """Stream `batches` through `model` (FP32, ONNX Runtime CPU) and reduce every float activation.

    Args:
        model: FP32 onnx.ModelProto, or the path of an FP32 ONNX file (best saved with external
            data: ONNX Runtime then reads the weights, and Python never holds them).
        batches: (feeds, lengths) pairs as from `TokenizedSet.batches`; padded positions are
            excluded from the statistics of (batch, sequence, ...) tensors.
        source: label for reports (`real`, `random`).
        percentile: the high percentile of |x| to record (e.g. 99.99).
        tensors: names to collect; default every float activation (`float_activations`).

    Returns:
        ActivationStats with one TensorStats per tensor.
    """
    import onnx
    import onnxruntime as ort

    fix_mmap_threshold()  # one array per tensor per sample: keep freed ones from staying resident
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False  # every run returns ~all activations: do not keep an arena
    opts.log_severity_level = 3
    if isinstance(model, (str, os.PathLike)):  # weights read by ONNX Runtime from the file only
        names = tensors if tensors is not None else float_activations(onnx.load(str(model), load_external_data=False))
        sess = session_with_outputs(model, names, opts)
    else:
        names = tensors if tensors is not None else float_activations(model)
        with exposed_outputs(model, names):  # no copy of the weights: outputs added, then removed
            sess = ort_session(model, opts)
    from tqdm import tqdm

    running = {t: _Running() for t in names}
    samples = 0
    for feeds, lengths in tqdm(batches, desc=f"activation statistics ({source})", unit="batch",
                               disable=None, leave=False):
        outs = sess.run(names, feeds)
        seq = next(iter(feeds.values())).shape[1]
        full = bool((lengths == seq).all())
        for t, x in zip(names, outs):
            if full or x.ndim < 2 or x.shape[:2] != (len(lengths), seq):
                running[t].add(x)
            else:  # (batch, sequence, ...): valid positions only
                for i, n in enumerate(lengths):
                    running[t].add(x[i, :n])
        samples += len(lengths)
        del outs
    stats = {t: TensorStats(r.absmax, r.percentile(percentile), r.elements) for t, r in running.items()}
    del sess
    release_freed_memory()
    return ActivationStats(source, samples, percentile, stats)


def cached_activation_stats(model: Any, graph_sha256: str, tokens: Any, input_names: list[str],
                            cache_dir: str | Path | None, source: str, batch_size: int = 1,
                            percentile: float = 99.99, vocab_size: int | None = None,
                            seed: int = 0) -> ActivationStats:
    """`collect_activation_stats` over a token set, reused from `cache_dir` when unchanged.

    Args:
        model: as `collect_activation_stats` (a ModelProto or an ONNX path).
        graph_sha256: content hash of `model` (`compiler.graph.onnx_io.onnx_sha256`).
        tokens: a `calibration.TokenizedSet`; its `key` enters the cache key.
        input_names: graph inputs to feed.
        cache_dir: folder of `stats-<key>.json` (`compiler.artifacts.cached`; the key is a
            `settings_hash` of the graph hash, `tokens.key`, `source` and the arguments below);
            None: no cache.
        source: `real`, or `random` to replace the token ids by uniform random ids in
            [0, vocab_size) at the same shapes (seeded), for the real-vs-random comparison.
        batch_size, percentile: as `TokenizedSet.batches` and `collect_activation_stats`.
        vocab_size, seed: the random ids' range and seed.

    Returns:
        ActivationStats, computed or read back (the same values: JSON keeps every float).
    """
    key = settings_hash("activation-stats-v1", graph_sha256, tokens.key, source, batch_size,
                        percentile, vocab_size, seed)

    def collect() -> ActivationStats:
        rng = np.random.default_rng(seed) if source == "random" else None
        batches = tokens.batches(batch_size, input_names, rng=rng, vocab_size=vocab_size)
        return collect_activation_stats(model, batches, source, percentile)

    return cached_stats(key, cache_dir, collect, source)


def cached_stats(key: str, cache_dir: str | None, collect: Callable[[], ActivationStats],
                 source: str) -> ActivationStats:
    """`collect()`, kept as `<cache_dir>/stats-<key>.json` and read back while `key` is unchanged
    (JSON keeps every float, so a read-back equals the computed statistics); no cache without
    `cache_dir`. `source` names the statistics in the log ("real", "random")."""
    if not cache_dir:
        return collect()
    path = Path(cache_dir) / f"stats-{key[:32]}.json"
    computed: list[ActivationStats] = []

    def compute() -> None:
        computed.append(collect())
        write_json(path, computed[0].to_dict())

    if not cached(key, [path], compute, f"activation statistics ({source})"):
        return computed[0]
    return ActivationStats.from_dict(json.loads(path.read_text()))
