"""Where ONNX Runtime CPU spends a run, per operator type: why a graph is slower than another.

    python -m benchmarks.op_profile fp32=engines/bert-base/random/model.fp32.onnx \
        int8=engines/bert-base/random/int8/model.qdq.onnx [--shape 1x32 --shape 8x128] \
        [--iterations 20] [--threads 2] [--out engines/benchmarks]

Each graph runs on ONNX Runtime's CPU provider (ORT_ENABLE_ALL, as `benchmarks.latency`'s
`ort-cpu-*` rows; `--threads` intra-op threads, one inter-op) with its profiler on
(`SessionOptions.enable_profiling`): after one warm-up run, `--iterations` runs of all-ones token
ids at each batch x sequence shape. The profiler's node events (`"cat": "Node"`, `dur` in
microseconds) are summed per operator type (`args.op_name`) and divided by the iterations:
ms per run, and the share of the run's node time. Prints one table per shape and writes
`<out>/op_profile.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_out_argument, markdown_table, named_path, run_main, write_result


def parse_shape(text: str) -> tuple[int, int]:
    """`BxS` -> (batch, sequence).

    Raises:
        argparse.ArgumentTypeError: not two positive integers joined by `x`.
    """
    try:
        b, s = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxSEQUENCE, e.g. 1x32") from None
    if b < 1 or s < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch and sequence must be >= 1")
    return b, s


def op_times(path: Path, shape: tuple[int, int], iterations: int, threads: int) -> dict[str, Any]:
    """{"ms_per_run", "ops": {op type: ms per run}, "nodes": {op type: node count}} of one graph.

    Args:
        path: ONNX file whose int64 inputs are (batch, sequence) token ids / masks / segments.
        shape: (batch, sequence) of every input.
        iterations: profiled runs (after one warm-up run that is not counted).
        threads: ONNX Runtime intra-op threads.

    Raises:
        ValueError: a graph input that is not int64 (only token-id graphs are profiled here).
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="op-profile.") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            if i.type != "tensor(int64)":
                raise ValueError(f"{path}: input {i.name!r} is {i.type}; op_profile feeds int64 token ids only")
            feeds[i.name] = np.ones(shape, np.int64) if i.name != "token_type_ids" else np.zeros(shape, np.int64)
        sess.run(None, feeds)
        for _ in range(iterations):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    total: dict[str, float] = defaultdict(float)
    nodes: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            total[op] += e["dur"] / 1000.0
            nodes[op].add(e["name"])
    runs = iterations + 1  # the profiler also recorded the warm-up run
    ops = {op: round(ms / runs, 4) for op, ms in sorted(total.items(), key=lambda kv: -kv[1])}
    return {"ms_per_run": round(sum(ops.values()), 3), "ops": ops, "nodes": {op: len(v) for op, v in nodes.items()}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"threads": args.threads, "iterations": args.iterations, "shapes": {}}
    for shape in args.shape:
        key = f"{shape[0]}x{shape[1]}"
        per = {name: op_times(path, shape, args.iterations, args.threads) for name, path in args.graphs}
        result["shapes"][key] = per
        names = [n for n, _ in args.graphs]
        ops = sorted({op for p in per.values() for op in p["ops"]},
                     key=lambda op: -max(p["ops"].get(op, 0) for p in per.values()))
        rows = [[op, *(f"{per[n]['ops'].get(op, 0):.3f} ({per[n]['nodes'].get(op, 0)})" for n in names)]
                for op in ops[:14]]
        rows.append(["node time per run", *(f"**{per[n]['ms_per_run']:.2f}**" for n in names)])
        print(f"\n{key}: ms per run by operator type (node count), {args.threads} threads\n")
        print(markdown_table(["op type", *names], rows, align="l" + "r" * len(names)))
    write_result(args.out, "op_profile", result)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+", type=named_path, help="NAME=PATH of each ONNX graph")
    ap.add_argument("--shape", type=parse_shape, action="append", default=None, help="BxS (repeatable; default 1x32)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    add_out_argument(ap)
    args = ap.parse_args(argv)
    args.shape = args.shape or [(1, 32)]
    run_main(run, args)


if __name__ == "__main__":
    main()
