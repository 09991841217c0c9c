"""GPT-2 generation on ONNX Runtime CPU: tokens per second with the KV cache against without it.

    python -m benchmarks.gpt2_generate --onnx engines/tasks/gpt2/random/text-generation-with-past/model.fp32.onnx \
        [--prompt-tokens 128] [--new-tokens 64] [--threads 1] [--repeats 2]

The graph is a `text-generation-with-past` export (`make onnx MODEL=gpt2 WEIGHTS=random
TASK=text-generation-with-past`); random weights are fine for speed. With the cache the prompt
runs once and each new token is one decode step over a growing past; without it each step runs
the whole prefix (the same graph fed an empty past: the cost of a graph with no cache). Batch 1,
random prompt ids (seed 0), greedy (`compiler.eval.generate`). Best of `--repeats` runs. Prints a
table, writes `engines/benchmarks/gpt2_generate.json`. Machine load changes the absolute figures:
the ratio is the point.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    from compiler.artifacts import write_json
    from compiler.eval.generate import agreement, greedy_generate, ort_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("engines/benchmarks"), help="folder of the JSON")
    args = p.parse_args(argv)
    step, names, cache = ort_step(args.onnx, args.threads)
    vocab = 50257 if "gpt2" in str(args.onnx) else 30522
    prompt = np.random.default_rng(0).integers(0, vocab, (1, args.prompt_tokens)).astype(np.int64)
    best = {}
    for use_cache in (True, False):
        runs = [greedy_generate(step, names, cache, prompt, args.new_tokens, use_cache) for _ in range(args.repeats)]
        best[use_cache] = min(runs, key=lambda r: r.seconds)
    agree = agreement(best[False], best[True])
    rows = [{"kv_cache": c, "seconds": round(best[c].seconds, 3), "tokens_per_s": round(best[c].tokens_per_second, 2)}
            for c in (True, False)]
    print(f"{args.onnx}: batch 1, prompt {args.prompt_tokens} + {args.new_tokens} generated, ORT CPU, "
          f"{args.threads} thread(s), best of {args.repeats} (cpu count {os.cpu_count()})")
    print(f"{'KV cache':<9} {'seconds':>8} {'tokens/s':>9}")
    for r in rows:
        print(f"{'with' if r['kv_cache'] else 'without':<9} {r['seconds']:>8.3f} {r['tokens_per_s']:>9.2f}")
    speedup = best[False].seconds / best[True].seconds
    print(f"speed-up {speedup:.2f}x; tokens equal: {agree['first_divergence'] == [None]}, logits cosine min "
          f"{min(agree['logits_cosine']):.7f}")
    out = {"onnx": str(args.onnx), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "threads": args.threads, "rows": rows, "speedup": round(speedup, 2),
           "tokens_equal": agree["first_divergence"] == [None], "logits_cosine_min": min(agree["logits_cosine"])}
    write_json(args.out / "gpt2_generate.json", out)
    return out


if __name__ == "__main__":
    main()
