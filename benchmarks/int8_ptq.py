"""Benchmark: INT8 post-training quantization of MiniLM on WikiText-2 (held-out text).

    python -m benchmarks.int8_ptq [--calib-samples 128] [--samples 64] [--out engines/benchmarks]

MiniLM (real weights) is exported at opset 19 by the pipeline's own export stage
(`compiler.pipeline.run_pipeline(..., until="export")` with PRECISION=int8). Calibration uses
the first `--calib-samples` lines of WikiText-2 test, fidelity the next `--samples` lines
(never overlapping). For each calibration method x attention bmm on/off x SmoothQuant on/off,
`compiler.quant.budget.quantize_within_budget` runs (budget: cosine min >= 0.99, at most 8
nodes left float); the table shows the fidelity with every eligible MatMul INT8 ("all INT8")
and after the budget loop ("final"): cosine min/mean and max abs error vs FP32 on the held-out
text, quantized MatMuls, INT8 share of MatMul MACs, nodes left float. Then, for the default
settings: the thresholds of the three methods on a few tensors, ONNX Runtime's QDQ fusion
(optimizations on) against the literal Q/DQ graph, the hybrid FP16 + INT8 graph on the
faithful FP16 reference, and ONNX Runtime CPU latency of the INT8 Q/DQ graph (FP32 elsewhere)
against FP32, batch 1 and 8, sequence 128, median of 20 runs after warm-up. ONNX Runtime's own
`quantize_static` (QDQ, MatMul/Gemm only, its defaults otherwise) on the same text is the
reference row. Writes `<out>/int8_ptq.json`; the export and threshold cache live under
`<out>/int8_ptq/`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_out_argument, fidelity_row, run_main, write_result
from compiler.settings import DataSettings, ModelSettings, PrecisionSettings, QuantSettings

SHOWN_TENSORS = {  # thresholds of the three methods on these (the unsmoothed graph)
    "layer0 attention LayerNorm out (FFN1 in)": "/model/encoder/layer.0/attention/output/LayerNorm/LayerNormalization_output_0",
    "layer0 GELU out (FFN2 in)": "/model/encoder/layer.0/intermediate/intermediate_act_fn/Mul_1_output_0",
    "layer0 softmax out (probs.V in)": "/model/encoder/layer.0/attention/self/Softmax_output_0",
    "layer5 context (O in)": "/model/encoder/layer.5/attention/self/Reshape_3_output_0",
}
METHODS = ("max", "entropy", "percentile")
BATCH = 8  # held-out samples per fidelity run


@dataclass
class PtqInputs:
    """What every measurement here shares.

    Attributes:
        fp32: the FP32 export at opset 19 (the reference). calib / heldout: disjoint
            `calibration.TokenizedSet`s. input_names / output_names: graph I/O.
        cache: threshold and channel statistics cache folder.
        probe: `compiler.eval.fidelity.FidelityProbe` of the first output on `heldout`.
    """

    fp32: Path
    calib: Any
    heldout: Any
    input_names: list[str]
    output_names: list[str]
    cache: Path
    probe: Any


def prepare(args: argparse.Namespace, work: Path) -> PtqInputs:
    """Export MiniLM through the pipeline (opset 19), tokenize calibration and held-out text."""
    from calibration.layout import TokenSets
    from compiler.eval.fidelity import FidelityProbe
    from compiler.pipeline import run_pipeline
    from compiler.settings import BuildSettings

    settings = BuildSettings(model=ModelSettings(name="minilm"), precision=PrecisionSettings(mode="int8"),
                             data=DataSettings(samples=args.samples, calib_samples=args.calib_samples),
                             output_dir=str(work))
    run = run_pipeline(settings, until="export")
    names = run.loaded.input_names
    tokens = TokenSets(settings.data, run.loaded.tokenizer, settings.train.batch_size)
    probe = FidelityProbe.on_tokens(run.fp32_onnx, tokens.heldout, names, run.output_names[0], BATCH)
    return PtqInputs(Path(run.fp32_onnx), tokens.calibration, tokens.heldout, names, list(run.output_names),
                     work / "cache", probe)


def parse_rows(only: str) -> set[tuple[str, bool, float | None]]:
    """`--only` as {(method, attention bmm, SmoothQuant alpha)}: "max:0:0.8,entropy:1:none"."""
    wanted = set()
    for spec in filter(None, only.split(",")):
        m, b, a = spec.split(":")
        wanted.add((m, b == "1", None if a == "none" else float(a)))
    return wanted


def grid_row(inp: PtqInputs, settings: QuantSettings) -> dict[str, Any]:
    """One `quantize_within_budget` run: all-INT8 and final fidelity, MACs, what the budget left float."""
    from compiler.quant.budget import quantize_within_budget

    start = time.perf_counter()
    _, rep = quantize_within_budget(inp.fp32, inp.calib, inp.heldout, inp.input_names, inp.output_names,
                                    settings, inp.cache)
    return {"method": settings.method, "attention_bmm": settings.quantize_attention_bmm,
            "smoothquant_alpha": settings.smoothquant_alpha,
            "all_int8": {**fidelity_row(rep.steps[0]), "int8_mac_fraction": rep.steps[0]["int8_mac_fraction"]},
            "final": fidelity_row(rep.fidelity), "budget_met": rep.budget["met"],
            "quantized_matmuls": rep.quantized_matmuls, "int8_mac_fraction": rep.int8_mac_fraction,
            "excluded_by_budget": [{"name": e.name, **(e.effect or {})} for e in rep.excluded
                                   if e.reason == "sensitivity"],
            "excluded_other": len([e for e in rep.excluded if e.reason != "sensitivity"]),
            "seconds": round(time.perf_counter() - start, 1)}


def grid(inp: PtqInputs, wanted: set[tuple[str, bool, float | None]]) -> list[dict[str, Any]]:
    """`grid_row` per SmoothQuant alpha x method x attention bmm (those in `wanted`; empty: all)."""
    rows = []
    for sq in (0.8, None):
        for method in METHODS:
            for bmm in (False, True):
                if wanted and (method, bmm, sq) not in wanted:
                    continue
                rows.append(grid_row(inp, QuantSettings(method=method, quantize_attention_bmm=bmm,
                                                        smoothquant_alpha=sq)))
                print(f"  {method:<10} bmm={'on' if bmm else 'off':<3} smoothquant={sq}: final cosine_min "
                      f"{rows[-1]['final']['cosine_min']:.5f}, INT8 MACs {rows[-1]['int8_mac_fraction']:.3f}, "
                      f"{rows[-1]['seconds']} s", flush=True)
    return rows


def ort_baseline(inp: PtqInputs) -> dict[str, Any]:
    """ONNX Runtime's quantize_static: QDQ, MatMul/Gemm only, its defaults otherwise."""
    import functools
    import types

    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static

    from compiler.quant.calibrate import calibration_windows, window_feeds

    windows = calibration_windows(inp.calib)
    feeds = iter([window_feeds(windows[i:i + BATCH], inp.input_names) for i in range(0, len(windows), BATCH)])
    reader = types.SimpleNamespace(get_next=functools.partial(next, feeds, None))  # a CalibrationDataReader
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        out = Path(tmp) / "ort.onnx"
        quantize_static(str(inp.fp32), str(out), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"])
        model = onnx.load(str(out))
    return {"tool": "onnxruntime.quantization.quantize_static (QDQ, MatMul/Gemm, per-tensor weights, "
                    "asymmetric uint8 activations, MinMax; our fixed-length windows)",
            **fidelity_row(inp.probe.score(model).to_dict())}


def thresholds(inp: PtqInputs) -> dict[str, dict[str, float]]:
    """The |x| threshold of each method on `SHOWN_TENSORS` (`compiler.quant.calibrate.calibrate`)."""
    from compiler.quant.calibrate import calibrate

    got = {m: calibrate(inp.fp32, inp.calib, inp.input_names, QuantSettings(method=m), inp.cache) for m in METHODS}
    return {label: {m: round(got[m][t], 4) for m in got} for label, t in SHOWN_TENSORS.items()}


def hybrid(qdq: Any, inp: PtqInputs) -> dict[str, Any]:
    """The Q/DQ graph and the FP32 graph through the hybrid precision pass, on the FP16 reference."""
    import onnx

    from compiler.passes.precision import convert_precision

    hyb = PrecisionSettings(mode="hybrid")
    h, rep = convert_precision(qdq, hyb)
    onnx.checker.check_model(h)
    hybrid_only, _ = convert_precision(onnx.load(str(inp.fp32)), hyb)
    return {"hybrid_int8": fidelity_row(inp.probe.score(h).to_dict()),
            "hybrid_fp16_only": fidelity_row(inp.probe.score(hybrid_only).to_dict()),
            "casts_inserted": rep.casts_inserted, "checker": "ok"}


def ort_fusion(qdq: Any, inp: PtqInputs) -> dict[str, Any]:
    """ORT with graph optimizations (QDQ fused into integer kernels) vs the literal Q/DQ graph."""
    from compiler.eval.fidelity import sample_fidelity, valid_positions

    literal, fused = inp.probe.score(qdq, optimize=False), inp.probe.score(qdq, optimize=True)
    a, b = inp.probe.session_for(qdq, optimize=False), inp.probe.session_for(qdq, optimize=True)
    out = inp.output_names[0]
    diffs, cos = [], []
    for feeds, lengths in inp.heldout.batches(BATCH, inp.input_names):
        x, y = a.run([out], feeds)[0], b.run([out], feeds)[0]
        for i, n in enumerate(lengths):
            u, v = valid_positions(x, i, n).astype(np.float64), valid_positions(y, i, n).astype(np.float64)
            diffs.append(np.abs(u - v).ravel())
            cos.append(sample_fidelity(y, x, i, n)[0])
    d = np.concatenate(diffs)
    return {"literal_qdq": fidelity_row(literal.to_dict()), "ort_optimized": fidelity_row(fused.to_dict()),
            "optimized_vs_literal": {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                                     "share_above_1e-2": float(np.mean(d > 1e-2)), "cosine_min": min(cos)}}


def latency(qdq: Any, inp: PtqInputs, runs: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Median ORT CPU latency (ms) of FP32 and the INT8 Q/DQ graph, batch 1 and 8, calibration windows."""
    from benchmarks.ort_latency import open_session, timed
    from compiler.quant.calibrate import calibration_windows, window_feeds

    sessions = {"fp32": open_session(inp.fp32, None)[0], "int8_qdq": open_session(qdq, None)[0]}
    windows = calibration_windows(inp.calib)
    out: dict[str, Any] = {}
    for batch in (1, 8):
        feeds = window_feeds(windows[:batch], inp.input_names)
        for label, sess in sessions.items():
            timed(sess, feeds, warmup)
            out[f"{label}_b{batch}_ms"] = round(float(np.median(timed(sess, feeds, runs))), 2)
        out[f"speedup_b{batch}"] = round(out[f"fp32_b{batch}_ms"] / out[f"int8_qdq_b{batch}_ms"], 2)
    out.update({"sequence": int(windows.shape[1]), "runs": runs, "warmup": warmup,
                "threads": "ORT default (all cores)", "cpu_count": os.cpu_count(),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "optimization": "ORT_ENABLE_ALL", "provider": "CPUExecutionProvider"})
    return out


def default_settings(inp: PtqInputs) -> tuple[Any, dict[str, Any]]:
    """(FP32 + Q/DQ graph, its report entry) at the default `QuantSettings`."""
    from compiler.quant.budget import quantize_within_budget

    default = QuantSettings()
    qdq, rep = quantize_within_budget(inp.fp32, inp.calib, inp.heldout, inp.input_names, inp.output_names,
                                      default, inp.cache)
    return qdq, {"settings": asdict(default), "report": rep.summary(), "excluded": [e.name for e in rep.excluded]}


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.5f}"


def print_grid(result: dict[str, Any]) -> None:
    b = result["ort_quantize_static"]
    print(f"\nONNX Runtime quantize_static (QDQ, MatMul/Gemm only): cosine min {fmt(b['cosine_min'])} "
          f"mean {fmt(b['cosine_mean'])} max abs err {b['max_abs_err']:.3f}")
    print(f"\n{'method':<10} {'bmm':<4} {'smooth':<6} | {'all-INT8 cos_min':>16} {'MACs':>6} | {'final cos_min':>13} "
          f"{'cos_mean':>8} {'max_err':>7} {'qMM':>4} {'INT8 MACs':>9} {'met':>4} | left float by budget")
    for r in result["rows"]:
        a, f = r["all_int8"], r["final"]
        left = ", ".join(e["name"].replace("/model/encoder/", "").replace("/MatMul", "") for e in r["excluded_by_budget"])
        print(f"{r['method']:<10} {'on' if r['attention_bmm'] else 'off':<4} {str(r['smoothquant_alpha']):<6} | "
              f"{fmt(a['cosine_min']):>16} {a['int8_mac_fraction']:>6.3f} | {fmt(f['cosine_min']):>13} "
              f"{fmt(f['cosine_mean']):>8} {f['max_abs_err']:>7.3f} {r['quantized_matmuls']:>4} "
              f"{r['int8_mac_fraction']:>9.3f} {'yes' if r['budget_met'] else 'NO':>4} | {left or '-'}")


def print_default(result: dict[str, Any]) -> None:
    print(f"\nthresholds (unsmoothed graph, {result['calib_samples']} windows):")
    for label, t in result["thresholds"].items():
        print(f"  {label:<42} max {t['max']:>8.4f}  entropy {t['entropy']:>8.4f}  percentile {t['percentile']:>8.4f}")
    fu, vs = result["ort_fusion"], result["ort_fusion"]["optimized_vs_literal"]
    print(f"\nORT QDQ fusion (default settings): literal Q/DQ cos_min {fmt(fu['literal_qdq']['cosine_min'])}, "
          f"ORT-optimized {fmt(fu['ort_optimized']['cosine_min'])}; optimized vs literal: max |diff| "
          f"{vs['max_abs_diff']:.4f}, mean {vs['mean_abs_diff']:.2e}, cosine min {vs['cosine_min']:.6f}")
    h = result["hybrid"]
    print(f"hybrid FP16 + INT8 (FP16 emulation): cos_min {fmt(h['hybrid_int8']['cosine_min'])} mean "
          f"{fmt(h['hybrid_int8']['cosine_mean'])}; hybrid FP16 only: {fmt(h['hybrid_fp16_only']['cosine_min'])}")
    lat = result["latency"]
    print(f"ORT CPU latency ({lat['cpu_count']} shared cores, load {lat['load_average_1min']}), sequence "
          f"{lat['sequence']}, median of {lat['runs']} (ms): batch 1 FP32 {lat['fp32_b1_ms']} / INT8 "
          f"{lat['int8_qdq_b1_ms']} (x{lat['speedup_b1']}); batch 8 FP32 {lat['fp32_b8_ms']} / INT8 "
          f"{lat['int8_qdq_b8_ms']} (x{lat['speedup_b8']})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--samples", type=int, default=64)
    add_out_argument(ap)
    ap.add_argument("--only", default="", help="rows as method:bmm:alpha,... e.g. max:0:0.8 (default: all)")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    import onnx
    import onnxruntime
    import torch

    start = time.perf_counter()
    inp = prepare(args, args.out / "int8_ptq")
    print(f"MiniLM opset 19, {len(inp.calib)} calibration / {len(inp.heldout)} held-out WikiText-2 samples")
    result: dict[str, Any] = {
        "versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__},
        "model": "minilm (all-MiniLM-L6-v2)", "opset": 19, "calib_samples": len(inp.calib),
        "heldout_samples": len(inp.heldout), "budget": {"min_cosine": 0.99, "max_excluded": 8}}
    result["ort_quantize_static"] = ort_baseline(inp)
    result["rows"] = grid(inp, parse_rows(args.only))
    result["thresholds"] = thresholds(inp)
    qdq, result["default"] = default_settings(inp)
    result["ort_fusion"] = ort_fusion(qdq, inp)
    result["hybrid"] = hybrid(qdq, inp)
    result["latency"] = latency(qdq, inp)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print_grid(result)
    print_default(result)
    write_result(args.out, "int8_ptq", result)


def main(argv: list[str] | None = None) -> None:
    run_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
