"""Benchmark: latency and throughput over a batch x sequence grid, every backend side by side, each
with its fidelity to PyTorch FP32.

    python -m benchmarks.latency --model minilm --grid paper|quick \
        [--backends torch-cpu-fp32,ort-cpu-fp32,...|cpu|all] [--weights random] [--fresh] \
        [--cell-budget-s 60] [--threads N] [--warmup-s 0.2] [--duration-s 1] [--min-iterations 5] \
        [--output-dir engines] [--out engines/benchmarks] [--report-only]
    make bench MODEL=minilm GRID=paper BACKENDS=cpu

Grids: `paper` batch {1, 2, 4, 8, 16, 32} x sequence {32, 64, 128, 256, 512}; `quick` batch
{1, 8} x sequence {32, 128}. Backends (`benchmarks/speed/backends.py`): torch-cpu-fp32 (the
baseline), ort-cpu-fp32, ort-cpu-fp32-fused, ort-cpu-int8, ort-cpu-int8-dynamic, openvino-cpu,
tensorrt, torch-cuda-fp32, torch-cuda-fp16, ort-cuda; `cpu` names the CPU ones, `all` every one.
A backend that cannot run here (no GPU, no TensorRT) gets its rows with status "skipped" and
the reason.

Inputs: WikiText-2 test text tokenized with the model's tokenizer into windows of exactly
`sequence` tokens ([CLS] text [SEP]), the same windows for every backend, mask all ones. Timing
(`benchmarks/speed/timing.py`), as trtexec: warm up for `--warmup-s`, then iterations until
`--duration-s` and `--min-iterations` are both reached; p50/p90/p99/mean ms, sequences/s and
tokens/s at the mean, the process's peak RSS during the cell. PyTorch and ONNX Runtime
(and OpenVINO) use `--threads` threads (default: the usable cores). A cell whose first iteration
x (min iterations + 1) passes `--cell-budget-s` is recorded as skipped with the estimate.

Accuracy per backend (`benchmarks/speed/accuracy.py`): held-out cosine min/mean and the
non-finite count against PyTorch FP32, and for MiniLM SST-2 dev accuracy with a fixed probe.

Writes `<out>/<model>/latency.json` ({"machine", "rows", "accuracy"}; the rows after every
cell, so an interrupted run keeps what it measured), `latency.md` and the plots
`latency_p50.png` and `latency_speedup.png`. A rerun keeps the cells already timed (and the
accuracy rows) unless `--fresh`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_out_argument, run_main
from benchmarks.speed.backends import BACKENDS, BASELINE, CPU_BACKENDS, Backend, Context, Runner
from benchmarks.speed.timing import (TimingPolicy, latency_stats, load_average, machine_info, time_cell,
                                     usable_cores)

GRIDS = {"paper": ((1, 2, 4, 8, 16, 32), (32, 64, 128, 256, 512)), "quick": ((1, 8), (32, 128))}
ROW_KEYS = ("model", "backend", "precision", "device", "batch", "sequence", "p50_ms", "p90_ms", "p99_ms",
            "mean_ms", "throughput_seq_s", "throughput_tok_s", "peak_rss_mib", "iterations", "status", "reason")
ACCURACY_KEYS = ("backend", "precision", "cosine_min", "cosine_mean", "nonfinite")


def backend_list(spec: str) -> list[str]:
    """`a,b,...`, `cpu` or `all` -> backend names, the baseline first (it is the accuracy
    reference and the speed-up's denominator).

    Raises:
        argparse.ArgumentTypeError: an unknown backend name.
    """
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        names += list(CPU_BACKENDS) if part == "cpu" else list(BACKENDS) if part == "all" else [part]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}, cpu, all")
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: n != BASELINE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="minilm, bert-base, bert-large, gpt2, a hub id or a folder")
    ap.add_argument("--weights", default="pretrained", choices=("pretrained", "random"))
    ap.add_argument("--grid", default="quick", choices=sorted(GRIDS))
    ap.add_argument("--backends", type=backend_list, default=backend_list("cpu"),
                    help="comma-separated backend names, or cpu / all (default: cpu)")
    ap.add_argument("--fresh", action="store_true", help="redo every cell (default: keep those in the JSON)")
    ap.add_argument("--cell-budget-s", type=float, default=TimingPolicy.budget_s,
                    help="most seconds one cell may take, estimated from its first iteration")
    ap.add_argument("--threads", type=int, default=usable_cores(), help="intra-op threads (default: usable cores)")
    ap.add_argument("--warmup-s", type=float, default=TimingPolicy.warmup_s)
    ap.add_argument("--duration-s", type=float, default=TimingPolicy.duration_s)
    ap.add_argument("--min-iterations", type=int, default=TimingPolicy.min_iterations)
    ap.add_argument("--max-iterations", type=int, default=TimingPolicy.max_iterations)
    ap.add_argument("--no-accuracy", action="store_true", help="skip the cosine / SST-2 columns")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite latency.md and the plots from latency.json")
    ap.add_argument("--sst2-train", type=int, default=2000,
                    help="SST-2 train sentences for the fixed probe (MiniLM only; 0: no SST-2)")
    ap.add_argument("--samples", type=int, default=None, help="held-out samples for the cosine (default 64)")
    ap.add_argument("--output-dir", default="engines", help="the pipeline's artifacts root (--output-dir of compile)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.threads < 1 or args.min_iterations < 1 or args.max_iterations < args.min_iterations:
        ap.error("need --threads >= 1 and 1 <= --min-iterations <= --max-iterations")
    if args.cell_budget_s <= 0:
        ap.error("--cell-budget-s must be > 0")
    return args


def build_settings(args: argparse.Namespace) -> Any:
    """The pipeline settings the graphs come from (model, weights, artifacts root, held-out samples)."""
    from compiler.settings import BuildSettings, DataSettings, ModelSettings

    data = DataSettings() if args.samples is None else DataSettings(samples=args.samples)
    return BuildSettings(model=ModelSettings(name=args.model, weights=args.weights), data=data,
                         output_dir=args.output_dir)


def result_dir(args: argparse.Namespace) -> Path:
    """`<out>/<model slug>`: the folder of latency.json, latency.md and the plots."""
    return args.out / build_settings(args).model_dir().parent.name


def cell_key(row: dict[str, Any]) -> tuple:
    return row["backend"], row["batch"], row["sequence"]


def previous_result(path: Path, args: argparse.Namespace) -> tuple[dict[tuple, dict], dict[str, dict]]:
    """Rows and accuracy rows of an earlier run to keep: timed cells, and cells whose first
    iteration passed a budget at least as large as this run's (not those skipped by prediction);
    nothing with `--fresh`, another weights mode or another thread count."""
    if args.fresh or not path.is_file():
        return {}, {}
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return {}, {}
    if old.get("weights") != args.weights or old.get("machine", {}).get("threads") != args.threads:
        return {}, {}
    keep = {cell_key(r): r for r in old.get("rows", []) if r["status"] == "ok" or (
        r.get("first_iteration_ms") and (r.get("budget_s") or 0) >= args.cell_budget_s)}
    accuracy = {a["backend"]: a for a in old.get("accuracy", []) if a.get("status", "ok") == "ok"}
    return keep, accuracy


def base_row(args: argparse.Namespace, backend: Backend, batch: int, seq: int) -> dict[str, Any]:
    """A row with every schema key; timing keys None until measured."""
    row: dict[str, Any] = {k: None for k in ROW_KEYS}
    row.update(model=args.model, backend=backend.name, precision=backend.precision, device=backend.device,
               batch=batch, sequence=seq, iterations=0, status="skipped", reason="", weights=args.weights,
               library=backend.version(), threads=args.threads, budget_s=args.cell_budget_s)
    return row


def measure_cell(runner: Runner, row: dict[str, Any], feeds: dict[str, np.ndarray], policy: TimingPolicy) -> None:
    """Time one cell into `row` (status ok with statistics, or skipped with the reason)."""
    try:
        cell = time_cell(runner.call(feeds), policy, runner.gpu_memory_mib)
    except Exception as e:  # out of memory, a shape the runtime refuses: recorded, not fatal
        row.update(status="skipped", reason=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return
    row.update(status=cell.status, reason=cell.reason, peak_rss_mib=cell.peak_rss_mib,
               first_iteration_ms=round(cell.first_ms, 3), load_average_1min=load_average()[:1] or None)
    if cell.status == "ok":
        row.update(latency_stats(cell.times_ms, row["batch"], row["sequence"]), iterations=len(cell.times_ms))
        if cell.gpu_memory_mib is not None:
            row["gpu_memory_mib"] = cell.gpu_memory_mib


class Inputs:
    """Windows of exactly `sequence` WikiText-2 tokens (`benchmarks.ort_latency.packed_ids`), made
    once per sequence length for the largest batch; every backend gets the same ones."""

    def __init__(self, tokenizer: Any, rows: int, input_names: list[str]) -> None:
        self.tokenizer, self.rows, self.names, self.ids = tokenizer, rows, input_names, {}

    def feeds(self, batch: int, seq: int) -> dict[str, np.ndarray]:
        from benchmarks.ort_latency import packed_ids
        from compiler.quant.calibrate import window_feeds

        if seq not in self.ids:
            self.ids[seq] = packed_ids(self.tokenizer, seq, self.rows)
        return window_feeds(self.ids[seq][:batch], self.names)


class Run:
    """One benchmark run: its settings, the rows so far, the accuracy reference; saves after each cell."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.dir = args, result_dir(args)
        self.json = self.dir / "latency.json"
        self.kept, self.kept_accuracy = previous_result(self.json, args)
        batches, seqs = GRIDS[args.grid]
        self.cells = [(b, s) for b in batches for s in seqs]
        self.policy = TimingPolicy(args.warmup_s, args.duration_s, args.min_iterations, args.max_iterations,
                                   args.cell_budget_s)
        settings = build_settings(args)
        self.ctx = Context(settings, args.threads, self.dir / "graphs")
        self.machine = machine_info(args.threads)
        self.rows: dict[tuple, dict] = dict(self.kept)
        self.accuracy: dict[str, dict] = dict(self.kept_accuracy)
        self.inputs = Inputs(self.ctx.loaded.tokenizer, max(batches), self.ctx.loaded.input_names)
        self.reference: Any = None

    def save(self) -> None:
        from compiler.artifacts import write_json

        order = {n: i for i, n in enumerate(BACKENDS)}
        rows = sorted(self.rows.values(), key=lambda r: (order.get(r["backend"], 99), r["batch"], r["sequence"]))
        acc = sorted(self.accuracy.values(), key=lambda a: order.get(a["backend"], 99))
        machine = {**self.machine, "load_average_end": load_average()}
        write_json(self.json, {"machine": machine, "model": self.args.model, "weights": self.args.weights,
                               "grid": self.args.grid, "policy": dataclasses.asdict(self.policy),
                               "inputs": "WikiText-2 test, windows of exactly `sequence` tokens, mask all ones",
                               "baseline": BASELINE, "rows": rows, "accuracy": acc})


def run_backend(run: Run, backend: Backend, bar: Any) -> None:
    """Every cell of one backend (kept ones untouched), then its accuracy row; the runner is
    opened only when something is left to measure, and released after."""
    todo = [c for c in run.cells if (backend.name, *c) not in run.kept]
    bar.update(len(run.cells) - len(todo))
    want_accuracy = not run.args.no_accuracy and backend.name not in run.accuracy
    if not todo and not want_accuracy:
        return
    reason, runner = backend.available(), None
    if reason is None:
        try:
            bar.set_postfix_str(f"{backend.name}: opening")
            runner = backend.open(run.ctx)
        except Exception as e:  # a graph the runtime cannot read: every cell says so
            reason = f"failed to open: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for batch, seq in todo:
        bar.set_postfix_str(f"{backend.name} {batch}x{seq}")
        row = base_row(run.args, backend, batch, seq)
        predicted = None if runner is None else predicted_over_budget(run, backend.name, batch, seq)
        if runner is None or predicted:
            row["reason"] = reason or predicted
        else:
            measure_cell(runner, row, run.inputs.feeds(batch, seq), run.policy)
        run.rows[backend.name, batch, seq] = row
        run.save()
        bar.update(1)
    if want_accuracy:
        bar.set_postfix_str(f"{backend.name}: accuracy")
        run.accuracy[backend.name] = accuracy_row(run, backend, runner, reason)
        run.save()


def predicted_over_budget(run: Run, backend: str, batch: int, seq: int) -> str | None:
    """The reason to skip a cell without running it, or None: a smaller cell of the same backend
    (batch and sequence both no larger) went over budget, or the largest such cell timed predicts
    it will (its p50 x the token ratio: attention grows with the square of the sequence, per-run
    overhead shrinks per token; the nearest cell keeps both small)."""
    policy, nearest = run.policy, None
    for (name, b, s), row in run.rows.items():
        if name != backend or b > batch or s > seq or (b, s) == (batch, seq):
            continue
        if row["status"] == "skipped" and row["reason"].startswith("over budget"):
            return f"over budget: the smaller cell {b}x{s} was (cell budget {policy.budget_s:g} s)"
        if row["status"] == "ok" and (nearest is None or b * s > nearest[0] * nearest[1]):
            nearest = (b, s, row["p50_ms"])
    if nearest is None:
        return None
    b, s, p50 = nearest
    first = p50 / 1e3 * (batch * seq) / (b * s)
    estimate = first * (policy.min_iterations + 1) + policy.warmup_s
    if estimate <= policy.budget_s:
        return None
    return (f"over budget: predicted from {b}x{s} (p50 x tokens ratio = {first:.2f} s, estimate "
            f"{estimate:.1f} s > cell budget {policy.budget_s:g} s)")


def accuracy_row(run: Run, backend: Backend, runner: Runner | None, reason: str | None) -> dict[str, Any]:
    """Held-out cosine against PyTorch FP32 (and SST-2 dev with the fixed probe) of one backend."""
    row: dict[str, Any] = {"backend": backend.name, "precision": backend.precision, "cosine_min": None,
                           "cosine_mean": None, "nonfinite": None, "status": "skipped", "reason": reason or ""}
    if runner is None:
        return row
    from benchmarks.speed.accuracy import cosine_row

    feeds, reference, probe = run.reference
    row.update(cosine_row(runner, feeds, reference), status="ok")
    if probe is not None:  # the baseline's was measured when the probe was fitted
        row["sst2_dev_accuracy"] = probe.fp32_accuracy if backend.name == BASELINE else probe.accuracy(runner)
        row["sst2_delta_points"] = round((row["sst2_dev_accuracy"] - probe.fp32_accuracy) * 100, 2)
    return row


def prepare_reference(run: Run) -> None:
    """PyTorch FP32 outputs on the held-out samples and, for MiniLM with SST-2, the fixed probe."""
    from benchmarks.speed.accuracy import Sst2Probe, heldout_feeds, reference_outputs

    ctx = run.ctx
    baseline = BACKENDS[BASELINE].open(ctx)
    feeds = heldout_feeds(ctx.settings, ctx.loaded.tokenizer, ctx.loaded.input_names)
    probe = None
    if run.args.model == "minilm" and run.args.sst2_train > 0:
        probe = Sst2Probe.fit(baseline, ctx.loaded.tokenizer, ctx.loaded.input_names, run.args.sst2_train)
    run.reference = (feeds, reference_outputs(baseline, feeds), probe)


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from benchmarks.speed.report import write_outputs

    start = time.perf_counter()
    if args.report_only:
        folder = result_dir(args)
        write_outputs(folder, json.loads((folder / "latency.json").read_text()), args.backends)
        return
    bench = Run(args)
    m = bench.machine
    print(f"{m['cpu']}, {m['usable_cores']} usable cores of {m['cores']}, {args.threads} threads; GPU: "
          f"{m['gpu']['name'] or 'none'}; load average {m['load_average_start']} (shared machine: "
          f"other jobs add noise); grid {args.grid}, {len(bench.cells)} cells x {len(args.backends)} backends",
          flush=True)
    import torch

    torch.set_num_threads(args.threads)
    if not args.no_accuracy and any(b not in bench.accuracy for b in args.backends):
        prepare_reference(bench)
    with tqdm(total=len(bench.cells) * len(args.backends), unit="cell", dynamic_ncols=True) as bar:
        for name in args.backends:
            run_backend(bench, BACKENDS[name], bar)
    bench.save()
    write_outputs(bench.dir, json.loads(bench.json.read_text()), args.backends)
    print(f"\n{bench.json} ({time.perf_counter() - start:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    run_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
