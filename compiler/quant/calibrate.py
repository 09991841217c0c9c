"""INT8 calibration on real text: activation thresholds and per-channel maxima.

1. Windows (`calibration_windows`): fixed-length windows of real text without padding. Every
   window holds exactly the same number of tokens, so the histogram calibrators, which stack a
   tensor's arrays across samples, never meet ragged shapes, and no padded position enters a
   statistic.
2. Thresholds (`calibrate`): ONNX Runtime's own calibrators (`create_calibrator`: MinMax,
   Entropy, Percentile) run the FP32 graph over the windows; the symmetric range of each tensor
   feeding a MatMul/Gemm is its threshold (the |x| that maps to 127 in `compiler.passes.qdq`).
3. Channel maxima (`channel_absmax`): max |x| per last-axis channel, SmoothQuant's statistic
   (`compiler.passes.smoothquant`).

Both results are cached with `compiler.artifacts.cached`, keyed by a content hash of the graph,
the text, the tensors and the settings that change them.

Defaults, measured on MiniLM (128 calibration / 64 held-out WikiText-2 samples; see
benchmarks/int8_ptq.py): `max` thresholds. Entropy and percentile clip the outlier channels:
held-out cosine min 0.89 / 0.87 against 0.96 for max, without SmoothQuant.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from compiler.artifacts import cached
from compiler.passes.qdq import calibration_tensors
from compiler.settings import QuantSettings, settings_hash

CALIBRATION_VERSION = "int8-calibration-v1"
MARKER_OP = "IsNaN"  # float in, bool out: marks a tensor for ORT's op-type based selection

# --------------------------------------------------------------------------------------------
# Windows of real text


def _special_tokens(samples: list[np.ndarray]) -> tuple[int | None, int | None]:
    """(first, last) token ids shared by every sample ([CLS] / [SEP]), or None where they differ."""
    if not samples or min(len(s) for s in samples) < 2:
        return None, None
    firsts, lasts = {int(s[0]) for s in samples}, {int(s[-1]) for s in samples}
    return (firsts.pop() if len(firsts) == 1 else None), (lasts.pop() if len(lasts) == 1 else None)


class WindowTooShort(ValueError):
    """A window length its special tokens fill: `needed` is the shortest that holds a text token."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"a window of {needed - 1} token(s) holds no text once its special tokens are in; "
                         f"{needed} or more are needed")
        self.needed = needed


def calibration_windows(tokens: Any, count: int | None = None, length: int | None = None) -> np.ndarray:
    """Fixed-length windows of real text, no padding: (count, length) int64 token ids.

    The samples' tokens are concatenated into one stream (each sample's shared first and last
    token, [CLS] and [SEP] for BERT, taken off); `count` windows of `length` tokens, evenly
    spaced over the stream (overlapping where the stream is short), each get the first and last
    token back. Every window therefore looks like one sample of exactly `length` tokens.

    Args:
        tokens: a `calibration.TokenizedSet` (the calibration samples).
        count: windows wanted; default one per sample.
        length: tokens per window; default the longest sample (the tokenizer's max_length).

    Returns:
        (count, length) int64 token ids.

    Raises:
        WindowTooShort: (a ValueError) `length` leaves no room for text after the special tokens.
        ValueError: the text holds fewer tokens than one window, or the set is empty.
    """
    samples = [np.asarray(s, np.int64) for s in tokens.input_ids]
    if not samples:
        raise ValueError("no calibration samples")
    count = len(samples) if count is None else count
    length = max(len(s) for s in samples) if length is None else length
    first, last = _special_tokens(samples)
    cut = slice(1 if first is not None else 0, -1 if last is not None else None)
    stream = np.concatenate([s[cut] for s in samples])
    body = length - (first is not None) - (last is not None)
    if body < 1:
        raise WindowTooShort(length - body + 1)
    if len(stream) < body:
        raise ValueError(f"calibration text holds {len(stream)} tokens, fewer than one window of {length}: "
                         "use more calibration samples")
    starts = np.linspace(0, len(stream) - body, count).round().astype(np.int64)
    windows = np.stack([stream[s:s + body] for s in starts])
    parts = ([np.full((count, 1), first)] if first is not None else []) + [windows] + (
        [np.full((count, 1), last)] if last is not None else [])
    return np.concatenate(parts, axis=1).astype(np.int64)


def window_feeds(windows: np.ndarray, input_names: list[str]) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds for unpadded windows: ids, an all-ones mask, zero segment ids.

    Args:
        windows: (batch, length) int64 token ids.
        input_names: the graph inputs to fill (a `calibration.text.CacheInput` gets an empty past).

    Returns:
        {input name: (batch, length) int64}; a KV-cache input (batch, heads, 0, head_dim) float32.

    Raises:
        compiler.errors.DataError: an input that is none of input_ids, attention_mask,
            token_type_ids.
    """
    from calibration.text import text_feeds

    return text_feeds({"input_ids": windows, "attention_mask": np.ones_like(windows),
                       "token_type_ids": np.zeros_like(windows)}, input_names)


def window_set(windows: np.ndarray, key: str) -> Any:
    """The (count, length) windows as a `calibration.TokenizedSet` of `key` (for
    `TokenizedSet.batches` and `FidelityProbe.on_tokens`)."""
    from calibration import TokenizedSet

    return TokenizedSet(list(windows), [np.zeros_like(w) for w in windows], 0, key)


# --------------------------------------------------------------------------------------------
# Thresholds: ONNX Runtime's calibrators


class _Reader:
    """A CalibrationDataReader over a list of feeds (one ONNX Runtime run each)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def calibrate(model_path: str | os.PathLike, tokens: Any, input_names: list[str], settings: QuantSettings,
              cache_dir: str | os.PathLike | None, tensors: list[str] | None = None) -> dict[str, float]:
    """Activation thresholds of the tensors feeding MatMul/Gemm, from ONNX Runtime's calibrators.

    The calibrator (`run_calibrator`) runs the FP32 graph over `calibration_windows(tokens,
    settings.calib_windows)`, `settings.calib_batch_size` windows a run.

    Args:
        model_path: FP32 ONNX file (external data allowed; temporary files go beside it).
        tokens: `calibration.TokenizedSet` of calibration text (never the held-out text).
        input_names: graph inputs (`input_ids`, `attention_mask`, `token_type_ids`).
        settings: method, bins, percentile, windows, batch size.
        cache_dir: thresholds are cached as `<cache_dir>/int8-<key>.json` (with
            `compiler.artifacts.cached`), key = sha256 (`compiler.settings.settings_hash`) over
            the graph file(s), `tokens.key`, the tensors, `QuantSettings.calibration_key()` and
            the ONNX Runtime version; a change in any of them recalibrates. Placement settings
            (attention bmm, exclusions, budget) are not part of the key. None disables the cache.
        tensors: tensors to calibrate; default `compiler.passes.qdq.calibration_tensors(model)`.

    Returns:
        {tensor name: threshold >= 0}, the |x| that maps to 127.

    Raises:
        ValueError: too little text for one window; DataError: inputs text cannot fill.
    """
    import onnx
    import onnxruntime

    from compiler.artifacts import write_json
    from compiler.graph.onnx_io import onnx_sha256

    model_path = Path(model_path)
    light = onnx.load(str(model_path), load_external_data=False)
    if tensors is None:
        tensors = calibration_tensors(_with_weight_shapes(light, model_path))
    tensors = sorted(set(tensors))
    key = settings_hash(CALIBRATION_VERSION, onnx_sha256(model_path), tokens.key, tensors,
                        settings.calibration_key(), onnxruntime.__version__)
    path = Path(cache_dir) / f"int8-{key[:32]}.json" if cache_dir else None
    found: dict[str, float] = {}

    def compute() -> None:
        start = time.perf_counter()
        windows = calibration_windows(tokens, settings.calib_windows)
        found.update(run_calibrator(model_path, light, tensors, windows, input_names, settings))
        if path is not None:
            write_json(path, {"key": key, "method": settings.method, "windows": list(windows.shape),
                              "seconds": round(time.perf_counter() - start, 1), "thresholds": found})

    if path is None:
        compute()
    elif cached(key, [path], compute, "INT8 thresholds"):
        return {k: float(v) for k, v in json.loads(path.read_text())["thresholds"].items()}
    return found


def _with_weight_shapes(light: Any, model_path: Path) -> Any:
    """The graph with its weights loaded (matmul analysis needs initializer dims and MACs)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(light)
    onnx.load_external_data_for_model(m, str(model_path.parent))
    return m


def _marked_view(light: Any, tensors: list[str]) -> Any:
    """A copy of the graph where each tensor feeds an `IsNaN` marker node exposed as an output."""
    import onnx
    from onnx import TensorProto, helper

    view = onnx.ModelProto()
    view.CopyFrom(light)
    view.graph.node.extend(helper.make_node(MARKER_OP, [t], [f"{t}__calib_marker"], name=f"{t}__calib_marker")
                           for t in tensors)
    view.graph.output.extend(helper.make_tensor_value_info(f"{t}__calib_marker", TensorProto.BOOL, None)
                             for t in tensors)
    return view


def _method(settings: QuantSettings) -> tuple[Any, dict[str, Any]]:
    """(CalibrationMethod, extra_options) of `settings.method`, symmetric ranges."""
    from onnxruntime.quantization.calibrate import CalibrationMethod

    return {
        "max": (CalibrationMethod.MinMax, {"symmetric": True}),
        "entropy": (CalibrationMethod.Entropy, {"symmetric": True, "num_bins": settings.num_bins,
                                                "num_quantized_bins": settings.num_quantized_bins}),
        "percentile": (CalibrationMethod.Percentile, {"symmetric": True, "num_bins": settings.num_bins,
                                                      "percentile": settings.percentile}),
    }[settings.method]


def run_calibrator(model_path: Path, light: Any, tensors: list[str], windows: np.ndarray,
                   input_names: list[str], settings: QuantSettings) -> dict[str, float]:
    """Thresholds of `tensors` from one ONNX Runtime calibrator over `windows` (no cache).

    `onnxruntime.quantization.calibrate.create_calibrator` with CalibrationMethod MinMax /
    Entropy / Percentile and symmetric ranges: `max` gives max |x|; `entropy` the KL-optimal
    threshold over `num_bins` bins (`num_quantized_bins` quantized bins); `percentile` the
    `percentile`-th percentile of |x| over `num_bins` bins. Only the wanted tensors are
    calibrated: a copy of the graph gives each an `IsNaN` marker node, and the calibrator is
    told to calibrate the inputs of `IsNaN` nodes. A tqdm progress bar counts the batches.

    Args:
        model_path: the FP32 ONNX file `light` was loaded from (its external data is read).
        light: the graph, loaded without external data.
        tensors: activation tensors to calibrate.
        windows: (count, length) int64 token ids, `settings.calib_batch_size` a run.
        input_names: graph inputs.
        settings: method, bins, percentile, batch size.

    Returns:
        {tensor: threshold >= 0}.
    """
    import onnx
    from onnx import TensorProto
    from onnxruntime.quantization.calibrate import create_calibrator
    from tqdm import tqdm

    view = _marked_view(light, tensors)
    method, extra = _method(settings)
    # The view lies beside the model so that its external-data references still resolve.
    fd, view_path = tempfile.mkstemp(prefix=f".{model_path.stem}.calib.", suffix=".onnx", dir=model_path.parent)
    os.close(fd)
    big = sum(t.data_location == TensorProto.EXTERNAL for t in light.graph.initializer) > 0
    with tempfile.TemporaryDirectory(prefix="int8-calib.") as tmp:
        try:
            onnx.save_model(view, view_path)
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram collector prints
                calibrator = create_calibrator(Path(view_path), [MARKER_OP], str(Path(tmp) / "augmented.onnx"),
                                               method, use_external_data_format=big,
                                               providers=["CPUExecutionProvider"], extra_options=extra)
        finally:
            os.unlink(view_path)
        batch = settings.calib_batch_size
        for s in tqdm(range(0, len(windows), batch), desc=f"INT8 calibration ({settings.method})",
                      unit="batch", disable=None, leave=False):
            with contextlib.redirect_stdout(io.StringIO()):
                calibrator.collect_data(_Reader([window_feeds(windows[s:s + batch], input_names)]))
        with contextlib.redirect_stdout(io.StringIO()):
            data = calibrator.compute_data()
        del calibrator
    out = {}
    for t in tensors:
        lo, hi = data[t].range_value  # symmetric: (-threshold, threshold)
        out[t] = float(max(np.max(np.abs(lo)), np.max(np.abs(hi))))
    return out


# --------------------------------------------------------------------------------------------
# Channel maxima (SmoothQuant's statistic)


def channel_absmax(model: Any, windows: np.ndarray, input_names: list[str], tensors: list[str],
                   batch_size: int = 8) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over the windows (FP32, ONNX Runtime CPU).

    Every tensor is copied out of ONNX Runtime and reduced in NumPy: the reference path the tests
    hold `channel_absmax_in_graph` (what the pipeline runs) against.

    Args:
        model: FP32 onnx.ModelProto (outputs are added and removed again) or an ONNX path.
        windows: (count, length) token ids from `calibration_windows`.
        input_names: graph inputs.
        tensors: activation tensors whose last axis holds the channels.
        batch_size: windows per ONNX Runtime run.

    Returns:
        {tensor: (channels,) float32 absmax}.
    """
    from calibration.stats import exposed_outputs
    from compiler.graph.onnx_io import ort_session, session_with_outputs

    if isinstance(model, (str, os.PathLike)):
        sess = session_with_outputs(model, tensors)
    else:
        with exposed_outputs(model, tensors):
            sess = ort_session(model)
    out: dict[str, np.ndarray] = {}
    for s in range(0, len(windows), batch_size):
        for t, x in zip(tensors, sess.run(tensors, window_feeds(windows[s:s + batch_size], input_names))):
            m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            out[t] = m if t not in out else np.maximum(out[t], m)
    return {t: v.astype(np.float32) for t, v in out.items()}


def channel_max_nodes(names: list[str], opset: int) -> tuple[list[list[Any]], list[Any], list[Any], list[Any]]:
    """Nodes that reduce each tensor x of `names` to max |x| per last-axis channel, in the graph.

    Per tensor: Reshape(Abs(x), [-1, channels]) -> ReduceMax(axis 0) -> `__chmax<i>` (channels,)
    float32; the form of `compiler.passes.reduced_stats.reduction_nodes` (groups, tail,
    initializers, outputs), so `reduction_session` places each group right after its producer.
    A NaN in x may be skipped (ONNX Runtime's ReduceMax); the NumPy path (`channel_absmax`)
    propagates it.
    """
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([-1], np.int64), "__chmax_flat"),
             numpy_helper.from_array(np.array([0], np.int64), "__chmax_axis0")]
    groups, outputs = [], []
    for i, t in enumerate(names):
        p, out = f"__chmax{i}_", f"__chmax{i}"
        reduce = (helper.make_node("ReduceMax", [p + "2d", "__chmax_axis0"], [out], keepdims=0) if opset >= 18
                  else helper.make_node("ReduceMax", [p + "2d"], [out], axes=[0], keepdims=0))
        groups.append([helper.make_node("Abs", [t], [p + "abs"]),
                       helper.make_node("Shape", [t], [p + "last"], start=-1),
                       helper.make_node("Concat", ["__chmax_flat", p + "last"], [p + "shape"], axis=0),
                       helper.make_node("Reshape", [p + "abs", p + "shape"], [p + "2d"]), reduce])
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return groups, [], inits, outputs


def channel_absmax_in_graph(model: Any, windows: np.ndarray, input_names: list[str], tensors: list[str],
                            batch_size: int = 8) -> dict[str, np.ndarray]:
    """`channel_absmax` reduced inside the graph: only (channels,) vectors leave ONNX Runtime.

    Same arguments and result as `channel_absmax` (equal to it exactly on finite activations:
    tests/quant/test_calibrate.py); each reduction runs right after its tensor's producer
    (`ExecutionOrder.PRIORITY_BASED`), so a run holds about a plain inference's memory.
    """
    import onnx
    import onnxruntime as ort

    from compiler.passes.reduced_stats import reduction_session

    light = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, os.PathLike)) else model
    opset = next((o.version for o in light.opset_import if o.domain in ("", "ai.onnx")), 0)
    added = channel_max_nodes(tensors, opset)
    names = [o.name for o in added[3]]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    out: dict[str, np.ndarray] = {}
    with reduction_session(model, tensors, opts, added=added) as sess:
        for s in range(0, len(windows), batch_size):
            for t, m in zip(tensors, sess.run(names, window_feeds(windows[s:s + batch_size], input_names))):
                out[t] = m if t not in out else np.maximum(out[t], m)
    return {t: v.astype(np.float32) for t, v in out.items()}


def thresholds_from_channels(model: Any, tensors: list[str], amax: Mapping[str, np.ndarray]) -> dict[str, float]:
    """`max` thresholds (max |x| per tensor) read from per-channel maxima, without another pass.

    A tensor with channel maxima gives their max. A SmoothQuant output x / s (a `Mul` named
    `<x>_SmoothQuant` by `compiler.passes.smoothquant.smooth`, reading x and the constant 1/s)
    gives max_j(amax_x[j] * (1/s)[j]) in float32, which is max |x / s| exactly when x's values
    are those the maxima were measured on (in the smoothed graph x differs from the FP32
    graph's by float rounding: relative 1e-6, tests/quant/test_calibrate.py).

    Args:
        model: the graph the thresholds are for (onnx.ModelProto, smoothed or not).
        tensors: activation tensors wanted.
        amax: {tensor: (channels,) float32} from `channel_absmax_in_graph` on the FP32 graph.

    Returns:
        {tensor: threshold >= 0} for the tensors it can read; the others are left out (calibrate
        them with `calibrate`).
    """
    from onnx import numpy_helper

    made_by = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for t in tensors:
        if t in amax:
            out[t] = float(np.max(amax[t]))
            continue
        n = made_by.get(t)
        if (n is not None and n.op_type == "Mul" and n.name.endswith("_SmoothQuant") and n.input[0] in amax
                and n.input[1] in inits):
            inv = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            out[t] = float(np.max(amax[n.input[0]].astype(np.float32) * inv))
    return out


def cached_channel_absmax(model: Any, graph_sha256: str, windows: np.ndarray, tokens_key: str,
                          input_names: list[str], tensors: list[str], cache_dir: str | os.PathLike | None,
                          batch_size: int = 8) -> dict[str, np.ndarray]:
    """`channel_absmax_in_graph`, reused from `<cache_dir>/int8-channels-<key>.npz` when unchanged.

    Args:
        model, windows, input_names, tensors, batch_size: as `channel_absmax`.
        graph_sha256: content hash of `model` (`compiler.graph.onnx_io.onnx_sha256`).
        tokens_key: `TokenizedSet.key` of the text the windows come from.
        cache_dir: cache folder (`compiler.artifacts.cached`; key = `settings_hash` over the
            graph hash, `tokens_key`, the windows' shape and the sorted tensors); None: no cache.

    Returns:
        {tensor: (channels,) float32 absmax}.
    """
    from compiler.artifacts import atomic_write

    key = settings_hash("int8-channel-absmax-v1", graph_sha256, tokens_key, list(windows.shape), sorted(tensors))
    if not cache_dir:
        return channel_absmax_in_graph(model, windows, input_names, tensors, batch_size)
    path = Path(cache_dir) / f"int8-channels-{key[:32]}.npz"
    amax: dict[str, np.ndarray] = {}

    def compute() -> None:
        amax.update(channel_absmax_in_graph(model, windows, input_names, tensors, batch_size))
        arrays = {f"t{i}": amax[t] for i, t in enumerate(tensors)}
        arrays["__names__"] = np.array(json.dumps(tensors))

        def write(p: Path) -> None:
            with open(p, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, **arrays)

        atomic_write(path, write)

    if not cached(key, [path], compute, "INT8 channel maxima"):
        return amax
    with np.load(path) as z:
        stored = {str(k): z[k] for k in z.files}
    names = json.loads(str(stored.pop("__names__")))
    return {t: stored[f"t{i}"] for i, t in enumerate(names)}
