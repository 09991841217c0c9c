"""Greedy generation of the GPT-2 fixture per precision against FP32 PyTorch, through the KV cache.

    python -m benchmarks.gpt2_fixture          # once: engines/fixtures/gpt2-wikitext2
    python -m benchmarks.gpt2_agreement [--prompts 16] [--prompt-tokens 24] [--new-tokens 32]

For each precision (fp32, fp16, hybrid, auto, int8) the pipeline compiles the fixture with
`--task text-generation-with-past` up to verify (`engines/tasks/`), then every variant generates
greedily from real prompts (the first tokens of WikiText-2 *valid* lines; the fixture trained on
test) on the faithful FP16 reference (`compiler.eval.fp16_reference`; ONNX Runtime for the FP32
graph), and is compared with `GPT2LMHeadModel.generate(do_sample=False)` in FP32 PyTorch:
first divergence step per prompt, token agreement before it, logits cosine per step. One extra
variant, `fp16+attn32`, is `fp16` with the attention score chain (Q.K^T MatMul through Softmax
of every block) pinned to FP32: what pinning the attention accumulation buys.
Prints a table, writes `engines/benchmarks/gpt2_agreement.json`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

FIXTURE = Path("engines/fixtures/gpt2-wikitext2")
MODES = ("fp32", "fp16", "hybrid", "auto", "int8")


def attention_chain(model: Any) -> dict[str, tuple[str, str]]:
    """{node: (rule, detail)} of each Softmax and the nodes between it and the activation x
    activation MatMul (Q.K^T) that feeds it, following first float inputs backwards."""
    inits = {t.name for t in model.graph.initializer}
    producer = {t: n for n in model.graph.node for t in n.output}
    pins = {}
    for sm in (n for n in model.graph.node if n.op_type == "Softmax"):
        chain, n = [sm], sm
        while n is not None and not (n.op_type == "MatMul" and not any(t in inits for t in n.input)):
            n = next((producer[t] for t in n.input if t in producer and producer[t].op_type != "Constant"), None)
            if n is not None:
                chain.append(n)
        if n is not None:
            pins.update({c.name: ("attention-fp32", f"Q.K^T..Softmax {sm.name}") for c in chain})
    return pins


def prompts(tokenizer, count: int, length: int) -> np.ndarray:
    """(count, length) ids: the first `length` tokens of the first `count` long-enough valid lines."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        ids = tokenizer(line.strip())["input_ids"] if len(line.split()) >= 20 else []
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == count:
            break
    return np.asarray(out, dtype=np.int64)


def compare(ref_tokens: np.ndarray, ref_logits: np.ndarray, got) -> dict[str, Any]:
    """First divergence, token agreement and logits cosine of one generation against PyTorch's."""
    diff = np.flatnonzero(ref_tokens != got.tokens[0])
    first = int(diff[0]) if diff.size else None
    a = ref_logits.astype(np.float64)
    b = np.concatenate(got.logits).astype(np.float64)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    upto = len(cos) if first is None else first + 1  # same context up to and including the divergence step
    return {"first_divergence": first, "cosine_same_context": cos[:upto].tolist()}


def main(argv: list[str] | None = None) -> dict:
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from compiler.eval.fp16_reference import fp16_emulation, has_fp16
    from compiler.eval.generate import greedy_generate, ort_step
    from compiler.graph.onnx_io import load_onnx
    from compiler.passes.kv_cache import fp16_cache_io
    from compiler.passes.precision import convert_precision
    from compiler.pipeline import run_pipeline
    from compiler.settings import BuildSettings, DataSettings, ModelSettings, PrecisionSettings, ProfileSettings
    from compiler.settings import EngineSettings
    from compiler.training.models import resolve_task

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixture", type=Path, default=FIXTURE)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("engines/benchmarks"), help="folder of the JSON")
    args = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(str(args.fixture))
    ids = prompts(tok, args.prompts, args.prompt_tokens)
    model = GPT2LMHeadModel.from_pretrained(str(args.fixture), attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens greedy tokens, as greedy_generate makes
    refs = []
    with torch.no_grad():
        for row in ids:
            out = model.generate(torch.from_numpy(row[None]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                 max_new_tokens=args.new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
            refs.append((out.sequences[0, len(row):].numpy(), torch.cat(out.logits).numpy()))
    base = BuildSettings(model=ModelSettings(name=str(args.fixture), task="text-generation-with-past"),
                         data=DataSettings(samples=16, calib_samples=32), output_dir="engines/tasks",
                         engine=EngineSettings(profiles=(ProfileSettings(max_shape=(4, 256)),)))
    variants: dict[str, Any] = {}
    fp32_onnx = None
    for mode in MODES:
        run = run_pipeline(resolve_task(replace(base, precision=PrecisionSettings(mode=mode))), until="verify")
        variants[mode] = run.variant_onnx
        fp32_onnx = run.fp32_onnx
    fp32 = load_onnx(fp32_onnx)
    pinned, _ = convert_precision(fp32, PrecisionSettings(mode="fp16"), fp32_nodes=attention_chain(fp32))
    variants["fp16+attn32"] = fp16_cache_io(pinned)[0]
    rows = []
    for name, graph in variants.items():
        proto = load_onnx(graph) if isinstance(graph, Path) else graph
        step = ort_step(fp16_emulation(proto) if has_fp16(proto) else proto)
        start, results = time.perf_counter(), []
        for row, (ref_tokens, ref_logits) in zip(ids, refs):
            results.append(compare(ref_tokens, ref_logits, greedy_generate(*step, row[None], args.new_tokens)))
        firsts = [r["first_divergence"] for r in results]
        cos = np.concatenate([r["cosine_same_context"] for r in results])
        agree = np.mean([(args.new_tokens if f is None else f) / args.new_tokens for f in firsts])
        rows.append({"variant": name, "prompts": len(results), "all_agree": float(np.mean([f is None for f in firsts])),
                     "token_agreement": float(agree), "first_divergence": firsts,
                     "logits_cosine_min": float(cos.min()), "logits_cosine_mean": float(cos.mean()),
                     "seconds": round(time.perf_counter() - start, 1)})
    print(f"GPT-2 fixture {args.fixture}: {len(ids)} WikiText-2 valid prompts x {args.prompt_tokens} tokens, "
          f"{args.new_tokens} greedy tokens through the KV cache, against FP32 PyTorch generate()")
    print(f"{'variant':<12} {'all agree':>9} {'tokens':>7} {'cos min':>10} {'cos mean':>10}  first divergence")
    for r in rows:
        print(f"{r['variant']:<12} {r['all_agree']:>9.3f} {r['token_agreement']:>7.3f} {r['logits_cosine_min']:>10.6f} "
              f"{r['logits_cosine_mean']:>10.6f}  {r['first_divergence']}")
    out = {"fixture": str(args.fixture), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "rows": rows}
    path = args.out / "gpt2_agreement.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from compiler.artifacts import write_json

    write_json(path, out)
    return out


if __name__ == "__main__":
    main()
