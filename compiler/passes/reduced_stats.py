"""Activation statistics reduced inside the graph: only per-tensor scalars leave ONNX Runtime.

`calibration.stats.collect_activation_stats` exposes every float activation as a graph output,
copies each one out of ONNX Runtime and reduces it in NumPy, one sample at a time (BERT-large,
256 + 256 samples: ~10 min). Here a copy of the graph computes the statistics itself
(`reduction_nodes`), per tensor x:

- absmax = max(|ReduceMax(x)|, |ReduceMin(x)|), exact; inf when ReduceSum(x) is NaN (a NaN
  anywhere: ONNX Runtime's ReduceMax skips a NaN unless it comes first) or a value is inf, as
  `calibration.stats` reads it;
- elements = Size(x);
- a strided subsample x.ravel()[::step] (Slice with an odd step, about `SUBSAMPLE` elements a
  run), binned in NumPy into the |x| histogram of `calibration.stats` (16 bins an octave from
  2**-24 to 2**24, zeros and NaN counted apart); the percentile is read from it as there.

Outputs of data-movement ops (Reshape, Transpose, ...) take their input's figures
(`same_values`); outputs of Mul or Div by a scalar constant, their input's scaled, absmax
still exact (`scaled_values`). The per-tensor results are concatenated into six outputs, so one run returns a
few small arrays whatever the graph's size; each reduction runs right after its producer
(`ExecutionOrder.PRIORITY_BASED`), so a run holds about a plain inference's memory. Samples are
batched by exact length (`equal_length_batches`): nothing is padded, and every statistic covers
exactly the tokens of the one-sample-at-a-time path.

Agreement with `calibration.stats` (tests/passes/test_reduced_stats.py; BERT-base random,
32 WikiText-2 samples, 538 tensors): absmax and elements identical; the percentile identical
when the subsample holds every element, else a sampled estimate (measured within a factor 2 of
the full one on the tiny model's hot tensor; it is reported, no rule reads it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from calibration.stats import ActivationStats, TensorStats, cached_stats, float_activations
from calibration.text import equal_length_batches, random_id_batches
from compiler.artifacts import remove_stale_temps, temp_beside
from compiler.settings import settings_hash

log = logging.getLogger(__name__)

LOG2_MIN, LOG2_MAX, BINS_PER_OCTAVE = -24, 24, 16  # as calibration.stats
NBINS = (LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE
SUBSAMPLE = 1 << 11  # histogram elements per tensor per run, about (odd stride); 8192 cost BERT-large
# ~15 s of binning and Slice work over 256 + 64 samples, for a percentile no rule reads
STATS_VERSION = "activation-stats-v3-in-graph"  # cache key: bump when the statistics change
OUTPUTS_MAX_MIB = 256  # graph outputs kept from the statistics runs (`reduced_activation_stats`), at most
OUTPUTS = ("__stats_max", "__stats_min", "__stats_sum", "__stats_size", "__stats_sub", "__stats_count")


def reduction_nodes(names: list[str], subsample: int = SUBSAMPLE) -> tuple[list[list[Any]], list[Any], list[Any],
                                                                           list[Any]]:
    """(groups, tail, initializers, outputs) that reduce each tensor of `names` (module docstring).

    Args:
        names: float activations of the graph.
        subsample: histogram elements per tensor per run, about (an odd stride).

    Returns:
        One group of ONNX nodes per tensor (it reads only that tensor: `_interleave` places it
        right after the tensor's producer), the Concat nodes that gather them, their constants,
        and the value infos of `OUTPUTS`: max (n,), min (n,) and
        sum (n,) float32 over each whole tensor, its size (n,) int64, the strided subsamples of
        all tensors concatenated (total,) float32, and each one's length (n,) int64.
    """
    from onnx import TensorProto, helper, numpy_helper

    consts = {"__st_one_shape": np.array([1], np.int64), "__st_flat": np.array([-1], np.int64),
              "__st_zero_i": np.array([0], np.int64), "__st_end": np.array([np.iinfo(np.int64).max], np.int64),
              "__st_one": np.array(1, np.int64), "__st_two": np.array(2, np.int64),
              "__st_cap2": np.array(2 * subsample, np.int64)}
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    mk = helper.make_node
    groups = []
    parts: dict[str, list[str]] = {o: [] for o in OUTPUTS}
    for i, t in enumerate(names):
        p = f"__st{i}_"
        groups.append([
            mk("ReduceMax", [t], [p + "mx"], keepdims=1),  # max and min: no Abs copy of the tensor
            mk("Reshape", [p + "mx", "__st_one_shape"], [p + "max"]),
            mk("ReduceMin", [t], [p + "mn"], keepdims=1),
            mk("Reshape", [p + "mn", "__st_one_shape"], [p + "min"]),
            mk("ReduceSum", [t], [p + "s"], keepdims=1),  # NaN when any value is NaN
            mk("Reshape", [p + "s", "__st_one_shape"], [p + "sum"]),
            mk("Size", [t], [p + "n"]),
            mk("Reshape", [p + "n", "__st_one_shape"], [p + "size"]),
            # x.ravel()[::step], step = 2 * (size // (2 * subsample)) + 1: odd, so a tensor whose
            # last axis is a power of two is sampled in every channel
            mk("Reshape", [t, "__st_flat"], [p + "flat"]),
            mk("Div", [p + "n", "__st_cap2"], [p + "q"]),
            mk("Mul", [p + "q", "__st_two"], [p + "q2"]),
            mk("Add", [p + "q2", "__st_one"], [p + "st"]),
            mk("Reshape", [p + "st", "__st_one_shape"], [p + "step"]),
            mk("Slice", [p + "flat", "__st_zero_i", "__st_end", "__st_zero_i", p + "step"], [p + "sub"]),
            mk("Size", [p + "sub"], [p + "k"]),
            mk("Reshape", [p + "k", "__st_one_shape"], [p + "count"]),
        ])
        for o, suffix in zip(OUTPUTS, ("max", "min", "sum", "size", "sub", "count")):
            parts[o].append(p + suffix)
    tail = [mk("Concat", parts[o], [o], axis=0) for o in OUTPUTS]
    types = [TensorProto.FLOAT] * 3 + [TensorProto.INT64, TensorProto.FLOAT, TensorProto.INT64]
    outputs = [helper.make_tensor_value_info(o, ty, None) for o, ty in zip(OUTPUTS, types)]
    return groups, tail, inits, outputs


@contextlib.contextmanager
def reduction_session(model: Any, names: list[str], options: Any = None, subsample: int = SUBSAMPLE,
                      added: tuple | None = None) -> Iterator[Any]:
    """An ONNX Runtime CPU session of `model` plus `reduction_nodes`, returning only `OUTPUTS`.

    Args:
        model: FP32 onnx.ModelProto (nodes are added and removed again: the weights are not
            copied) or the path of an ONNX file (its weights are read by ONNX Runtime only; a
            small copy of the graph is written beside it for the session's creation).
        names, subsample: as `reduction_nodes`. options: onnxruntime.SessionOptions or None.
        added: other (groups, tail, initializers, outputs) in `reduction_nodes`' form, one group
            per tensor of `names` (e.g. `compiler.quant.calibrate.channel_max_nodes`); the
            session then returns their outputs.
    """
    import onnx
    import onnxruntime as ort

    from compiler.graph.onnx_io import ort_session

    added = added if added is not None else reduction_nodes(names, subsample)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        light = onnx.load(str(path), load_external_data=False)
        _append(light, names, *added)
        marker = path.with_name(f"{path.name}.stats")  # names the temporaries; never written itself
        remove_stale_temps(marker)
        tmp = temp_beside(marker)
        try:
            onnx.save_model(light, str(tmp))
            sess = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        finally:
            tmp.unlink()
        yield sess
        return
    g = model.graph
    sizes, original = (len(g.initializer), len(g.output)), list(g.node)
    try:
        _append(model, names, *added)
        sess = ort_session(model, options)
    finally:
        del g.initializer[sizes[0]:], g.output[sizes[1]:]
        g.ClearField("node")
        g.node.extend(original)
    yield sess


class StatsSessions:
    """Statistics sessions kept open across `reduced_activation_stats` calls on one graph.

    The `auto` statistics child runs the real and the random-id set on one session instead of
    building a second one (BERT-large: the graph's 1.3 GB read and prepacked again, ~3 s).
    A session is built on first use, per graph, tensors and subsample; leaving the `with` block
    frees them all.
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._open: dict[tuple, Any] = {}

    def get(self, model: Any, names: list[str], options: Any, subsample: int) -> Any:
        """The session `reduction_session(model, names, options, subsample)` gives, built once."""
        key = (str(model) if isinstance(model, (str, os.PathLike)) else id(model), tuple(names), subsample)
        if key not in self._open:
            self._open[key] = self._stack.enter_context(reduction_session(model, names, options, subsample))
        return self._open[key]

    def __enter__(self) -> StatsSessions:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._open.clear()
        self._stack.close()


def _append(model: Any, names: list[str], groups: list[list[Any]], tail: list[Any], inits: list[Any],
            outputs: list[Any]) -> None:
    """Add the reduction nodes to `model` in place, each group right after its tensor's producer.

    With `ExecutionOrder.PRIORITY_BASED` ONNX Runtime keeps this order where the graph allows: a
    reduction right after its producer lets the tensor be freed at once, so a run holds about
    what a plain inference holds, not every activation of the batch.
    """
    by_tensor = dict(zip(names, groups))
    nodes = []
    for n in model.graph.node:
        nodes.append(n)
        nodes += [m for t in n.output if t in by_tensor for m in by_tensor.pop(t)]
    nodes += [m for g in by_tensor.values() for m in g] + tail  # tensors no node produces
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    model.graph.output.extend(outputs)


def reduced_activation_stats(model: Any, batches: Any, source: str, percentile: float = 99.99,
                             tensors: list[str] | None = None, subsample: int = SUBSAMPLE,
                             outputs: list[list[np.ndarray]] | None = None,
                             sessions: StatsSessions | None = None) -> ActivationStats:
    """`calibration.stats.collect_activation_stats`, reduced inside the graph (module docstring).

    Args:
        model: FP32 onnx.ModelProto or the path of an FP32 ONNX file.
        batches: (feeds, lengths) pairs without padding (`equal_length_batches`).
        source: label for reports (`real`, `random`). percentile: of |x| (e.g. 99.99).
        tensors: names to collect; default every float activation (`float_activations`).
        subsample: histogram elements per tensor per run, about (`reduction_nodes`).
        outputs: a list that receives, per batch, the graph's own outputs from the same run (one
            float32 array each, in the graph's output order): the FP32 outputs without a pass of
            their own. Past `OUTPUTS_MAX_MIB` in all (e.g. LM logits) it is emptied and stays so.
        sessions: where the statistics session is kept for the next call on the same graph
            (`StatsSessions`); None: built here and freed on return.

    Returns:
        ActivationStats with one TensorStats per tensor: absmax exact (inf when a value was NaN
        or inf), the percentile from the subsample's histogram, elements over every run.

    Raises:
        ValueError: a padded batch (its padded positions would enter the statistics).
    """
    import onnx
    import onnxruntime as ort
    from tqdm import tqdm

    light = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, os.PathLike)) else model
    wanted = tensors if tensors is not None else float_activations(light)
    alias = same_values(light, wanted)
    scaled = scaled_values(light, wanted)
    names = [t for t in wanted if t not in alias and t not in scaled]
    keep = [o.name for o in light.graph.output] if outputs is not None else []  # before `_append`
    kept_bytes = 0
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # run each reduction right after its producer (`_append`); ORT's default order keeps every
    # activation of the batch alive (BERT-base, 8 x 128 tokens: 4.7 GB peak against 0.6 GB)
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    acc = _Accumulator(len(names))
    with contextlib.ExitStack() as own:
        sess = (sessions.get(model, names, opts, subsample) if sessions is not None
                else own.enter_context(reduction_session(model, names, opts, subsample)))
        for feeds, lengths in tqdm(batches, desc=f"activation statistics ({source})", unit="batch",
                                   disable=None, leave=False):
            seq = next(iter(feeds.values())).shape[1]
            if not (np.asarray(lengths) == seq).all():
                raise ValueError("in-graph statistics need unpadded batches (equal_length_batches)")
            got = sess.run([*OUTPUTS, *keep], feeds)
            acc.add(*got[:len(OUTPUTS)])
            acc.samples += len(lengths)
            if keep:
                outputs.append(got[len(OUTPUTS):])
                kept_bytes += sum(a.nbytes for a in got[len(OUTPUTS):])
                if kept_bytes > OUTPUTS_MAX_MIB << 20:
                    outputs.clear()
                    keep = []
    stats = {t: TensorStats(float(acc.absmax[i]), histogram_percentile(acc.hist[i], int(acc.zeros[i]),
                                                                        float(acc.absmax[i]), percentile),
                            int(acc.elements[i])) for i, t in enumerate(names)}
    for t, (src, steps) in scaled.items():  # in graph order: a chain's source comes first
        stats[t] = scaled_stats(stats[alias.get(src, src)], steps)
    return ActivationStats(source, acc.samples, percentile, {t: stats[alias.get(t, t)] for t in wanted})


SAME_VALUES_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def same_values(model: Any, names: list[str]) -> dict[str, str]:
    """{tensor: the measured tensor holding the same values} for outputs of data-movement ops.

    A Reshape, Transpose, Squeeze, Unsqueeze, Flatten or Identity output holds exactly its input's
    values, rearranged: its absmax, elements and |x| histogram are its input's, so it is not
    reduced again (about a third of a BERT layer's activations: the attention heads' reshapes
    and transposes). Chains resolve to their first tensor in `names`.
    """
    wanted = set(names)
    source = {n.output[0]: n.input[0] for n in model.graph.node
              if n.op_type in SAME_VALUES_OPS and n.output and n.output[0] in wanted and n.input[0] in wanted}
    alias = {}
    for t in source:
        s = source[t]
        while s in source:
            s = source[s]
        alias[t] = s
    return alias


SCALING_OPS = ("Mul", "Div")


def _scalar_constants(model: Any) -> dict[str, float]:
    """{name: value} of the float initializers and Constant outputs holding one finite, nonzero value."""
    from onnx import numpy_helper

    arrays = {i.name: i for i in model.graph.initializer}
    arrays.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    out = {}
    for name, t in arrays.items():
        if int(np.prod(t.dims)) == 1 and t.data_type == 1:  # FLOAT
            v = float(numpy_helper.to_array(t).reshape(()))
            if np.isfinite(v) and v != 0.0:
                out[name] = v
    return out


def scaled_values(model: Any, names: list[str]) -> dict[str, tuple[str, list[tuple[str, float]]]]:
    """{tensor: (measured source, [(op, |c|), ...])} for outputs of Mul or Div by a scalar constant.

    y = x * c or y = x / c (c one finite nonzero float) need no reduction of their own: float32
    rounding is monotonic, so max |y| = fl(max |x| * |c|) (or fl(max |x| / |c|)), bit for bit,
    with NaN and inf carried over; `elements` is x's; the percentile scales by |c| (the histogram
    of y is x's shifted by log2 |c|, so it agrees with a measured one within one bin, a factor
    2**(1/16)). Chains (x * c1 / c2) keep each step, applied in order. In a BERT layer these are
    the attention scale on the scores and GELU's x / sqrt(2) and * 0.5: about a fifth of the
    elements the reductions read (`scaled_stats` computes the figures).
    """
    wanted = set(names)
    consts = _scalar_constants(model)
    steps: dict[str, tuple[str, list[tuple[str, float]]]] = {}
    for n in model.graph.node:
        if n.op_type not in SCALING_OPS or len(n.input) != 2 or not n.output or n.output[0] not in wanted:
            continue
        a, b = n.input
        if b in consts and a in wanted:
            x, c = a, consts[b]
        elif n.op_type == "Mul" and a in consts and b in wanted:
            x, c = b, consts[a]
        else:
            continue
        src, chain = steps.get(x, (x, []))
        steps[n.output[0]] = (src, chain + [(n.op_type, abs(c))])
    return steps


def scaled_stats(src: TensorStats, steps: list[tuple[str, float]]) -> TensorStats:
    """The statistics of `src`'s tensor after `scaled_values`' steps, rounded as float32 each step."""
    absmax, pct = np.float32(src.absmax), np.float32(src.percentile)
    with np.errstate(over="ignore"):
        for op, c in steps:
            f = np.float32(c)
            absmax, pct = (absmax * f, pct * f) if op == "Mul" else (absmax / f, pct / f)
    return TensorStats(float(absmax), float(min(pct, absmax)), src.elements)


class _Accumulator:
    """Running per-tensor figures of `reduced_activation_stats` over the runs."""

    def __init__(self, n: int) -> None:
        self.n, self.samples = n, 0
        self.absmax = np.zeros(n)
        self.elements = np.zeros(n, np.int64)
        self.zeros = np.zeros(n, np.int64)
        self.hist = np.zeros((n, NBINS), np.int64)

    def add(self, mx: np.ndarray, mn: np.ndarray, total: np.ndarray, size: np.ndarray, sub: np.ndarray,
            count: np.ndarray) -> None:
        """One run's outputs (`OUTPUTS`)."""
        m = np.maximum(np.abs(mx.astype(np.float64)), np.abs(mn.astype(np.float64)))
        m[size == 0] = 0.0  # ReduceMax/ReduceMin of nothing: -inf/inf
        m[np.isnan(total) | np.isnan(m)] = np.inf  # a NaN anywhere, as calibration.stats
        self.absmax = np.maximum(self.absmax, m)
        self.elements += size
        # the histogram of |x| of calibration.stats (the same float32 arithmetic, bin for bin);
        # NaN counts as zero there too. Zeros and NaN go to an extra column, so that one
        # bincount over (tensor, bin) does it all (BERT-large: 6 M values a run, 48 ms, not 90)
        a = np.abs(sub)
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.log2(np.minimum(a, np.float32(2.0 ** LOG2_MAX)))
            b -= LOG2_MIN
            b *= BINS_PER_OCTAVE
            np.floor(b, out=b)
        np.clip(b, 0, NBINS - 1, out=b)
        b[~(a > 0)] = NBINS
        idx = b.astype(np.int64)
        idx += np.repeat(np.arange(self.n, dtype=np.int64) * (NBINS + 1), count)
        h = np.bincount(idx, minlength=self.n * (NBINS + 1)).reshape(self.n, NBINS + 1)
        self.zeros += h[:, NBINS]
        self.hist += h[:, :NBINS]


def histogram_percentile(hist: np.ndarray, zeros: int, absmax: float, q: float) -> float:
    """The q-th percentile of |x| from its log2 histogram, read as `calibration.stats` reads it:
    the upper edge of the bin holding the rank, capped at absmax; 0 when the rank falls on zeros.

    Args:
        hist: (NBINS,) counts of the nonzero values. zeros: zero (or NaN) values. absmax: max |x|.
        q: percentile in [0, 100].
    """
    total = zeros + int(hist.sum())
    rank = q / 100.0 * total
    if rank <= zeros or total == 0:
        return 0.0
    k = int(np.searchsorted(np.cumsum(hist), rank - zeros))
    return float(min(2.0 ** (LOG2_MIN + (k + 1) / BINS_PER_OCTAVE), absmax))


def cached_reduced_stats(model: Any, graph_sha256: str, tokens: Any, input_names: list[str],
                         cache_dir: str | Path | None, source: str, batch_size: int = 8, percentile: float = 99.99,
                         limit: int | None = None, vocab_size: int | None = None, seed: int = 0,
                         sessions: StatsSessions | None = None) -> ActivationStats:
    """`reduced_activation_stats` over a token set in `equal_length_batches`, reused from `cache_dir`.

    Args:
        model: FP32 onnx.ModelProto or ONNX path. graph_sha256: its content hash
            (`compiler.graph.onnx_io.onnx_sha256`).
        tokens: a `calibration.TokenizedSet`; input_names: graph inputs to feed.
        cache_dir: folder of `stats-<key>.json` (`compiler.artifacts.cached`; key: a
            `settings_hash` of STATS_VERSION, the graph hash, `tokens.key`, `source` and the
            arguments below); None: no cache.
        source: `real`, or `random` for the random-id set at the first `limit` samples' lengths
            (`calibration.text.random_id_batches`, seeded), for the real-vs-random comparison.
            With an ONNX path and a cache folder, a random run also stores the graph's FP32
            outputs where a `compiler.eval.fidelity.FidelityProbe` of the same batches finds
            them: verify's random-id set is this set when it covers the same samples.
        batch_size: samples per run at most. percentile: of |x|. limit: samples used (None: all).
        sessions: keeps the statistics session for the next set (`StatsSessions`).

    Returns:
        ActivationStats, computed or read back (JSON keeps every float).
    """
    key = settings_hash(STATS_VERSION, graph_sha256, tokens.key, source, batch_size, percentile, limit,
                        vocab_size, seed, SUBSAMPLE)

    def collect() -> ActivationStats:
        if source != "random":
            return reduced_activation_stats(model, equal_length_batches(tokens, batch_size, input_names, limit),
                                            source, percentile, sessions=sessions)
        batches = list(random_id_batches(tokens, batch_size, input_names, vocab_size, seed, limit))
        keep = cache_dir is not None and isinstance(model, (str, os.PathLike))
        outputs: list[list[np.ndarray]] | None = [] if keep else None
        stats = reduced_activation_stats(model, batches, source, percentile, outputs=outputs, sessions=sessions)
        if outputs:
            import onnx

            from compiler.eval.reference_outputs import store_reference_outputs

            names = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]
            store_reference_outputs(model, graph_sha256, batches, names, outputs, str(cache_dir))
        return stats

    return cached_stats(key, cache_dir, collect, source)
