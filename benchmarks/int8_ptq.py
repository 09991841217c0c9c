"""Benchmark: INT8 post-training quantization of MiniLM on WikiText-2 (held-out text).

    python benchmarks/int8_ptq.py [--calib-samples 128] [--samples 64] [--out engines/benchmarks]

MiniLM (real weights) is exported at opset 19. Calibration uses the first `--calib-samples`
lines of WikiText-2 test, fidelity the next `--samples` lines (never overlapping). For each
calibration method x attention bmm on/off x SmoothQuant on/off, `compiler.quant.quantize.
quantize_within_budget` runs (budget: cosine min >= 0.99, at most 8 nodes left float); the
table shows the fidelity with every eligible MatMul INT8 ("all INT8") and after the budget loop
("final"): cosine min/mean and max abs error vs FP32 on the held-out text, quantized MatMuls,
INT8 share of MatMul MACs, nodes left float. Then, for the default settings: the thresholds of
the three methods on a few tensors, ONNX Runtime's QDQ fusion (optimizations on) against the
literal Q/DQ graph, the hybrid FP16 + INT8 graph on the faithful FP16 reference, and ONNX
Runtime CPU latency of the INT8 Q/DQ graph (FP32 elsewhere) against FP32, batch 1 and 8,
sequence 128, median of 20 runs after warm-up. ONNX Runtime's own `quantize_static` (QDQ,
MatMul/Gemm only, its defaults otherwise) on the same text is the reference row.
Writes `<out>/int8_ptq.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibration import load_texts, tokenized_set  # noqa: E402
from compiler.eval.fidelity import FidelityProbe  # noqa: E402
from compiler.quant.quantize import (QuantSettings, calibrate, calibration_windows,  # noqa: E402
                               quantize_within_budget, window_feeds)
from compiler.settings import DataSettings, ExportSettings, ModelSettings, PrecisionSettings  # noqa: E402

SHOWN_TENSORS = {  # thresholds of the three methods on these (the unsmoothed graph)
    "layer0 attention LayerNorm out (FFN1 in)": "/model/encoder/layer.0/attention/output/LayerNorm/LayerNormalization_output_0",
    "layer0 GELU out (FFN2 in)": "/model/encoder/layer.0/intermediate/intermediate_act_fn/Mul_1_output_0",
    "layer0 softmax out (probs.V in)": "/model/encoder/layer.0/attention/self/Softmax_output_0",
    "layer5 context (O in)": "/model/encoder/layer.5/attention/self/Reshape_3_output_0",
}


def export(out: Path):
    from compiler.training.export import onnx_from_torch
    from compiler.training.models import load_model

    loaded = load_model(ModelSettings(name="minilm"))
    texts = load_texts(DataSettings(samples=4))
    path, report = onnx_from_torch(loaded, ExportSettings(opset=19), out / "minilm-opset19" / "model.fp32.onnx", texts)
    return loaded, path, report.outputs


def fid_row(f: dict) -> dict:
    return {k: f[k] for k in ("cosine_min", "cosine_mean", "max_abs_err", "nonfinite_count")}


def grid(path, calib, heldout, names, outputs, cache, rows_wanted):
    rows = []
    for sq in (0.8, None):
        for method in ("max", "entropy", "percentile"):
            for bmm in (False, True):
                if rows_wanted and (method, bmm, sq) not in rows_wanted:
                    continue
                settings = QuantSettings(method=method, quantize_attention_bmm=bmm, smoothquant_alpha=sq)
                start = time.perf_counter()
                _, rep = quantize_within_budget(path, calib, heldout, names, outputs, settings, cache)
                rows.append({"method": method, "attention_bmm": bmm, "smoothquant_alpha": sq,
                             "all_int8": {**fid_row(rep.steps[0]), "int8_mac_fraction": rep.steps[0]["int8_mac_fraction"]},
                             "final": fid_row(rep.fidelity), "budget_met": rep.budget["met"],
                             "quantized_matmuls": rep.quantized_matmuls, "int8_mac_fraction": rep.int8_mac_fraction,
                             "excluded_by_budget": [{"name": e.name, **(e.effect or {})} for e in rep.excluded
                                                    if e.reason == "sensitivity"],
                             "excluded_other": len([e for e in rep.excluded if e.reason != "sensitivity"]),
                             "seconds": round(time.perf_counter() - start, 1)})
                print(f"  {method:<10} bmm={'on' if bmm else 'off':<3} smoothquant={sq}: final cosine_min "
                      f"{rep.fidelity['cosine_min']:.5f}, INT8 MACs {rep.int8_mac_fraction:.3f}, "
                      f"{rows[-1]['seconds']} s", flush=True)
    return rows


def ort_baseline(path, calib, heldout, names, outputs):
    """ONNX Runtime's quantize_static: QDQ, MatMul/Gemm only, its defaults otherwise."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static

    windows = calibration_windows(calib)

    class Reader:
        def __init__(self):
            self.it = iter([window_feeds(windows[i:i + 8], names) for i in range(0, len(windows), 8)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        out = Path(tmp) / "ort.onnx"
        quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"])
        model = onnx.load(str(out))
    f = FidelityProbe(path, heldout, names, outputs[0], 8).measure(model)
    return {"tool": "onnxruntime.quantization.quantize_static (QDQ, MatMul/Gemm, per-tensor weights, "
                    "asymmetric uint8 activations, MinMax; our fixed-length windows)", **fid_row(f)}


def thresholds(path, calib, names, cache):
    got = {m: calibrate(path, calib, names, QuantSettings(method=m), cache) for m in ("max", "entropy", "percentile")}
    return {label: {m: round(got[m][t], 4) for m in got} for label, t in SHOWN_TENSORS.items()}


@contextlib.contextmanager
def precision_pass_int8_fix():
    """Stand-in for the fix of compiler.passes.precision._shapes_by_running (feed dtype from the input's
    elem_type, not float32 for every unknown type): used only if the pass fails on INT8 inputs."""
    import onnx

    import compiler.passes.precision as P
    from compiler.graph.onnx_io import ort_session

    def fixed(light, names, originals, shape):
        present = {o.name for o in light.graph.output}
        light.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in present)
        declared = {i.name: i.type.tensor_type.elem_type for i in light.graph.input}
        sess = ort_session(light)
        feeds = {}
        for i in sess.get_inputs():
            dims = [d if isinstance(d, int) else shape[k] if k < 2 else 1 for k, d in enumerate(i.shape)]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(declared[i.name])
            feeds[i.name] = (np.ones if i.name in originals else np.zeros)(dims, dtype=dtype)
        return {n: tuple(o.shape) for n, o in zip(names, sess.run(names, feeds))}

    original = P._shapes_by_running
    P._shapes_by_running = fixed
    try:
        yield
    finally:
        P._shapes_by_running = original


def hybrid(qdq, fp32_path, heldout, names, outputs):
    import onnx

    from compiler.passes.precision import convert_precision

    hyb = PrecisionSettings(mode="hybrid")
    note = None
    try:
        h, rep = convert_precision(qdq, hyb)
    except Exception as e:  # noqa: BLE001 - the known INT8-feed bug of the shape fallback
        if "int8" not in str(e):
            raise
        note = f"precision pass failed ({type(e).__name__}: {str(e)[:120]}); measured with the dtype fix applied locally"
        with precision_pass_int8_fix():
            h, rep = convert_precision(qdq, hyb)
    onnx.checker.check_model(h)
    probe = FidelityProbe(fp32_path, heldout, names, outputs[0], 8)
    hybrid_only, _ = convert_precision(onnx.load(str(fp32_path)), hyb)
    return {"hybrid_int8": fid_row(probe.measure(h)), "hybrid_fp16_only": fid_row(probe.measure(hybrid_only)),
            "casts_inserted": rep.casts_inserted, "checker": "ok", "workaround": note}


def ort_fusion(qdq, fp32_path, heldout, names, outputs):
    """ORT with graph optimizations (QDQ fused into integer kernels) vs the literal Q/DQ graph."""
    from compiler.eval.fp16_reference import session

    probe = FidelityProbe(fp32_path, heldout, names, outputs[0], 8)
    literal, fused = probe.measure(qdq, optimize=False), probe.measure(qdq, optimize=True)
    a, b = session(qdq, faithful_fp16=True), session(qdq, faithful_fp16=False)
    diffs, cos = [], []
    for feeds, lengths in heldout.batches(8, names):
        x, y = a.run([outputs[0]], feeds)[0], b.run([outputs[0]], feeds)[0]
        for i, n in enumerate(lengths):
            u, v = x[i, :n].astype(np.float64).ravel(), y[i, :n].astype(np.float64).ravel()
            diffs.append(np.abs(u - v))
            cos.append(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
    d = np.concatenate(diffs)
    return {"literal_qdq": fid_row(literal), "ort_optimized": fid_row(fused),
            "optimized_vs_literal": {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                                     "share_above_1e-2": float(np.mean(d > 1e-2)), "cosine_min": min(cos)}}


def latency(fp32_path, qdq, calib, names, runs=20, warmup=3):
    import onnxruntime as ort

    from compiler.graph.onnx_io import ort_session

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = {"fp32": ort_session(fp32_path, opts), "int8_qdq": ort_session(qdq, opts)}
    windows = calibration_windows(calib)
    out = {}
    for batch in (1, 8):
        feeds = window_feeds(windows[:batch], names)
        for label, sess in sessions.items():
            for _ in range(warmup):
                sess.run(None, feeds)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, feeds)
                times.append((time.perf_counter() - t) * 1e3)
            out[f"{label}_b{batch}_ms"] = round(float(np.median(times)), 2)
        out[f"speedup_b{batch}"] = round(out[f"fp32_b{batch}_ms"] / out[f"int8_qdq_b{batch}_ms"], 2)
    import os

    out.update({"sequence": 128, "runs": runs, "warmup": warmup, "threads": "ORT default (all cores)",
                "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                "optimization": "ORT_ENABLE_ALL", "provider": "CPUExecutionProvider"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("engines/benchmarks"))
    ap.add_argument("--only", default="", help="rows as method:bmm:alpha,... e.g. max:0:0.8 (default: all)")
    args = ap.parse_args()
    work = args.out / "int8_ptq"
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    start = time.perf_counter()
    loaded, path, outputs = export(work)
    names, tok = loaded.input_names, loaded.tokenizer
    data = DataSettings(samples=args.samples, calib_samples=args.calib_samples)
    calib = tokenized_set(load_texts(data, count=data.calib_samples), tok, data.max_length, data.cache_dir)
    heldout = tokenized_set(load_texts(data, skip=data.calib_samples), tok, data.max_length, data.cache_dir)
    wanted = set()
    for spec in filter(None, args.only.split(",")):
        m, b, a = spec.split(":")
        wanted.add((m, b == "1", None if a == "none" else float(a)))

    print(f"MiniLM opset 19, {len(calib)} calibration / {len(heldout)} held-out WikiText-2 samples")
    import onnx
    import onnxruntime
    import torch

    result = {"versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__},
              "model": "minilm (all-MiniLM-L6-v2)", "opset": 19, "calib_samples": len(calib),
              "heldout_samples": len(heldout), "budget": {"min_cosine": 0.99, "max_excluded": 8}}
    result["ort_quantize_static"] = ort_baseline(path, calib, heldout, names, outputs)
    result["rows"] = grid(path, calib, heldout, names, outputs, cache, wanted)
    result["thresholds"] = thresholds(path, calib, names, cache)

    default = QuantSettings()
    qdq, rep = quantize_within_budget(path, calib, heldout, names, outputs, default, cache)
    result["default"] = {"settings": asdict(default), "report": rep.summary(),
                         "excluded": [e.name for e in rep.excluded]}
    result["ort_fusion"] = ort_fusion(qdq, path, heldout, names, outputs)
    result["hybrid"] = hybrid(qdq, path, heldout, names, outputs)
    result["latency"] = latency(path, qdq, calib, names)
    result["seconds"] = round(time.perf_counter() - start, 1)

    fmt = lambda v: "-" if v is None else f"{v:.5f}"  # noqa: E731
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
    print("\nthresholds (unsmoothed graph, 128 windows):")
    for label, t in result["thresholds"].items():
        print(f"  {label:<42} max {t['max']:>8.4f}  entropy {t['entropy']:>8.4f}  percentile {t['percentile']:>8.4f}")
    fu = result["ort_fusion"]
    print(f"\nORT QDQ fusion (default settings): literal Q/DQ cos_min {fmt(fu['literal_qdq']['cosine_min'])}, "
          f"ORT-optimized {fmt(fu['ort_optimized']['cosine_min'])}; optimized vs literal: max |diff| "
          f"{fu['optimized_vs_literal']['max_abs_diff']:.4f}, mean {fu['optimized_vs_literal']['mean_abs_diff']:.2e}, "
          f"cosine min {fu['optimized_vs_literal']['cosine_min']:.6f}")
    h = result["hybrid"]
    print(f"hybrid FP16 + INT8 (FP16 emulation): cos_min {fmt(h['hybrid_int8']['cosine_min'])} mean "
          f"{fmt(h['hybrid_int8']['cosine_mean'])}; hybrid FP16 only: {fmt(h['hybrid_fp16_only']['cosine_min'])}"
          + (f"\n  note: {h['workaround']}" if h["workaround"] else ""))
    lat = result["latency"]
    print(f"ORT CPU latency ({lat['cpu_count']} shared cores, load {lat['load_average_1min']}), sequence 128, "
          f"median of {lat['runs']} (ms): batch 1 FP32 {lat['fp32_b1_ms']} / INT8 "
          f"{lat['int8_qdq_b1_ms']} (x{lat['speedup_b1']}); batch 8 FP32 {lat['fp32_b8_ms']} / INT8 "
          f"{lat['int8_qdq_b8_ms']} (x{lat['speedup_b8']})")
    (args.out / "int8_ptq.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'int8_ptq.json'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
