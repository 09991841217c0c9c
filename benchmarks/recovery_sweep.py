"""Benchmark: short 2:4 recovery runs on MiniLM to choose the pruning method and learning rate.

    python benchmarks/recovery_sweep.py --steps 250 wanda,1e-3 wanda,5e-4 magnitude,5e-4 [--schedule linear] [--bf16]

Each configuration `method,lr` prunes a fresh copy of MiniLM 2:4 (`compiler.training.prune.prune_2_4`,
Wanda scored on the 128 calibration lines), runs `compiler.training.prune.recover` (the pipeline's
distillation loop, masks held, layer-wise loss unless `--no-layerwise`, on `--device`) for
`--steps` steps on the pipeline's training text (`compiler.pipeline.training_texts`: WikiText-2
test after the calibration and held-out lines, or the `--train-text` files, mixed as
`--train-text` mixes them in the pipeline), then
measures cosine per sample of last_hidden_state at valid tokens against the dense model on the
64 held-out WikiText-2 lines and on the first 64 SST-2 dev sentences, all in PyTorch FP32 (the
pipeline's verify stage measures the exported FP16 graph instead). Prints a table and writes
`<out>/recovery_sweep.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibration import load_texts, tokenized_set  # noqa: E402
from compiler.eval.fidelity import sample_fidelity  # noqa: E402
from compiler.training.models import load_model  # noqa: E402
from compiler.pipeline import training_texts  # noqa: E402
from compiler.settings import BuildSettings, DataSettings, ModelSettings, SparsitySettings, TrainSettings  # noqa: E402
from compiler.training.prune import prune_2_4, recover  # noqa: E402
from compiler.eval.task_accuracy import load_sst2  # noqa: E402


def cosines(student, teacher, tokens, input_names) -> list[float]:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--out", type=Path, default=Path("engines/benchmarks"))
    args = ap.parse_args()
    loaded = load_model(ModelSettings(name="minilm"))
    teacher, data = loaded.module.eval(), DataSettings(train_path=tuple(args.train_text or ()))
    tok = lambda texts: tokenized_set(texts, loaded.tokenizer, data.max_length, data.cache_dir)  # noqa: E731
    calib = tok(load_texts(data, count=data.calib_samples))
    heldout = tok(load_texts(data, count=data.samples, skip=data.calib_samples))
    sst2 = tok(load_sst2("dev", count=64)[0])
    train = tok(training_texts(BuildSettings(data=data)))
    rows = []
    for cfg in args.configs:
        method, lr = cfg.split(",")
        student = copy.deepcopy(teacher)
        masks, _ = prune_2_4(student, SparsitySettings(pattern="2:4", method=method), calib, loaded.input_names)
        start = time.perf_counter()
        rep = recover(student, teacher, masks, train, loaded.input_names,
                      TrainSettings(lr=float(lr), schedule=args.schedule,
                                    group_by_length=args.group_by_length, layerwise=not args.no_layerwise,
                                    bf16=args.bf16, device=args.device), args.steps)
        seconds = round(time.perf_counter() - start, 1)
        c = cosines(student, teacher, heldout, loaded.input_names)
        c2 = cosines(student, teacher, sst2, loaded.input_names)
        rows.append({"method": method, "lr": float(lr), "schedule": args.schedule, "steps": args.steps,
                     "train_text": list(data.train_path), "group_by_length": args.group_by_length,
                     "layerwise": not args.no_layerwise, "bf16": args.bf16, "device": args.device,
                     "train_samples": len(train), "cosine_min": min(c), "cosine_mean": float(np.mean(c)),
                     "sst2_cosine_min": min(c2), "sst2_cosine_mean": float(np.mean(c2)),
                     "loss_last": rep.loss_last, "seconds": seconds})
        print(f"  {cfg}: cosine mean {rows[-1]['cosine_mean']:.4f}, SST-2 {rows[-1]['sst2_cosine_mean']:.4f} "
              f"({seconds} s)", flush=True)
    print("\n| method | lr | steps | train text | cosine min | cosine mean | SST-2 dev cosine mean | final loss | s |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        text = " + ".join(Path(p).name for p in r["train_text"]) or "WikiText-2 rest"
        print(f"| {r['method']} | {r['lr']:g} | {r['steps']} | {text} | {r['cosine_min']:.4f} | {r['cosine_mean']:.4f} "
              f"| {r['sst2_cosine_mean']:.4f} | {r['loss_last']:.4f} | {r['seconds']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "recovery_sweep.json"
    previous = json.loads(path.read_text())["rows"] if path.is_file() else []
    path.write_text(json.dumps({"rows": previous + rows}, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
