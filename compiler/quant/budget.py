"""The INT8 accuracy budget: quantize, measure on held-out text, leave the worst MatMuls float.

`quantize_within_budget` composes the INT8 steps and keeps the result within a fidelity budget:

1. SmoothQuant (`compiler.passes.smoothquant.smooth`, when `QuantSettings.smoothquant_alpha` is
   set), on the per-channel maxima of the calibration windows
   (`compiler.quant.calibrate.cached_channel_absmax`).
2. Thresholds: `compiler.quant.calibrate.calibrate` on the (smoothed) FP32 graph.
3. Placement: `compiler.passes.qdq.QdqPlacer`.
4. Budget: cosine against FP32 on held-out text (never the calibration text), measured by
   `compiler.eval.fidelity.FidelityProbe`; while the cosine minimum is under `min_cosine`, the
   most sensitive MatMul (measured: fidelity on calibration windows with only that node float)
   is left unquantized.

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
from compiler.quant.calibrate import cached_channel_absmax, calibrate, calibration_windows, window_set
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


def _met(fid: Mapping[str, Any], settings: QuantSettings) -> bool:
    return fid["cosine_min"] >= settings.min_cosine and fid["nonfinite_count"] == 0


def _smoothed(fp32: Any, fp32_path: Path, windows: np.ndarray, calib_tokens: Any, input_names: list[str],
              settings: QuantSettings, cache_dir: str | os.PathLike | None, tmp: str) -> tuple[Any, Path, dict]:
    """Step 1: (smoothed ModelProto, its file in `tmp`, the report's `smoothquant` section)."""
    import onnx

    from compiler.graph.onnx_io import onnx_sha256, save_onnx

    placer = QdqPlacer(fp32)
    nodes = list(placer.model.graph.node)
    acts = list(dict.fromkeys(nodes[m.index].input[m.activations[0]] for m in placer.matmuls
                              if m.weight is not None and len(m.activations) == 1))
    amax = cached_channel_absmax(fp32_path, onnx_sha256(fp32_path), windows, calib_tokens.key,
                                 input_names, acts, cache_dir, settings.calib_batch_size)
    smoothed, per_tensor = smooth(placer.model, amax, settings.smoothquant_alpha)
    del placer
    model_path = Path(tmp) / "model.smoothed.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(smoothed)
    save_onnx(copy, model_path, external=True)
    del copy
    return smoothed, model_path, {"alpha": settings.smoothquant_alpha, "tensors": per_tensor}


def _calibrated(fp32_path: Path, calib_tokens: Any, input_names: list[str], settings: QuantSettings,
                cache_dir: str | os.PathLike | None) -> _Calibrated:
    """Steps 1-2 (and the placer of step 3)."""
    import onnx

    fp32 = onnx.load(str(fp32_path))
    windows = calibration_windows(calib_tokens, settings.calib_windows)
    smooth_info: dict[str, Any] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="int8-smoothed.") as tmp:
        model_path = fp32_path
        if settings.smoothquant_alpha is not None:
            fp32, model_path, smooth_info = _smoothed(fp32, fp32_path, windows, calib_tokens, input_names,
                                                      settings, cache_dir, tmp)
        placer = QdqPlacer(fp32)
        del fp32
        nodes = list(placer.model.graph.node)
        wanted = list(dict.fromkeys(nodes[m.index].input[k] for m in placer.matmuls for k in m.activations))
        scales = calibrate(model_path, calib_tokens, input_names, settings, cache_dir, tensors=wanted)
    return _Calibrated(placer, scales, windows, smooth_info, round(time.perf_counter() - t0, 1))


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


def _exclude_until_met(variant: Variant, heldout: FidelityProbe, probe: Callable[[], FidelityProbe],
                       settings: QuantSettings) -> _Loop:
    """Step 4: measure all-INT8; while the budget fails, leave the most sensitive node float.

    Sensitivity is measured once, on `probe()` (calibration windows, never held-out text): for
    each quantized node, the mean cosine deficit (1 - cosine) removed by leaving only it float.
    """
    model, report = variant({})
    loop = _Loop(model, report, heldout.score(model).to_dict())
    loop.steps.append({"action": "start", "int8_mac_fraction": report.int8_mac_fraction, **loop.fid})
    if _met(loop.fid, settings) or settings.max_excluded <= 0:
        return loop
    from tqdm import tqdm

    calib = probe()
    base = calib.score(model).to_dict()
    for name in tqdm(report.quantized_nodes, desc="INT8 sensitivity", unit="node", disable=None, leave=False):
        loop.sensitivity[name] = base["deficit_mean"] - calib.score(variant({name: "probe"})[0]).deficit_mean
    for name in sorted(loop.sensitivity, key=loop.sensitivity.get, reverse=True):
        if _met(loop.fid, settings) or len(loop.excluded) >= settings.max_excluded:
            break
        loop.excluded[name] = (f"float removes {loop.sensitivity[name]:.3g} of the mean cosine deficit "
                               f"{base['deficit_mean']:.3g} on {calib.samples['heldout']} calibration windows")
        loop.model, loop.report = variant(loop.excluded)
        loop.fid = heldout.score(loop.model).to_dict()
        loop.effects[name] = {"calib_deficit_removed": loop.sensitivity[name],
                              "heldout_cosine_min_after": loop.fid["cosine_min"],
                              "heldout_cosine_mean_after": loop.fid["cosine_mean"],
                              "int8_mac_fraction_after": loop.report.int8_mac_fraction}
        loop.steps.append({"action": f"float: {name}", "int8_mac_fraction": loop.report.int8_mac_fraction,
                           **loop.fid})
    return loop


def _fill_report(report: QuantReport, loop: _Loop, cal: _Calibrated, calib_tokens: Any, heldout_tokens: Any,
                 heldout: FidelityProbe, settings: QuantSettings, precision: Any, start: float) -> None:
    """The budget's sections of `report` (the placement filled the rest)."""
    for e in report.excluded:
        e.effect = loop.effects.get(e.name)
    fid = loop.fid
    report.calibration = {"windows": int(cal.windows.shape[0]), "window_tokens": int(cal.windows.shape[1]),
                          "samples": len(calib_tokens), "tensors": len(cal.scales), "seconds": cal.seconds}
    report.fidelity = {**fid, "heldout_samples": len(heldout_tokens),
                       "graph": "hybrid + INT8 (FP16 emulation)" if precision is not None else "FP32 + INT8 Q/DQ",
                       "reference": "FP32 graph, ONNX Runtime CPU"}
    report.budget = {"min_cosine": settings.min_cosine, "met": _met(fid, settings),
                     "excluded_by_budget": len(loop.excluded), "max_excluded": settings.max_excluded,
                     "heldout_evaluations": heldout.evaluations, "seconds": round(time.perf_counter() - start, 1)}
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
    2. Thresholds: `calibrate` over `calib_tokens` (cached).
    3. Placement: `QdqPlacer` with `settings`.
    4. Budget: per-sample cosine of the first output vs the original FP32 graph on
       `heldout_tokens` (which must not overlap the calibration text); met when cosine_min >=
       `settings.min_cosine` and no output is non-finite.
    5. While not met and fewer than `max_excluded` nodes are excluded: sensitivity is measured
       once, on `sensitivity_samples` calibration windows (never held-out text): for each
       quantized node, the mean cosine deficit (1 - cosine) removed by leaving only that node
       float. The most sensitive node not yet excluded is left float, and the held-out budget
       measured again.

    Args:
        fp32_path: the FP32 ONNX file (opset >= 19).
        calib_tokens, heldout_tokens: `calibration.TokenizedSet`s of real text, disjoint.
        input_names, output_names: graph I/O; fidelity is measured on the first output.
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
    heldout = FidelityProbe.on_tokens(fp32_path, heldout_tokens, input_names, output_names[0], batch_size)

    def probe() -> FidelityProbe:
        windows = window_set(cal.windows[: settings.sensitivity_samples], f"{calib_tokens.key}-windows")
        return FidelityProbe.on_tokens(fp32_path, windows, input_names, output_names[0], batch_size)

    loop = _exclude_until_met(variant, heldout, probe, settings)
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
