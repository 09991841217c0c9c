"""Benchmark: the 2:4 starting point (magnitude / Wanda / SparseGPT) on MiniLM, and the recovery curve.

    python -m benchmarks.sparsegpt_start magnitude wanda sparsegpt                 # 0 steps: right after pruning
    python -m benchmarks.sparsegpt_start wanda sparsegpt --steps 300 --eval-every 50   # + the recovery curve

Each method prunes a fresh copy of MiniLM 2:4 with `compiler.training.prune.prune_2_4` on the
pipeline's 128 calibration lines (`calibration.layout.TokenSets`, WikiText-2 test), then measures
the cosine per sample of last_hidden_state at valid tokens against the dense FP32 model on the
64 held-out WikiText-2 lines, in PyTorch FP32. With `--steps N` it then runs the pipeline's
recovery (`compiler.training.distill.distill` with the masks held, the `SparsitySettings`
defaults for learning rate and schedule unless given, `TrainSettings` defaults otherwise) and
measures the held-out cosine again every `--eval-every` steps: the curve of cosine against
training minutes (evaluation time left out). Prints a table, writes `<out>/sparsegpt_start.json`
(runs of earlier invocations kept, keyed by method and steps) and `sparsegpt_start.png`.
Times are wall time on whatever else the machine runs (the JSON records the load average).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np

from benchmarks.common import add_out_argument, markdown_table, save_plot, write_result
from benchmarks.recovery_sweep import SweepData, sweep_data
from compiler.eval.fidelity import sample_fidelity
from compiler.settings import SparsitySettings, TrainSettings
from compiler.training.distill import distill
from compiler.training.prune import hold_masks, prune_2_4


class HeldOut:
    """Held-out cosine of a student against the dense model's outputs, computed once."""

    def __init__(self, teacher: Any, tokens: Any, input_names: list[str]) -> None:
        import torch

        self.names = input_names
        self.batches = []  # (inputs, lengths, teacher last_hidden_state)
        with torch.no_grad():
            for feeds, lengths in tokens.batches(16, input_names):
                inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
                self.batches.append((inputs, lengths, teacher(**inputs).last_hidden_state.numpy()))

    def cosines(self, student: Any) -> list[float]:
        """Per-sample cosine of last_hidden_state at valid tokens, student vs dense
        (`compiler.eval.fidelity.sample_fidelity`, as `benchmarks.recovery_sweep`)."""
        import torch

        out = []
        with torch.no_grad():
            for inputs, lengths, ref in self.batches:
                got = student(**inputs).last_hidden_state.numpy()
                out += [sample_fidelity(ref, got, i, n)[0] for i, n in enumerate(lengths)]
        return out


def point(step: int, train_s: float, cos: list[float]) -> dict[str, Any]:
    return {"step": step, "train_minutes": round(train_s / 60, 3), "cosine_mean": float(np.mean(cos)),
            "cosine_min": float(min(cos))}


def run_method(method: str, sd: SweepData, held: HeldOut, args: argparse.Namespace) -> dict[str, Any]:
    """Prune a fresh copy by `method`, measure it, recover `args.steps` steps measuring the curve."""
    teacher, names = sd.loaded.module, sd.loaded.input_names
    student = copy.deepcopy(teacher)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    masks, report = prune_2_4(student, SparsitySettings(pattern="2:4", method=method), sd.calib, names)
    prune_s = time.perf_counter() - start
    curve = [point(0, 0.0, held.cosines(student))]
    print(f"  {method}: pruned in {prune_s:.1f} s, held-out cosine mean {curve[0]['cosine_mean']:.4f} "
          f"(min {curve[0]['cosine_min']:.4f})", flush=True)
    train = replace(TrainSettings(), lr=args.lr, schedule=args.schedule, bf16=args.bf16, device=args.device,
                    steps=args.steps)
    if args.steps:
        hold = hold_masks(masks, student)
        clock = {"step": 0, "eval_s": 0.0, "start": time.perf_counter()}

        def after_step(model: Any) -> None:
            hold(model)
            clock["step"] += 1
            if clock["step"] % args.eval_every == 0 or clock["step"] == args.steps:
                t = time.perf_counter()
                curve.append(point(clock["step"], t - clock["start"] - clock["eval_s"], held.cosines(model)))
                clock["eval_s"] += time.perf_counter() - t
                print(f"    step {clock['step']}: {curve[-1]['train_minutes']:.1f} min, cosine mean "
                      f"{curve[-1]['cosine_mean']:.4f}", flush=True)

        hold(student)
        distill(student, teacher, sd.train, names, train, after_step=after_step)
    return {"method": method, "steps": args.steps, "lr": args.lr, "schedule": args.schedule, "bf16": args.bf16,
            "device": args.device, "batch_size": train.batch_size, "layerwise": train.layerwise,
            "train_samples": len(sd.train), "prune_seconds": round(prune_s, 1),
            "zero_fraction": report.zero_fraction, "load_average_1min": round(load, 2),
            "cpu_count": os.cpu_count(), "curve": curve}


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n" + markdown_table(
        ["method", "prune s", "step", "train min", "cosine mean", "cosine min"],
        [[r["method"], r["prune_seconds"], p["step"], f"{p['train_minutes']:.1f}", f"{p['cosine_mean']:.4f}",
          f"{p['cosine_min']:.4f}"] for r in rows for p in r["curve"]]))


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    def draw(ax: Any) -> None:
        for r in rows:
            if len(r["curve"]) > 1:
                ax.plot([p["train_minutes"] for p in r["curve"]], [p["cosine_mean"] for p in r["curve"]],
                        marker="o", label=f"{r['method']} ({r['steps']} steps, lr {r['lr']:g})")
                for p in r["curve"][1:]:  # the step of each point: wall minutes depend on the load
                    ax.annotate(str(p["step"]), (p["train_minutes"], p["cosine_mean"]), fontsize=7,
                                textcoords="offset points", xytext=(3, -9))
        ax.set_xlabel("training minutes (wall, shared CPU; pruning and evaluation left out); labels: steps")
        ax.set_ylabel("held-out cosine mean vs dense FP32")
        ax.set_title("MiniLM 2:4 recovery from each starting point")
        ax.grid(alpha=0.3)
        ax.legend()

    if any(len(r["curve"]) > 1 for r in rows):
        save_plot(path, draw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+", choices=("magnitude", "wanda", "sparsegpt"))
    ap.add_argument("--steps", type=int, default=0, help="recovery steps after pruning (0: none)")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between held-out measurements")
    ap.add_argument("--lr", type=float, default=SparsitySettings.recover_lr)
    ap.add_argument("--schedule", default=SparsitySettings.recover_schedule)
    ap.add_argument("--bf16", action="store_true", help="student under bfloat16 autocast (TrainSettings.bf16)")
    ap.add_argument("--device", default=TrainSettings.device, help="training device (cpu, cuda, auto)")
    add_out_argument(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sd = sweep_data(None)
    held = HeldOut(sd.loaded.module, sd.heldout, sd.loaded.input_names)
    rows = [run_method(m, sd, held, args) for m in args.methods]
    print_table(rows)
    path = args.out / "sparsegpt_start.json"
    keys = {(r["method"], r["steps"]) for r in rows}
    previous = [r for r in json.loads(path.read_text())["rows"] if (r["method"], r["steps"]) not in keys] \
        if path.is_file() else []
    write_result(args.out, "sparsegpt_start", {"rows": previous + rows})
    plot(previous + rows, args.out / "sparsegpt_start.png")


if __name__ == "__main__":
    main()
