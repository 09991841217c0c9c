"""The INT8 accuracy budget: quantize, measure on held-out text, leave the worst MatMuls float.

`quantize_within_budget` composes the INT8 steps and keeps the result within a fidelity budget:

1. SmoothQuant (`compiler.passes.smoothquant.smooth`, when `QuantSettings.smoothquant_alpha` is
   set), on the per-channel maxima of the calibration windows
   (`compiler.quant.calibrate.cached_channel_absmax`, reduced inside the graph).
2. Thresholds: with the default `max` method, read from the same channel maxima
   (`compiler.quant.calibrate.thresholds_from_channels`, no second pass); other methods run
   `compiler.quant.calibrate.calibrate` (ONNX Runtime's calibrators) on the (smoothed) graph.
3. Placement: `compiler.passes.qdq.QdqPlacer`.
4. Budget: cosine against FP32 on held-out text (never the calibration text), measured by
   `compiler.eval.fidelity.FidelityProbe`; when the cosine minimum is under `min_cosine`, the
   fewest most sensitive MatMuls that meet it are left unquantized (prefixes of the sensitivity
   order: 1, then all `max_excluded` (out of reach: stop, and ship the best graph measured),
   then 2, 4, ... and a bisection).
   Sensitivity (`QuantSettings.sensitivity`) is measured once on calibration windows: `local` (default), each node's own INT8 error, all
   nodes in one pass (`compiler.quant.local_error`); `end-to-end`, the output fidelity with only
   that node float, one pass per node.

Defaults, measured on MiniLM (128 calibration / 64 held-out WikiText-2 samples; SmoothQuant's
alpha chosen on a third, disjoint slice; see `python -m benchmarks.int8_ptq`): `max` thresholds,
attention bmm float (quantizing them costs 0.003 of cosine min for 5 % of the MACs), SmoothQuant
alpha 0.8 (cosine min 0.962 -> 0.993 with 94.7 % of MatMul MACs in INT8 and no node left float).

`ExcludedNode` and `QuantReport` are defined with the placement (`compiler.passes.qdq`, which
fills their counts) and exported here too: the budget fills the rest.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from compiler.eval.fidelity import FidelityProbe
from compiler.passes.qdq import ExcludedNode, QdqPlacer, QuantReport
from compiler.passes.smoothquant import smooth
from compiler.quant.calibrate import (cached_channel_absmax, calibrate, calibration_windows, thresholds_from_channels,
                                      window_feeds, window_set)
from compiler.settings import QuantSettings

__all__ = ["ExcludedNode", "QuantReport", "quantize_within_budget"]

log = logging.getLogger(__name__)

Variant = Callable[[Mapping[str, str]], "tuple[Any, QuantReport]"]


@dataclass
class _Calibrated:
    """Steps 1-2: the placer over the (smoothed) FP32 graph and its thresholds."""

    placer: QdqPlacer
    scales: dict[str, float]
    windows: np.ndarray
    smooth_info: dict[str, Any]
    seconds: float
    source: str = "onnxruntime calibrator"


@dataclass
class _Loop:
    """Step 4: the last variant measured, and what the loop found on the way."""

    model: Any
    report: QuantReport
    fid: dict[str, Any]
    excluded: dict[str, str] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    effects: dict[str, dict[str, float]] = field(default_factory=dict)
    sensitivity_seconds: float | None = None


def _met(fid: Mapping[str, Any], settings: QuantSettings) -> bool:
    return fid["cosine_min"] >= settings.min_cosine and fid["nonfinite_count"] == 0


def _save(model: Any, path: Path) -> Path:
    import onnx

    from compiler.graph.onnx_io import save_onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    save_onnx(copy, path, external=True)
    return path


def _activation_inputs(placer: QdqPlacer, weight_only: bool = False) -> list[str]:
    """The activation tensors the MatMuls of `placer` read, in graph order; `weight_only`: the
    single activation input of weight MatMuls only (what SmoothQuant can smooth)."""
    nodes = list(placer.model.graph.node)
    return list(dict.fromkeys(nodes[m.index].input[k] for m in placer.matmuls for k in m.activations
                              if not weight_only or (m.weight is not None and len(m.activations) == 1)))


def _calibrated(fp32_path: Path, calib_tokens: Any, input_names: list[str], settings: QuantSettings,
                cache_dir: str | os.PathLike | None) -> _Calibrated:
    """Steps 1-2 (and the placer of step 3).

    One pass over the calibration windows gives the per-channel max |x| of every tensor a
    MatMul may quantize (`cached_channel_absmax`, reduced in the graph). SmoothQuant reads it;
    with `method="max"` the thresholds are read from it too (`thresholds_from_channels`), so
    ONNX Runtime's calibrator runs only for other methods, or for tensors the channel maxima do
    not cover.
    """
    import onnx

    from compiler.graph.onnx_io import onnx_sha256

    windows = calibration_windows(calib_tokens, settings.calib_windows)
    t0 = time.perf_counter()
    placer = QdqPlacer(onnx.load(str(fp32_path)))
    single, every = _activation_inputs(placer, weight_only=True), _activation_inputs(placer)
    wanted_channels = every if settings.method == "max" else single if settings.smoothquant_alpha is not None else []
    amax = (cached_channel_absmax(fp32_path, onnx_sha256(fp32_path), windows, calib_tokens.key, input_names,
                                  wanted_channels, cache_dir, settings.calib_batch_size) if wanted_channels else {})
    smooth_info: dict[str, Any] = {}
    if settings.smoothquant_alpha is not None:
        smoothed, per_tensor = smooth(placer.model, {t: amax[t] for t in single}, settings.smoothquant_alpha)
        smooth_info = {"alpha": settings.smoothquant_alpha, "tensors": per_tensor}
        placer = QdqPlacer(smoothed)
        del smoothed
    wanted = _activation_inputs(placer)
    scales = thresholds_from_channels(placer.model, wanted, amax) if settings.method == "max" else {}
    missing = [t for t in wanted if t not in scales]
    if missing:
        with tempfile.TemporaryDirectory(prefix="int8-smoothed.") as tmp:
            path = _save(placer.model, Path(tmp) / "model.smoothed.onnx") if smooth_info else fp32_path
            scales.update(calibrate(path, calib_tokens, input_names, settings, cache_dir, tensors=missing))
    source = ("channel maxima (in-graph)" if not missing else
              "onnxruntime calibrator" if len(missing) == len(wanted) else "channel maxima + onnxruntime calibrator")
    return _Calibrated(placer, scales, windows, smooth_info, round(time.perf_counter() - t0, 1), source)


def _variants(cal: _Calibrated, settings: QuantSettings, precision: Any) -> Variant:
    """{excluded node: reason} -> (the graph as measured, its QuantReport)."""

    def variant(exclude: Mapping[str, str]) -> tuple[Any, QuantReport]:
        placed = cal.placer.call(cal.scales, settings, exclude_nodes=exclude)
        model, rep = placed.model, placed.report
        if precision is not None:
            from compiler.passes.precision import convert_precision

            model, _ = convert_precision(model, precision)
        return model, rep

    return variant


Rank = Callable[[Any, QuantReport], "tuple[dict[str, float], Callable[[str], str]]"]


def _rank_end_to_end(variant: Variant, probe: Callable[[], FidelityProbe]) -> Rank:
    """Sensitivity `end-to-end`: for each quantized node, the mean cosine deficit (1 - cosine)
    on `probe()` (calibration windows) removed by leaving only it float; one pass per node."""

    def rank(model: Any, report: QuantReport) -> tuple[dict[str, float], Callable[[str], str]]:
        from tqdm import tqdm

        calib = probe()
        base = calib.score(model).deficit_mean
        scores = {name: base - calib.score(variant({name: "probe"})[0]).deficit_mean
                  for name in tqdm(report.quantized_nodes, desc="INT8 sensitivity", unit="node", disable=None,
                                   leave=False)}
        n = calib.samples["heldout"]
        return scores, lambda name: (f"float removes {scores[name]:.3g} of the mean cosine deficit {base:.3g} "
                                     f"on {n} calibration windows")

    return rank


def _rank_local(cal: _Calibrated, settings: QuantSettings, input_names: list[str]) -> Rank:
    """Sensitivity `local`: each quantized node's relative INT8 error on FP32 inputs, all nodes
    in one pass over `sensitivity_samples` calibration windows (`compiler.quant.local_error`)."""

    def rank(model: Any, report: QuantReport) -> tuple[dict[str, float], Callable[[str], str]]:
        from compiler.quant.local_error import local_errors

        qdq = cal.placer.call(cal.scales, settings).model  # FP32 + Q/DQ: the INT8 error alone
        windows = cal.windows[: settings.sensitivity_samples]
        b = settings.calib_batch_size
        feeds = (window_feeds(windows[s:s + b], input_names) for s in range(0, len(windows), b))
        scores = local_errors(cal.placer.model, qdq, report.quantized_nodes, feeds)
        return scores, lambda name: (f"local INT8 error {scores[name]:.3g} (relative, FP32 inputs, "
                                     f"{len(windows)} calibration windows), the largest still quantized")

    return rank


def _exclude_until_met(variant: Variant, heldout: FidelityProbe, rank: Rank, settings: QuantSettings) -> _Loop:
    """Step 4: measure all-INT8; if the budget fails, leave the fewest most sensitive nodes float
    that meet it (at most `max_excluded`).

    Sensitivity is measured once (`rank`, on calibration windows, never held-out text) and orders
    the nodes. The held-out budget is then measured on prefixes of that order: 1 node float; if
    that fails, all `max_excluded` (when even they fail, the budget is out of reach and the search
    ends there: the best graph measured ships, `_best_measured`, the start included); else 2,
    4, ... until one meets it, then a bisection between
    the last prefix that failed and the first that met it. Fidelity grows with the prefix in
    practice, so this finds the smallest prefix the one-at-a-time loop would, in about
    log2(`max_excluded`) + 2 held-out evaluations instead of up to `max_excluded`, and in 2 when
    the budget cannot be met (BERT-large with random weights, hybrid + INT8 on the FP16
    emulation: ~75 s an evaluation; the doubling alone took 4 to find that out).
    """
    model, report = variant({})
    loop = _Loop(model, report, heldout.score(model).to_dict())
    loop.steps.append({"action": "start", "int8_mac_fraction": report.int8_mac_fraction, **loop.fid})
    if _met(loop.fid, settings) or settings.max_excluded <= 0:
        return loop
    t0 = time.perf_counter()
    loop.sensitivity, why = rank(model, report)
    loop.sensitivity_seconds = round(time.perf_counter() - t0, 1)
    order = sorted(loop.sensitivity, key=loop.sensitivity.get, reverse=True)[: settings.max_excluded]
    if not order:  # nothing ranked (no quantized node): the start is the result
        return loop
    measured: dict[int, tuple[QuantReport, dict[str, Any]]] = {}
    last: list[Any] = [None, None]  # (n, model): one graph kept in memory, the last measured

    def met(n: int) -> bool:
        model, report = variant({name: why(name) for name in order[:n]})
        fid = heldout.score(model).to_dict()
        measured[n], last[:] = (report, fid), [n, model]
        loop.effects[order[n - 1]] = {"sensitivity": loop.sensitivity[order[n - 1]], "float_nodes": n,
                                      "heldout_cosine_min_after": fid["cosine_min"],
                                      "heldout_cosine_mean_after": fid["cosine_mean"],
                                      "int8_mac_fraction_after": report.int8_mac_fraction}
        loop.steps.append({"action": f"float: top {n}", "nodes": order[:n],
                           "int8_mac_fraction": report.int8_mac_fraction, **fid})
        return _met(fid, settings)

    failed, passed, top = 0, None, len(order)
    if met(1):
        passed = 1
    elif top > 1 and met(top):  # reachable at all: else one evaluation ends the search
        failed, passed, n = 1, top, 2
        while n < passed:
            if met(n):
                passed = n
                break
            failed, n = n, 2 * n
    while passed is not None and passed - failed > 1:
        mid = (failed + passed) // 2
        if met(mid):
            passed = mid
        else:
            failed = mid
    if passed is None:  # out of reach: ship the best graph measured, the start included
        final = _best_measured({0: (loop.report, loop.fid), **measured})
        if final == 0:  # leaving nodes float did not help: they would only cost INT8 MACs
            return loop
    else:
        final = passed
    loop.excluded = {name: why(name) for name in order[:final]}
    loop.report, loop.fid = measured[final]
    loop.model = last[1] if last[0] == final else variant(loop.excluded)[0]  # figures known, graph rebuilt
    return loop


def _best_measured(candidates: Mapping[int, tuple[QuantReport, Mapping[str, Any]]]) -> int:
    """Of the budget's measured prefixes {float nodes: (report, held-out figures)}, none meeting
    it: the one to ship. Fewest non-finite outputs, then the highest held-out cosine min, then
    the fewest float nodes (the most INT8 MACs). A prefix that measured worse than the all-INT8
    start is never shipped: on random-weight BERT-large with ONNX Runtime's VNNI kernels the 8
    most sensitive MatMuls float gave cosine min 0.96603 against the start's 0.96609, and would
    have cut the INT8 share of MatMul MACs from 98.0 % to 87.1 % (docs/int8.md)."""
    return min(candidates, key=lambda n: (candidates[n][1]["nonfinite_count"], -candidates[n][1]["cosine_min"], n))


def _fill_report(report: QuantReport, loop: _Loop, cal: _Calibrated, calib_tokens: Any, heldout_tokens: Any,
                 heldout: FidelityProbe, settings: QuantSettings, precision: Any, start: float) -> None:
    """The budget's sections of `report` (the placement filled the rest)."""
    for e in report.excluded:
        e.effect = loop.effects.get(e.name)
    fid = loop.fid
    report.calibration = {"windows": int(cal.windows.shape[0]), "window_tokens": int(cal.windows.shape[1]),
                          "samples": len(calib_tokens), "tensors": len(cal.scales), "seconds": cal.seconds,
                          "thresholds_from": cal.source}
    report.fidelity = {**fid, "heldout_samples": len(heldout_tokens),
                       "graph": "hybrid + INT8 (FP16 emulation)" if precision is not None else "FP32 + INT8 Q/DQ",
                       "reference": "FP32 graph, ONNX Runtime CPU"}
    report.budget = {"min_cosine": settings.min_cosine, "met": _met(fid, settings),
                     "excluded_by_budget": len(loop.excluded), "max_excluded": settings.max_excluded,
                     "heldout_evaluations": heldout.evaluations,
                     "sensitivity": settings.sensitivity, "sensitivity_seconds": loop.sensitivity_seconds,
                     "seconds": round(time.perf_counter() - start, 1)}
    report.steps = loop.steps
    report.sensitivity = dict(sorted(loop.sensitivity.items(), key=lambda kv: -kv[1]))
    report.smoothquant = cal.smooth_info
    report.thresholds = {t: float(v) for t, v in cal.scales.items()}
    report.smoothquant_alpha = settings.smoothquant_alpha if cal.smooth_info else None


def quantize_within_budget(fp32_path: str | os.PathLike, calib_tokens: Any, heldout_tokens: Any,
                           input_names: list[str], output_names: list[str], settings: QuantSettings,
                           cache_dir: str | os.PathLike | None, batch_size: int = 8,
                           precision: Any = None) -> tuple[Any, QuantReport]:
    """Calibrate, place Q/DQ, and leave the most sensitive MatMuls float until the budget holds.

    1. SmoothQuant (when `settings.smoothquant_alpha` is set): per-channel max |x| of every
       weight MatMul's input over the calibration windows, then `smooth`; the smoothed FP32
       graph computes the same function and is what gets calibrated and quantized.
    2. Thresholds: `max` from the channel maxima of step 1 (one pass over the windows, cached);
       other methods from `calibrate` over `calib_tokens` (cached).
    3. Placement: `QdqPlacer` with `settings`.
    4. Budget: per-sample cosine of the first output vs the original FP32 graph on
       `heldout_tokens` (which must not overlap the calibration text); met when cosine_min >=
       `settings.min_cosine` and no output is non-finite.
    5. While not met and fewer than `max_excluded` nodes are excluded: sensitivity is measured
       once, on `sensitivity_samples` calibration windows (never held-out text): `local`, each
       quantized node's relative INT8 error on FP32 inputs (one pass for all nodes);
       `end-to-end`, the mean cosine deficit (1 - cosine) removed by leaving only that node
       float (one pass per node). Then the fewest most sensitive nodes whose exclusion meets
       the held-out budget stay float: prefixes of the order 1, then `max_excluded` (when it
       fails too, the search ends and the best graph measured ships: fewest non-finite, then
       highest cosine min, then most INT8; the all-INT8 start included), then 2, 4, ... and a
       bisection (`_exclude_until_met`).

    Args:
        fp32_path: the FP32 ONNX file (opset >= 19).
        calib_tokens, heldout_tokens: `calibration.TokenizedSet`s of real text, disjoint.
        input_names, output_names: graph I/O; the cosine is the first output's, non-finite values
            are counted over every output (as verify does).
        settings: `QuantSettings`.
        cache_dir: cache folder for thresholds and channel statistics (None: no cache).
        batch_size: held-out samples per run (padded to the batch's longest).
        precision: a `PrecisionSettings` (e.g. mode `hybrid`) or None. When given, every
            measurement is made on `convert_precision(qdq_graph, precision)` through the
            faithful FP16 reference, so that the budget holds for the graph that ships; the
            returned graph is still the FP32 + Q/DQ one (convert it afterwards).

    Returns:
        (FP32 + Q/DQ onnx.ModelProto, QuantReport with `fidelity`, `budget`, `steps`,
        `sensitivity`, `smoothquant`, `thresholds` and each excluded node's measured effect).

    Raises:
        ValueError: see `compiler.passes.qdq.insert_qdq` and `compiler.quant.calibrate.calibrate`;
            compiler.errors.DataError: graph inputs that text cannot fill.
    """
    start = time.perf_counter()
    fp32_path = Path(fp32_path)
    cal = _calibrated(fp32_path, calib_tokens, input_names, settings, cache_dir)
    variant = _variants(cal, settings, precision)
    heldout = FidelityProbe.on_tokens(fp32_path, heldout_tokens, input_names, output_names, batch_size,
                                      str(cache_dir) if cache_dir else None)

    def probe() -> FidelityProbe:
        windows = window_set(cal.windows[: settings.sensitivity_samples], f"{calib_tokens.key}-windows")
        return FidelityProbe.on_tokens(fp32_path, windows, input_names, output_names[0], batch_size)

    rank = (_rank_local(cal, settings, input_names) if settings.sensitivity == "local"
            else _rank_end_to_end(variant, probe))
    loop = _exclude_until_met(variant, heldout, rank, settings)
    model, report = loop.model, loop.report
    if precision is not None:  # the returned graph is the FP32 + Q/DQ one
        placed = cal.placer.call(cal.scales, settings, exclude_nodes=loop.excluded)
        model, report = placed.model, placed.report
    _fill_report(report, loop, cal, calib_tokens, heldout_tokens, heldout, settings, precision, start)
    if not report.budget["met"]:
        log.warning("INT8 budget min_cosine %.4g not met (held-out cosine_min %.4g) after %d exclusions",
                    settings.min_cosine, loop.fid["cosine_min"], len(loop.excluded))
    log.info("INT8 %s: %d MatMuls quantized, %.1f %% of MatMul MACs, held-out cosine_min %.5f", settings.method,
             report.quantized_matmuls, 100 * report.int8_mac_fraction, loop.fid["cosine_min"])
    return model, report
