"""Task metrics of a variant against the FP32 graph: does the engine give the same answer?

Cosine and max error per output (`compiler.eval.fidelity`) say how close the numbers are; these
say whether the decision a user acts on changed, per task (`compiler.training.tasks`):

| task | metric (per sample, on held-out real text) |
|---|---|
| `text-classification` | label agreement: argmax of `logits` equal to FP32's |
| `token-classification` | token label agreement: argmax of `logits` at every valid position |
| `question-answering` | start / end / both agreement: argmax of `start_logits` / `end_logits` over valid tokens |
| `fill-mask`, `text-generation` | top-1 token agreement at every valid position |
| `sentence-embedding` | cosine of the pooled, normalised vectors (min / mean) |
| `text-generation-with-past` | top-1 agreement as above, and greedy generation through the KV cache from each sample's first tokens: first divergence step and per-step logits cosine (`compiler.eval.generate`) |

The variant runs where the fidelity probe runs it: the faithful FP16 reference when it holds
FP16 tensors, else ONNX Runtime CPU.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from compiler.eval.fidelity import Batch
from compiler.eval.reference_outputs import chunked_batches
from compiler.eval.fp16_reference import fp16_emulation, has_fp16, session
from compiler.eval.generate import agreement, greedy_generate, ort_step


def _argmax_agreement(ref: np.ndarray, got: np.ndarray, lengths: np.ndarray, per_position: bool) -> list[bool]:
    out = []
    for i, n in enumerate(lengths):
        if per_position:  # (batch, sequence, vocab): every valid position
            out += list(ref[i, :n].argmax(-1) == got[i, :n].argmax(-1))
        else:
            out.append(bool(ref[i].argmax(-1) == got[i].argmax(-1)))
    return out


def _span_agreement(ref: np.ndarray, got: np.ndarray, lengths: np.ndarray) -> list[bool]:
    return [bool(ref[i, :n].argmax() == got[i, :n].argmax()) for i, n in enumerate(lengths)]


def task_agreement(task: str, fp32_model: Any, variant: Any, output_names: list[str],
                   batches: Iterable[Batch], generate: dict[str, int] | None = None) -> dict[str, Any]:
    """The task metrics of `variant` against `fp32_model` over `batches` (see the module table).

    Args:
        task: the graph's task name.
        fp32_model: the FP32 reference (path or ModelProto).
        variant: the variant ModelProto (not consumed).
        output_names: the graph outputs (the task's, then `present.*`).
        batches: (feeds, valid lengths) of real text, as `TokenizedSet.batches` gives them.
        generate: for `text-generation-with-past`, {"prompt_tokens": P, "new_tokens": N}: each
            sample's first P tokens (samples shorter than P skipped) generate N tokens.

    Returns:
        {"task": task, "samples": n, metric: value, ...}; empty metrics for `feature-extraction`.
    """
    batches = list(batches)
    ref_sess = session(fp32_model, faithful_fp16=False)
    var_sess = session(fp16_emulation(variant), True) if has_fp16(variant) else session(variant, False)
    names = [n for n in output_names if not n.startswith("present.")]
    checks: dict[str, list[Any]] = {}
    for feeds, lengths in chunked_batches(batches, lambda f: ref_sess.run(names, f)):  # large logits: a few rows a run
        ref = dict(zip(names, ref_sess.run(names, feeds)))
        got = dict(zip(names, var_sess.run(names, feeds)))
        if task == "text-classification":
            checks.setdefault("label_agreement", []).extend(_argmax_agreement(ref["logits"], got["logits"], lengths, False))
        elif task == "token-classification":
            checks.setdefault("token_label_agreement", []).extend(
                _argmax_agreement(ref["logits"], got["logits"], lengths, True))
        elif task == "question-answering":
            s = _span_agreement(ref["start_logits"], got["start_logits"], lengths)
            e = _span_agreement(ref["end_logits"], got["end_logits"], lengths)
            checks.setdefault("start_agreement", []).extend(s)
            checks.setdefault("end_agreement", []).extend(e)
            checks.setdefault("span_agreement", []).extend(a and b for a, b in zip(s, e))
        elif task in ("fill-mask", "text-generation", "text-generation-with-past"):
            checks.setdefault("top1_token_agreement", []).extend(
                _argmax_agreement(ref["logits"], got["logits"], lengths, True))
        elif task == "sentence-embedding":
            r, g = ref[names[0]].astype(np.float64), got[names[0]].astype(np.float64)
            den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
            checks.setdefault("pooled_cosine", []).extend(np.sum(r * g, axis=1) / np.where(den == 0, 1, den))
    out: dict[str, Any] = {"task": task, "samples": int(sum(len(n) for _, n in batches))}
    for k, v in checks.items():
        if k == "pooled_cosine":
            out["pooled_cosine_min"], out["pooled_cosine_mean"] = float(np.min(v)), float(np.mean(v))
        else:
            out[k] = float(np.mean(v))
    if task == "text-generation-with-past" and generate:
        out["generation"] = generation_agreement(fp32_model, variant, batches, **generate)
    return out


def generation_agreement(fp32_model: Any, variant: Any, batches: list[Batch], prompt_tokens: int = 16,
                         new_tokens: int = 16) -> dict[str, Any]:
    """Greedy generation through the KV cache, variant vs FP32 graph, one prompt (each sample's
    first `prompt_tokens` real tokens) at a time.

    Returns:
        {"prompts", "prompt_tokens", "new_tokens", "first_divergence": per prompt (None: no
        divergence), "agree_all": share of prompts without divergence, "token_agreement": share of
        tokens before the first divergence, "logits_cosine_min" / "_mean": over steps and prompts}.
    """
    ref_step, ref_names, ref_cache = ort_step(fp32_model)
    var_model = fp16_emulation(variant) if has_fp16(variant) else variant
    var_step, var_names, var_cache = ort_step(var_model)
    prompts = [feeds["input_ids"][i, :prompt_tokens] for feeds, lengths in batches
               for i, n in enumerate(lengths) if n >= prompt_tokens]
    firsts, cosines, same = [], [], 0.0
    for p in prompts:
        a = greedy_generate(ref_step, ref_names, ref_cache, p[None], new_tokens)
        b = greedy_generate(var_step, var_names, var_cache, p[None], new_tokens)
        agree = agreement(a, b)
        firsts.append(agree["first_divergence"][0])
        cosines += agree["logits_cosine"]
        same += agree["token_agreement"]
    n = max(len(prompts), 1)
    return {"prompts": len(prompts), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "first_divergence": firsts, "agree_all": sum(f is None for f in firsts) / n,
            "token_agreement": same / n, "logits_cosine_min": float(np.min(cosines)) if cosines else None,
            "logits_cosine_mean": float(np.mean(cosines)) if cosines else None}
