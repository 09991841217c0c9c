"""Benchmark: short 2:4 recovery runs on MiniLM to choose the pruning method and learning rate.

    python -m benchmarks.recovery_sweep --steps 250 wanda,1e-3 wanda,5e-4 magnitude,5e-4 [--schedule linear] [--bf16]

Each configuration `method,lr` prunes a fresh copy of MiniLM 2:4 (`compiler.training.prune.prune_2_4`,
Wanda scored on the 128 calibration lines), runs `compiler.training.prune.recover` (the pipeline's
distillation loop, masks held, layer-wise loss unless `--no-layerwise`, on `--device`) for
`--steps` steps on the pipeline's training text (`calibration.layout.training_texts`: WikiText-2
test after the calibration and held-out lines, or the `--train-text` files, mixed as
`--train-text` mixes them in the pipeline), then
measures cosine per sample of last_hidden_state at valid tokens against the dense model on the
64 held-out WikiText-2 lines and on the first 64 SST-2 dev sentences, all in PyTorch FP32 (the
pipeline's verify stage measures the exported FP16 graph instead). Prints a table and writes
`<out>/recovery_sweep.json` (rows of earlier runs kept, this run's appended).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_out_argument, markdown_table, write_result
from calibration import tokenized_set
from calibration.layout import TokenSets
from compiler.eval.fidelity import sample_fidelity
from compiler.eval.task_accuracy import load_sst2
from compiler.settings import DataSettings, ModelSettings, SparsitySettings, TrainSettings
from compiler.training.models import load_model
from compiler.training.prune import prune_2_4, recover


@dataclass
class SweepData:
    """The dense teacher and the token sets every configuration shares (`calibration.TokenizedSet`s)."""

    loaded: Any  # compiler.training.models.LoadedModel
    data: DataSettings
    calib: Any
    heldout: Any
    sst2: Any
    train: Any


def cosines(student: Any, teacher: Any, tokens: Any, input_names: list[str]) -> list[float]:
    """Per-sample cosine of last_hidden_state at valid tokens (`compiler.eval.fidelity.sample_fidelity`)."""
    import torch

    out = []
    with torch.no_grad():
        for feeds, lengths in tokens.batches(16, input_names):
            inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
            ref = teacher(**inputs).last_hidden_state.numpy()
            got = student(**inputs).last_hidden_state.numpy()
            out += [sample_fidelity(ref, got, i, n)[0] for i, n in enumerate(lengths)]
    return out


def sweep_data(train_text: list[str] | None) -> SweepData:
    """MiniLM (dense, eval mode), calibration / held-out / SST-2 dev / training token sets
    (`calibration.layout.TokenSets`: the pipeline's text layout)."""
    loaded = load_model(ModelSettings(name="minilm"))
    loaded.module.eval()
    data = DataSettings(train_path=tuple(train_text or ()))
    tokens = TokenSets(data, loaded.tokenizer, TrainSettings.batch_size)
    sst2 = tokenized_set(load_sst2("dev", count=64)[0], loaded.tokenizer, data.max_length, data.cache_dir)
    return SweepData(loaded, data, tokens.calibration, tokens.heldout, sst2, tokens.training)


def run_config(cfg: str, sd: SweepData, args: argparse.Namespace) -> dict[str, Any]:
    """Prune a fresh copy 2:4 by `method`, recover it at `lr` (`cfg` = "method,lr"), measure it."""
    method, lr = cfg.split(",")
    teacher, names = sd.loaded.module, sd.loaded.input_names
    student = copy.deepcopy(teacher)
    masks, _ = prune_2_4(student, SparsitySettings(pattern="2:4", method=method), sd.calib, names)
    start = time.perf_counter()
    train = TrainSettings(lr=float(lr), schedule=args.schedule, group_by_length=args.group_by_length,
                          layerwise=not args.no_layerwise, bf16=args.bf16, device=args.device)
    rep = recover(student, teacher, masks, sd.train, names, train, args.steps)
    seconds = round(time.perf_counter() - start, 1)
    c = cosines(student, teacher, sd.heldout, names)
    c2 = cosines(student, teacher, sd.sst2, names)
    row = {"method": method, "lr": float(lr), "schedule": args.schedule, "steps": args.steps,
           "train_text": list(sd.data.train_path), "group_by_length": args.group_by_length,
           "layerwise": not args.no_layerwise, "bf16": args.bf16, "device": args.device,
           "train_samples": len(sd.train), "cosine_min": min(c), "cosine_mean": float(np.mean(c)),
           "sst2_cosine_min": min(c2), "sst2_cosine_mean": float(np.mean(c2)),
           "loss_last": rep.loss_last, "seconds": seconds}
    print(f"  {cfg}: cosine mean {row['cosine_mean']:.4f}, SST-2 {row['sst2_cosine_mean']:.4f} "
          f"({seconds} s)", flush=True)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    def text(r: dict[str, Any]) -> str:
        return " + ".join(Path(p).name for p in r["train_text"]) or "WikiText-2 rest"

    print("\n" + markdown_table(
        ["method", "lr", "steps", "train text", "cosine min", "cosine mean", "SST-2 dev cosine mean", "final loss",
         "s"],
        [[r["method"], f"{r['lr']:g}", r["steps"], text(r), f"{r['cosine_min']:.4f}", f"{r['cosine_mean']:.4f}",
          f"{r['sst2_cosine_mean']:.4f}", f"{r['loss_last']:.4f}", r["seconds"]] for r in rows]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="method,lr (method: magnitude or wanda)")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--schedule", default="linear")
    ap.add_argument("--train-text", action="append", default=None, metavar="PATH",
                    help="fine-tuning text, repeatable (default: WikiText-2 test after the held-out lines)")
    ap.add_argument("--group-by-length", action="store_true", help="batch samples of similar length (TrainSettings)")
    ap.add_argument("--no-layerwise", action="store_true",
                    help="loss on last_hidden_state only (TrainSettings.layerwise=False)")
    ap.add_argument("--bf16", action="store_true", help="student under bfloat16 autocast (TrainSettings.bf16)")
    ap.add_argument("--device", default=TrainSettings.device, help="training device (TrainSettings.device: cpu, cuda, auto)")
    add_out_argument(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sd = sweep_data(args.train_text)
    rows = [run_config(cfg, sd, args) for cfg in args.configs]
    print_table(rows)
    path = args.out / "recovery_sweep.json"
    previous = json.loads(path.read_text())["rows"] if path.is_file() else []
    write_result(args.out, "recovery_sweep", {"rows": previous + rows})


if __name__ == "__main__":
    main()
