"""Benchmark: ONNX Runtime CPU latency and throughput of ONNX graphs on real token ids.

    python -m benchmarks.ort_latency \
        --onnx fp32=engines/minilm/pretrained/model.fp32.onnx \
        --onnx hybrid=engines/minilm/pretrained/hybrid/model.onnx [--onnx int8=PATH] \
        [--batch 1 8] [--seq 128] [--runs 20] [--warmup 5] [--threads N] \
        [--interleave] [--model minilm] [--out engines/benchmarks]

Each graph gets one ONNX Runtime CPU session (graph optimizations ORT_ENABLE_ALL, so
Q/DQ pairs around MatMul fuse into INT8 kernels where ORT supports the pattern;
`--threads` intra-op threads, default ONNX Runtime's own). Inputs are real WikiText-2
test text (`calibration.load_texts`) tokenized with the model's tokenizer and packed
into rows of exactly `--seq` tokens (`compiler.quant.calibrate.calibration_windows`:
[CLS] + text + [SEP] for BERT tokenizers; each row different text), attention mask all
ones (`compiler.quant.calibrate.window_feeds`). After `--warmup` untimed runs, `--runs`
runs are timed one by one: median, p90 and p99 latency (ms; with few runs p99 is about
the slowest run) and samples/s at the median.

FP16 graphs run as they are, and their rows say so: ONNX Runtime's CPU provider has no
FP16 MatMul/GELU/LayerNorm kernels on x86, inserts Casts and computes those ops in FP32,
so the number measures that fallback, not FP16 inference (TensorRT is where FP16 speed
shows).

Graphs are measured one after the other; with `--interleave` all sessions stay open and
each timed round runs every graph once in turn, so a drifting load on a shared machine
hits them alike (the JSON records the 1-minute load average per row). Prints a markdown
table, writes `<out>/ort_latency.json` with the CPU model and core count, and (with
matplotlib) `<out>/ort_latency.png`: median latency per graph and batch shape.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (add_out_argument, graph_without_weights, grouped_bars, load_tokenizer,
                               markdown_table, named_path, run_main, save_plot, write_result)
from benchmarks.speed.timing import cpu_model, usable_cores

FP16_NOTE = ("FP16 graph: ORT CPU has no FP16 MatMul kernels (Cast + FP32 fallback), "
             "not representative")
QDQ_NOTE = "INT8 Q/DQ (ORT_ENABLE_ALL fuses the patterns it supports into INT8 kernels)"


def packed_ids(tokenizer: Any, seq: int, rows: int) -> np.ndarray:
    """(rows, seq) int64 ids of WikiText-2 text, each row [CLS] body [SEP] (special tokens where
    the tokenizer has them), no padding: `compiler.quant.calibrate.calibration_windows`.

    Raises:
        compiler.errors.DataError: the text holds fewer than rows x seq tokens.
    """
    from calibration import load_texts, tokenized_set
    from compiler.quant.calibrate import calibration_windows
    from compiler.settings import DataSettings

    lines = 16
    while True:  # load_texts raises DataError past the file's end
        tokens = tokenized_set(load_texts(DataSettings(samples=lines), count=lines), tokenizer, 512, None)
        if sum(len(x) for x in tokens.input_ids) >= rows * seq:
            return calibration_windows(tokens, count=rows, length=seq)
        lines *= 2


def feeds_for(session: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The session's feeds for (batch, seq) ids (`compiler.quant.calibrate.window_feeds`).

    Raises:
        compiler.errors.DataError: a graph input that text cannot fill.
    """
    from compiler.quant.calibrate import window_feeds

    return window_feeds(ids, [i.name for i in session.get_inputs()])


def describe(name: str, path: Path) -> dict[str, Any]:
    """One graph's entry: path, sha256, FP16 tensors or not, Q/DQ node count, notes (weights unread).

    Raises:
        compiler.errors.InvalidOnnxError: no file at `path`.
    """
    from compiler.eval.fp16_reference import has_fp16
    from compiler.graph.onnx_io import onnx_sha256

    light = graph_without_weights(path)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in light.graph.node)
    fp16 = has_fp16(light)
    notes = [FP16_NOTE] if fp16 else []
    notes += [f"{QDQ_NOTE}, {qdq} Q/DQ nodes"] if qdq else []
    return {"name": name, "path": str(path), "sha256": onnx_sha256(path), "fp16": fp16, "qdq_nodes": qdq,
            "notes": notes}


def machine_info(threads: int | None) -> dict[str, Any]:
    """CPU model, cores, platform and ONNX Runtime settings of this run."""
    import onnxruntime as ort

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable_cores(),
            "platform": platform.platform(), "onnxruntime": ort.__version__,
            "provider": "CPUExecutionProvider", "optimization": "ORT_ENABLE_ALL",
            "intra_op_threads": threads if threads else "ORT default"}


def open_session(model: Any, threads: int | None) -> tuple[Any, float]:
    """(ONNX Runtime CPU session of `model` (a path or onnx.ModelProto) with ORT_ENABLE_ALL and
    `threads` intra-op threads (None: ONNX Runtime's default), seconds it took to open)."""
    import onnxruntime as ort

    from compiler.graph.onnx_io import ort_session

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    start = time.perf_counter()
    session = ort_session(model, opts)
    return session, round(time.perf_counter() - start, 2)


def timed(session: Any, feeds: dict[str, np.ndarray], runs: int) -> list[float]:
    """Milliseconds of `runs` runs, one by one."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summarize(times: list[float]) -> dict[str, float | int]:
    """Median, p90, p99, mean and min (ms, 3 decimals) of run times, and their count."""
    t = np.asarray(times)
    ms = lambda v: round(float(v), 3)  # noqa: E731
    return {"median_ms": ms(np.median(t)), "p90_ms": ms(np.percentile(t, 90)),
            "p99_ms": ms(np.percentile(t, 99)), "mean_ms": ms(t.mean()),
            "min_ms": ms(t.min()), "runs": len(t)}


def latency_row(graph: dict[str, Any], batch: int, seq: int, times: list[float]) -> dict[str, Any]:
    """One table / JSON row: the graph's entry, the shape, latency statistics and samples/s."""
    stats = summarize(times)
    print(f"  {graph['name']:<12} batch {batch:>3}: median {stats['median_ms']:9.2f} ms", flush=True)
    return {"name": graph["name"], "path": graph["path"], "sha256": graph["sha256"],
            "batch": batch, "seq": seq, **stats,
            "samples_per_s": round(batch / stats["median_ms"] * 1e3, 2),
            "fp16": graph["fp16"], "qdq_nodes": graph["qdq_nodes"], "notes": graph["notes"],
            "session_load_s": graph["session_load_s"],
            "load_average_1min": round(os.getloadavg()[0], 2)}


def time_interleaved(graphs: list[dict[str, Any]], ids: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """Every session open; each timed round runs each graph once, per batch size."""
    sessions = []
    for g in graphs:
        sess, g["session_load_s"] = open_session(Path(g["path"]), args.threads)
        sessions.append(sess)
    rows = []
    for batch in args.batch:
        feeds = [feeds_for(sess, ids[:batch]) for sess in sessions]
        for sess, f in zip(sessions, feeds):
            timed(sess, f, args.warmup)
        times: list[list[float]] = [[] for _ in graphs]
        for _ in range(args.runs):
            for k, (sess, f) in enumerate(zip(sessions, feeds)):
                times[k] += timed(sess, f, 1)
        rows += [latency_row(g, batch, args.seq, t) for g, t in zip(graphs, times)]
    return rows


def time_in_turn(graphs: list[dict[str, Any]], ids: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """One graph after the other, one session open at a time."""
    rows = []
    for g in graphs:
        sess, g["session_load_s"] = open_session(Path(g["path"]), args.threads)
        for batch in args.batch:
            feeds = feeds_for(sess, ids[:batch])
            timed(sess, feeds, args.warmup)
            rows.append(latency_row(g, batch, args.seq, timed(sess, feeds, args.runs)))
        del sess
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n" + markdown_table(
        ["graph", "batch", "seq", "median ms", "p90 ms", "p99 ms", "samples/s", "load avg", "note"],
        [[r["name"], r["batch"], r["seq"], f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
          f"{r['samples_per_s']:.1f}", r["load_average_1min"], "; ".join(r["notes"]) or "-"] for r in rows],
        align="lrrrrrrrl"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Median latency (ms) per graph, one bar group per shape (batch x seq)."""
    shapes = list(dict.fromkeys(f"{r['batch']}x{r['seq']}" for r in rows))
    median = {(r["name"], f"{r['batch']}x{r['seq']}"): r["median_ms"] for r in rows}
    series = {name: [median[name, s] for s in shapes] for name in dict.fromkeys(r["name"] for r in rows)}

    def draw(ax: Any) -> None:
        grouped_bars(ax, shapes, series)
        ax.set_xlabel("batch x sequence")
        ax.set_ylabel("median latency (ms)")
        ax.set_title("ONNX Runtime CPU latency per shape")

    save_plot(path, draw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=named_path, action="append", required=True,
                    metavar="NAME=PATH", help="an ONNX graph to time (repeatable)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (default: ONNX Runtime's)")
    ap.add_argument("--interleave", action="store_true",
                    help="keep every session open and time the graphs in turn, run by "
                         "run (fairer on a shared machine whose load drifts; holds all "
                         "graphs in memory)")
    ap.add_argument("--model", default="minilm",
                    help="model whose tokenizer makes the token ids")
    ap.add_argument("--weights", default="pretrained", choices=("pretrained", "random"))
    add_out_argument(ap)
    args = ap.parse_args(argv)
    names = [n for n, _ in args.onnx]
    if len(set(names)) != len(names):
        ap.error(f"graph names must be unique: {names}")
    if args.runs < 1 or args.warmup < 0 or min(args.batch) < 1 or args.seq < 2:
        ap.error("need --runs >= 1, --warmup >= 0, --batch >= 1, --seq >= 2")
    return args


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    ids = packed_ids(load_tokenizer(args.model, args.weights), args.seq, max(args.batch))
    machine = machine_info(args.threads)
    print(f"{machine['cpu_model']}, {machine['usable_cores']} usable cores of "
          f"{machine['cpu_count']}; ONNX Runtime {machine['onnxruntime']} CPU, "
          f"ORT_ENABLE_ALL, threads {machine['intra_op_threads']}; sequence {args.seq}, {args.warmup} "
          f"warm-up + {args.runs} timed runs", flush=True)
    graphs = [describe(name, path) for name, path in args.onnx]
    rows = (time_interleaved if args.interleave else time_in_turn)(graphs, ids, args)
    print_table(rows)
    result = {"machine": machine, "model": args.model, "weights": args.weights,
              "inputs": "WikiText-2 test, packed to exactly seq tokens per row, "
                        "attention mask all ones",
              "runs": args.runs, "warmup": args.warmup, "interleave": args.interleave,
              "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, "ort_latency", result)
    plot(rows, args.out / "ort_latency.png")


def main(argv: list[str] | None = None) -> None:
    run_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
