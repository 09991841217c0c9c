"""What splitting distillation batches by length saves: padding, and seconds a step.

The 2:4 recovery and QAT train on batches of 8 samples padded to the batch's longest. On the
default recovery text (SST-2 sentences beside WikiText-2 lines) much of that is padding.
`TrainSettings.split_by_length` computes each batch as sub-batches of similar length
(`compiler.training.distill.length_groups`: padded positions + `SPLIT_COST_TOKENS` per extra
sub-batch, minimized), the same gradient up to float summation order. This counts, over the
loop's own batch draws (`batches_forever`), the padded positions per sub-batch cost, and times
the loop itself (`distill`, the teacher's forward included, no teacher cache) padded and split
at each cost.

    python -m benchmarks.split_batches [--model minilm] [--costs 0,32,64,128,256] [--steps 40]
        [--epochs 3] [--out DIR]

Writes `<out>/split_batches.json`: the text's token counts, one row per cost (padded
positions, their share of the padded batches', sub-batches per batch, seconds a step).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import numpy as np

from benchmarks.common import add_out_argument, markdown_table, run_main, write_result


def padding_counts(lengths: list[int], batch_size: int, costs: list[int], epochs: int, seed: int = 0) -> list[dict]:
    """Padded token positions of the loop's batches, whole and split at each cost.

    Args:
        lengths: valid tokens of each training sample.
        batch_size, seed: as `TrainSettings`; batches drawn by `batches_forever`.
        costs: sub-batch costs (padded positions) for `length_groups`.
        epochs: epochs of batches counted.

    Returns:
        Rows {"cost" (None: padded batches), "positions", "valid", "share_of_padded",
        "groups_per_batch"}.
    """
    from calibration.text import TokenizedSet
    from compiler.training.distill import batches_forever, length_groups

    tokens = TokenizedSet([np.ones(n, np.int64) for n in lengths], None, 0, "lengths")
    per_epoch = -(-len(lengths) // batch_size)
    draws = batches_forever(tokens, batch_size, ["input_ids"], seed)
    batches = [next(draws)[1] for _ in range(epochs * per_epoch)]
    valid = int(sum(b.sum() for b in batches))
    padded = int(sum(len(b) * b.max() for b in batches))
    rows = [{"cost": None, "positions": padded, "valid": valid, "share_of_padded": 1.0, "groups_per_batch": 1.0}]
    for cost in costs:
        groups = [length_groups(b, cost) for b in batches]
        positions = int(sum(len(g) * b[g].max() for b, gs in zip(batches, groups) for g in gs))
        rows.append({"cost": cost, "positions": positions, "valid": valid,
                     "share_of_padded": round(positions / padded, 4),
                     "groups_per_batch": round(sum(map(len, groups)) / len(groups), 2)})
    return rows


def seconds_per_step(teacher: Any, tokens: Any, names: list[str], steps: int, cost: int | None) -> float:
    """Wall seconds a step of `distill` (FP32, fused AdamW, teacher forward included, no cache)
    on a copy of `teacher`, padded (`cost` None) or split at `cost`."""
    import compiler.training.distill as distill_module
    from compiler.settings import TrainSettings

    saved = distill_module.SPLIT_COST_TOKENS
    distill_module.SPLIT_COST_TOKENS = saved if cost is None else cost
    try:
        settings = TrainSettings(steps=steps, lr=1e-4, teacher_cache_mib=0, split_by_length=cost is not None)
        start = time.perf_counter()
        distill_module.distill(copy.deepcopy(teacher), teacher, tokens, names, settings)
        return (time.perf_counter() - start) / steps
    finally:
        distill_module.SPLIT_COST_TOKENS = saved


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and the recovery text, count, time, print, write."""
    from calibration.layout import TokenSets, recovery_data
    from compiler.settings import BuildSettings, ModelSettings
    from compiler.training.models import load_model

    loaded = load_model(ModelSettings(name=args.model, weights=args.weights))
    settings = BuildSettings()
    data = recovery_data(settings.data, settings.sparsity.recover_samples)
    tokens = TokenSets(data, loaded.tokenizer, settings.train.batch_size).training
    lengths = [len(x) for x in tokens.input_ids]
    rows = padding_counts(lengths, settings.train.batch_size, args.costs, args.epochs, settings.train.seed)
    teacher = loaded.module.eval()
    for row in rows:
        row["seconds_per_step"] = round(seconds_per_step(teacher, tokens, loaded.input_names, args.steps,
                                                         row["cost"]), 3) if args.steps else None
    print(f"{len(lengths)} samples, {sum(lengths)} tokens, batch {settings.train.batch_size}, "
          f"{args.epochs} epochs of draws; {args.steps} steps timed per row")
    print(markdown_table(["sub-batch cost", "padded positions", "share of padded", "sub-batches a batch",
                          "s / step"],
                         [["padded" if r["cost"] is None else r["cost"], r["positions"], r["share_of_padded"],
                           r["groups_per_batch"], r["seconds_per_step"]] for r in rows]))
    result = {"model": args.model, "samples": len(lengths), "tokens": int(sum(lengths)),
              "train_text": list(data.train_path), "steps_timed": args.steps, "rows": rows}
    write_result(args.out, "split_batches", result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="ModelSettings.name (a preset or a local checkpoint)")
    ap.add_argument("--weights", default="pretrained")
    ap.add_argument("--costs", type=lambda s: [int(c) for c in s.split(",")], default=[0, 32, 64, 128, 256],
                    help="sub-batch costs in padded positions, comma-separated")
    ap.add_argument("--steps", type=int, default=40, help="steps timed per row (0: count only)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of batch draws counted")
    add_out_argument(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
