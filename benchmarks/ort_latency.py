"""Benchmark: ONNX Runtime CPU latency and throughput of ONNX graphs on real token ids.

    python benchmarks/ort_latency.py \
        --onnx fp32=engines/minilm/pretrained/model.fp32.onnx \
        --onnx hybrid=engines/minilm/pretrained/hybrid/model.onnx [--onnx int8=PATH] \
        [--batch 1 8] [--seq 128] [--runs 20] [--warmup 5] [--threads N] \
        [--interleave] [--model minilm] [--out engines/benchmarks]

Each graph gets one ONNX Runtime CPU session (graph optimizations ORT_ENABLE_ALL, so
Q/DQ pairs around MatMul fuse into INT8 kernels where ORT supports the pattern;
`--threads` intra-op threads, default ONNX Runtime's own). Inputs are real WikiText-2
test text (`calibration.load_texts`) tokenized with the model's tokenizer and packed
into rows of exactly `--seq` tokens ([CLS] + text + [SEP] for BERT tokenizers; each row
different text), attention mask all ones. After `--warmup` untimed runs, `--runs` runs
are timed one by one: median, p90 and p99 latency (ms; with few runs p99 is about the
slowest run) and samples/s at the median.

FP16 graphs run as they are, and their rows say so: ONNX Runtime's CPU provider has no
FP16 MatMul/GELU/LayerNorm kernels on x86, inserts Casts and computes those ops in FP32,
so the number measures that fallback, not FP16 inference (TensorRT is where FP16 speed
shows).

Graphs are measured one after the other; with `--interleave` all sessions stay open and
each timed round runs every graph once in turn, so a drifting load on a shared machine
hits them alike (the JSON records the 1-minute load average per row). Prints a markdown
table and writes `<out>/ort_latency.json` with the CPU model and core count.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.artifacts import write_json  # noqa: E402
from compiler.errors import CompilerError  # noqa: E402
from compiler.graph.onnx_io import onnx_sha256  # noqa: E402

FP16_NOTE = ("FP16 graph: ORT CPU has no FP16 MatMul kernels (Cast + FP32 fallback), "
             "not representative")
QDQ_NOTE = "INT8 Q/DQ (ORT_ENABLE_ALL fuses the patterns it supports into INT8 kernels)"


def named_path(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=PATH")
    return name, Path(path)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def packed_ids(tokenizer, seq: int, rows: int) -> np.ndarray:
    """(rows, seq) int64 ids of WikiText-2 text, each row [CLS] body [SEP] (special tokens where
    the tokenizer has them), no padding: `compiler.quant.quantize.calibration_windows`."""
    from calibration import load_texts, tokenized_set
    from compiler.quant.quantize import calibration_windows
    from compiler.settings import DataSettings

    lines = 16
    while True:  # load_texts raises DataError past the file's end
        tokens = tokenized_set(load_texts(DataSettings(samples=lines), count=lines), tokenizer, 512, None)
        if sum(len(x) for x in tokens.input_ids) >= rows * seq:
            return calibration_windows(tokens, count=rows, length=seq)
        lines *= 2


def feeds_for(session, ids: np.ndarray) -> dict[str, np.ndarray]:
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
    known = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids), "position_ids": positions.copy()}
    names = [i.name for i in session.get_inputs()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"graph inputs {unknown} cannot be filled from text; "
                         f"known: {sorted(known)}")
    return {n: known[n] for n in names}


def describe(path: Path) -> tuple[bool, int]:
    """(has FP16 tensors, number of Q/DQ nodes) of the graph; its weights unread."""
    import onnx

    from compiler.eval.fp16_reference import has_fp16
    from compiler.graph.onnx_io import load_onnx

    if not path.is_file():
        load_onnx(path, check=False)  # InvalidOnnxError with the next step
    light = onnx.load(str(path), load_external_data=False)
    qdq_ops = ("QuantizeLinear", "DequantizeLinear")
    qdq = sum(n.op_type in qdq_ops for n in light.graph.node)
    return has_fp16(light), qdq


def timed(session, feeds, runs: int) -> list[float]:
    """Milliseconds of `runs` runs, one by one."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summarize(times: list[float]) -> dict:
    t = np.asarray(times)
    ms = lambda v: round(float(v), 3)  # noqa: E731
    return {"median_ms": ms(np.median(t)), "p90_ms": ms(np.percentile(t, 90)),
            "p99_ms": ms(np.percentile(t, 99)), "mean_ms": ms(t.mean()),
            "min_ms": ms(t.min()), "runs": len(t)}


def parse_args() -> argparse.Namespace:
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
    ap.add_argument("--out", type=Path, default=Path("engines/benchmarks"))
    args = ap.parse_args()
    names = [n for n, _ in args.onnx]
    if len(set(names)) != len(names):
        ap.error(f"graph names must be unique: {names}")
    if args.runs < 1 or args.warmup < 0 or min(args.batch) < 1 or args.seq < 2:
        ap.error("need --runs >= 1, --warmup >= 0, --batch >= 1, --seq >= 2")
    return args


def run(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    from compiler.training.models import load_model
    from compiler.graph.onnx_io import ort_session
    from compiler.settings import ModelSettings

    start = time.perf_counter()
    loaded = load_model(ModelSettings(name=args.model, weights=args.weights))
    tokenizer = loaded.tokenizer
    del loaded
    ids = packed_ids(tokenizer, args.seq, max(args.batch))
    threads = args.threads if args.threads else "ORT default"
    machine = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
               "usable_cores": usable_cores(), "platform": platform.platform(),
               "onnxruntime": ort.__version__, "provider": "CPUExecutionProvider",
               "optimization": "ORT_ENABLE_ALL", "intra_op_threads": threads}
    print(f"{machine['cpu_model']}, {machine['usable_cores']} usable cores of "
          f"{machine['cpu_count']}; ONNX Runtime {ort.__version__} CPU, "
          f"ORT_ENABLE_ALL, threads {threads}; sequence {args.seq}, {args.warmup} "
          f"warm-up + {args.runs} timed runs", flush=True)

    def open_session(path: Path):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if args.threads:
            opts.intra_op_num_threads = args.threads
        t0 = time.perf_counter()
        session = ort_session(path, opts)
        return session, round(time.perf_counter() - t0, 2)

    graphs = []
    for name, path in args.onnx:
        fp16, qdq = describe(path)
        notes = [FP16_NOTE] if fp16 else []
        notes += [f"{QDQ_NOTE}, {qdq} Q/DQ nodes"] if qdq else []
        graphs.append({"name": name, "path": str(path), "sha256": onnx_sha256(path),
                       "fp16": fp16, "qdq_nodes": qdq, "notes": notes})

    def row(g: dict, batch: int, times: list[float]) -> dict:
        stats = summarize(times)
        median = stats["median_ms"]
        print(f"  {g['name']:<12} batch {batch:>3}: median {median:9.2f} ms",
              flush=True)
        return {"name": g["name"], "path": g["path"], "sha256": g["sha256"],
                "batch": batch, "seq": args.seq, **stats,
                "samples_per_s": round(batch / stats["median_ms"] * 1e3, 2),
                "fp16": g["fp16"], "qdq_nodes": g["qdq_nodes"], "notes": g["notes"],
                "session_load_s": g["session_load_s"],
                "load_average_1min": round(os.getloadavg()[0], 2)}

    rows = []
    if args.interleave:  # every session open; each timed round runs each graph once
        sessions = []
        for g in graphs:
            sess, g["session_load_s"] = open_session(Path(g["path"]))
            sessions.append(sess)
        for batch in args.batch:
            feeds = [feeds_for(sess, ids[:batch]) for sess in sessions]
            for sess, f in zip(sessions, feeds):
                timed(sess, f, args.warmup)
            times: list[list[float]] = [[] for _ in graphs]
            for _ in range(args.runs):
                for k, (sess, f) in enumerate(zip(sessions, feeds)):
                    times[k] += timed(sess, f, 1)
            rows += [row(g, batch, t) for g, t in zip(graphs, times)]
        del sessions
    else:  # one graph after the other, one session at a time
        for g in graphs:
            sess, g["session_load_s"] = open_session(Path(g["path"]))
            for batch in args.batch:
                feeds = feeds_for(sess, ids[:batch])
                timed(sess, feeds, args.warmup)
                rows.append(row(g, batch, timed(sess, feeds, args.runs)))
            del sess

    print("\n| graph | batch | seq | median ms | p90 ms | p99 ms | samples/s "
          "| load avg | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['name']} | {r['batch']} | {r['seq']} | {r['median_ms']:.2f} "
              f"| {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['samples_per_s']:.1f} "
              f"| {r['load_average_1min']} | {'; '.join(r['notes']) or '-'} |")
    result = {"machine": machine, "model": args.model, "weights": args.weights,
              "inputs": "WikiText-2 test, packed to exactly seq tokens per row, "
                        "attention mask all ones",
              "runs": args.runs, "warmup": args.warmup, "interleave": args.interleave,
              "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
    write_json(args.out / "ort_latency.json", result)
    print(f"\nwrote {args.out / 'ort_latency.json'} ({result['seconds']} s)")


def main() -> None:
    args = parse_args()
    try:
        run(args)
    except CompilerError as e:  # missing text or ONNX file: one clear message
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
