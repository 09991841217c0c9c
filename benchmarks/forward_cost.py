"""What one forward pass costs on ONNX Runtime CPU: the floor under a compile's wall time.

A compile's statistics, budget and verify are forward passes of the FP32 graph (ONNX Runtime,
graph optimizations on) and of the variant on the faithful FP16 reference
(`compiler.eval.fp16_reference`: FP32 compute, every FP16 tensor rounded through Cast,
optimizations off). This times both per sample on one batch of random token ids, and the three
whole-tensor reductions the in-graph statistics run per activation (`compiler.passes.reduced_stats`:
ReduceMax, ReduceMin, ReduceSum) over one tensor, so that a compile's stage times can be set
against the arithmetic they must do (docs/precision.md, "The 5-minute goal").

    python -m benchmarks.forward_cost --fp32 .../model.fp32.onnx [--variant .../auto/model.onnx]
        [--batch 8] [--sequence 128] [--repeat 2] [--out DIR]

Writes `<out>/forward_cost.json`: seconds per sample (ms) of each graph, session-creation
seconds, and the reductions' ms and GB/s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_out_argument, markdown_table, run_main, write_result


def feeds_for(session: Any, batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids in [1000, 20000) (inside any BERT or GPT-2 vocabulary), an all-ones mask and
    zero token types, (batch, sequence) int64, for the session's inputs.

    Raises:
        SystemExit: an input that is not one of input_ids, attention_mask, token_type_ids.
    """
    rng = np.random.default_rng(seed)
    known = {"input_ids": rng.integers(1000, 20000, (batch, sequence)).astype(np.int64),
             "attention_mask": np.ones((batch, sequence), np.int64),
             "token_type_ids": np.zeros((batch, sequence), np.int64)}
    names = [i.name for i in session.get_inputs()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"graph inputs {unknown}: this benchmark fills input_ids, attention_mask, token_type_ids only")
    return {n: known[n] for n in names}


def time_graph(label: str, make_session: Any, batch: int, sequence: int, repeat: int) -> dict[str, Any]:
    """Session creation (s) and ms per sample over `repeat` timed runs after one warm-up run."""
    start = time.perf_counter()
    session = make_session()
    created = time.perf_counter() - start
    feeds = feeds_for(session, batch, sequence)
    session.run(None, feeds)
    start = time.perf_counter()
    for _ in range(repeat):
        session.run(None, feeds)
    per_sample = (time.perf_counter() - start) / repeat / batch
    return {"graph": label, "session_s": round(created, 2), "ms_per_sample": round(1e3 * per_sample, 3)}


def time_reductions(shape: tuple[int, ...], repeat: int = 20) -> dict[str, Any]:
    """ReduceMax, ReduceMin and ReduceSum over all axes of one float32 tensor of `shape`, in one
    ONNX Runtime session (what `reduced_stats` adds per activation): ms and GB/s read."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    ops = ("ReduceMax", "ReduceMin", "ReduceSum")
    graph = helper.make_graph([helper.make_node(op, ["x"], [op], keepdims=0) for op in ops], "reductions",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(op, TensorProto.FLOAT, []) for op in ops])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    session.run(None, {"x": x})
    start = time.perf_counter()
    for _ in range(repeat):
        session.run(None, {"x": x})
    seconds = (time.perf_counter() - start) / repeat
    return {"shape": list(shape), "mib": round(x.nbytes / 2**20, 1), "ms": round(1e3 * seconds, 2),
            "gb_per_s": round(len(ops) * x.nbytes / seconds / 1e9, 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    from compiler.eval.fp16_reference import fp16_emulation, session

    for p in (args.fp32, args.variant):
        if p is not None and not Path(p).is_file():
            raise SystemExit(f"{p}: no such ONNX file")
    rows = [time_graph("FP32, ONNX Runtime (optimizations on)",
                       lambda: ort.InferenceSession(str(args.fp32), providers=["CPUExecutionProvider"]),
                       args.batch, args.sequence, args.repeat)]
    if args.variant is not None:
        rows.append(time_graph("variant on the FP16 emulation (optimizations off)",
                               lambda: session(fp16_emulation(onnx.load(str(args.variant))), faithful_fp16=True,
                                               consume=True),
                               args.batch, args.sequence, args.repeat))
    reductions = time_reductions((args.batch, args.sequence, 4096))
    print("\n" + markdown_table(["graph", "session (s)", f"ms per sample (batch {args.batch} x {args.sequence})"],
                                [[r["graph"], r["session_s"], r["ms_per_sample"]] for r in rows], "lrr"))
    print(f"\nReduceMax + ReduceMin + ReduceSum over {reductions['shape']} ({reductions['mib']} MiB): "
          f"{reductions['ms']} ms, {reductions['gb_per_s']} GB/s read")
    result = {"fp32": str(args.fp32), "variant": str(args.variant) if args.variant else None, "batch": args.batch,
              "sequence": args.sequence, "repeat": args.repeat, "onnxruntime": ort.__version__, "rows": rows,
              "reductions": reductions}
    write_result(args.out, "forward_cost", result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path, required=True, help="the FP32 ONNX graph (e.g. model.fp32.onnx)")
    ap.add_argument("--variant", type=Path, default=None, help="an FP16 variant of it (e.g. auto/model.onnx)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sequence", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs after one warm-up")
    add_out_argument(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
