"""Greedy generation on an exported decoder graph, with or without its KV cache (numpy, no torch).

A `text-generation-with-past` graph (`compiler.training.tasks`) takes `input_ids` (batch,
sequence), an `attention_mask` over past + sequence and `past_key_values.{i}.key/value`
(batch, heads, past, head_dim), and returns `logits` (batch, sequence, vocab) and
`present.{i}.key/value`. With the cache, the prompt runs once (past 0, the context phase) and
every later step feeds one token and the previous step's `present.*` (the decode phase);
without it, every step runs the whole prefix again (a `text-generation` graph, or a cache graph
fed an empty past each time). Both pick the argmax of the last position's logits (greedy), as
transformers' `generate(do_sample=False)` does.

`step` is any callable from feeds to outputs, so the same loop drives ONNX Runtime here
(`ort_step`) and a TensorRT engine or a deployed bundle elsewhere.

    python -m compiler generate --onnx engines/.../model.onnx --model gpt2 --weights random \
        --prompt "The tower is" -n 32 [--no-cache] [--compare]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from calibration.text import CacheInput, cache_inputs

Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Generation:
    """What one greedy run produced.

    Attributes:
        tokens: (batch, new_tokens) int64, the generated ids (prompt excluded).
        logits: per step, the last position's logits (batch, vocab) float32.
        seconds: wall time of all steps (prompt included).
        cached: whether the KV cache was reused between steps.
    """

    tokens: np.ndarray
    logits: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = True

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second over the whole run (batch x new tokens / seconds)."""
        return float(self.tokens.size / self.seconds) if self.seconds else float("inf")


def ort_step(model: Any, threads: int | None = None) -> tuple[Step, list[str], list[CacheInput]]:
    """(step, input names, cache inputs) of an ONNX Runtime CPU session on `model` (path or
    ModelProto). Feeds are cast to the session's input types (an FP16 KV cache stays FP16
    between steps); outputs come back by name."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    cache = cache_inputs(proto)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    types = {i.name: np.float16 if i.type == "tensor(float16)" else None for i in sess.get_inputs()}
    out_names = [o.name for o in sess.get_outputs()]

    def step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {k: v.astype(types[k]) if types.get(k) is not None and v.dtype != types[k] else v
                for k, v in feeds.items()}
        return dict(zip(out_names, sess.run(out_names, cast)))

    return step, [i.name for i in sess.get_inputs()], cache


def greedy_generate(step: Step, input_names: list[str], cache: list[CacheInput], prompt: np.ndarray,
                    new_tokens: int, use_cache: bool = True) -> Generation:
    """Greedy decoding of `new_tokens` tokens after `prompt`.

    Args:
        step: feeds -> outputs (`logits` (batch, sequence, vocab), `present.*` with a cache).
        input_names: the graph's inputs (`input_ids`, `attention_mask`, cache inputs).
        cache: the graph's KV-cache inputs (`ort_step` reads them); empty for a graph without one.
        prompt: (batch, prompt_length) int64, no padding.
        new_tokens: tokens to generate (>= 1).
        use_cache: reuse `present.*` as the next step's past; False recomputes the prefix.

    Returns:
        Generation with tokens (batch, new_tokens) and each step's last-position logits.

    Raises:
        ValueError: `use_cache` on a graph without cache inputs, or new_tokens < 1.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens}: expected >= 1")
    if use_cache and not cache:
        raise ValueError("this graph has no KV-cache inputs (past_key_values.*): generate with use_cache=False, "
                         "or export --task text-generation-with-past")
    batch = prompt.shape[0]
    ids = prompt.astype(np.int64)
    past = {c: c.empty(batch) for c in cache}
    mask = np.ones_like(ids)
    tokens, logits = [], []
    start = time.perf_counter()
    x = ids
    for _ in range(new_tokens):
        feeds = {"input_ids": x, "attention_mask": mask, **past}
        out = step({n: feeds[n] for n in input_names if n in feeds})
        last = np.asarray(out["logits"][:, -1], dtype=np.float32)
        nxt = last.argmax(-1).astype(np.int64)[:, None]
        tokens.append(nxt)
        logits.append(last)
        ids = np.concatenate([ids, nxt], axis=1)
        if use_cache:
            past = {c: out[c.replace("past_key_values.", "present.")] for c in cache}
            x, mask = nxt, np.concatenate([mask, np.ones_like(nxt)], axis=1)
        else:
            x, mask = ids, np.ones_like(ids)
    return Generation(np.concatenate(tokens, axis=1), logits, time.perf_counter() - start, use_cache)


def agreement(reference: Generation, other: Generation) -> dict[str, Any]:
    """Greedy-token agreement of `other` with `reference`, per batch row.

    Returns:
        {"first_divergence": per row the first step whose token differs (None: all agree),
        "token_agreement": share of equal tokens before the first divergence counted over all
        steps (a diverged row keeps counting its later steps as different), "logits_cosine": per
        step the mean over rows of the cosine of the last-position logits (both runs fed their
        own previous tokens, so after a divergence the contexts differ)}.
    """
    a, b = reference.tokens, other.tokens
    first = []
    for i in range(a.shape[0]):
        diff = np.flatnonzero(a[i] != b[i])
        first.append(int(diff[0]) if diff.size else None)
    same = sum((f if f is not None else a.shape[1]) for f in first) / a.size
    cos = []
    for x, y in zip(reference.logits, other.logits):
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        den = np.linalg.norm(x64, axis=1) * np.linalg.norm(y64, axis=1)
        cos.append(float(np.mean(np.sum(x64 * y64, axis=1) / np.where(den == 0, 1.0, den))))
    return {"first_divergence": first, "token_agreement": same, "logits_cosine": cos}


def output_names(onnx_path: Path) -> list[str]:
    """The graph's output names (its weights are not read)."""
    import onnx

    return [o.name for o in onnx.load(str(onnx_path), load_external_data=False).graph.output]


def tokenizer_source(onnx_path: Path) -> tuple[str, Path | None]:
    """Whose tokenizer goes with `onnx_path`: (model name, None) from the `report.json` a compile
    writes beside its ONNX; ("", the tokenizer folder) of the bundle the file lies in (its
    `manifest.json` up to three folders above); else ("gpt2", None)."""
    import json

    report = onnx_path.parent / "report.json"
    try:
        return str(json.loads(report.read_text())["settings"]["model"]["name"]), None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for folder in list(onnx_path.resolve().parents)[:3]:
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            return "", folder / manifest["tokenizer"]["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "gpt2", None


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """The `generate` subcommand's arguments."""
    p.add_argument("--onnx", type=Path, required=True, help="a text-generation(-with-past) ONNX graph")
    p.add_argument("--model", default=None, help="whose tokenizer (a registered name or a checkpoint directory); "
                                                 "default: the model of the compile or bundle the ONNX file lies "
                                                 "in, else gpt2")
    p.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                   help="random: MiniLM's WordPiece stands in where the model's tokenizer is not at hand")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", action="append", help="a prompt (repeatable: one batch of equal lengths)")
    text.add_argument("--prompt-ids", type=int, nargs=2, metavar=("BATCH", "LENGTH"),
                      help="random prompt ids (seed 0) of this shape, for speed")
    p.add_argument("-n", "--new-tokens", type=int, default=32)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    p.add_argument("--compare", action="store_true", help="also run without the cache: tokens/s and agreement")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def generate_command(args: argparse.Namespace) -> int:
    """`generate`: greedy tokens on ONNX Runtime CPU; prints the text, tokens/s (and with
    --compare the no-cache run and their agreement). Exit 1 (CompilerError) for bad input."""
    from compiler.errors import CompilerError
    from compiler.graph.onnx_io import check_onnx_file
    from compiler.settings import ModelSettings
    from compiler.training.models import load_tokenizer

    check_onnx_file(args.onnx)
    step, names, cache = ort_step(args.onnx, args.threads)
    if "logits" not in output_names(args.onnx):
        raise CompilerError(f"{args.onnx}: not a text-generation graph (no 'logits' output; it gives "
                            f"{', '.join(output_names(args.onnx))}). Export one of a decoder with `python -m "
                            "compiler export --model MODEL --task text-generation-with-past`")
    model, bundled = tokenizer_source(args.onnx) if args.model is None else (args.model, None)
    if bundled is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(bundled))
    else:
        tok = load_tokenizer(ModelSettings(name=model, weights=args.weights))
    if args.prompt_ids:
        vocab = len(tok)
        prompt = np.random.default_rng(0).integers(0, vocab, tuple(args.prompt_ids)).astype(np.int64)
    else:
        enc = [tok(t, add_special_tokens=False)["input_ids"] for t in args.prompt]
        if len({len(e) for e in enc}) != 1:
            raise CompilerError("prompts of one batch must have the same token count (no padding here): "
                                f"{[len(e) for e in enc]}; give one --prompt at a time")
        prompt = np.array(enc, dtype=np.int64)
    try:
        runs = [greedy_generate(step, names, cache, prompt, args.new_tokens, use_cache=not args.no_cache)]
        if args.compare and not args.no_cache:
            runs.append(greedy_generate(step, names, cache, prompt, args.new_tokens, use_cache=False))
    except ValueError as e:
        raise CompilerError(str(e)) from e
    for row in range(prompt.shape[0]):
        print(f"[{row}] {tok.decode(prompt[row])!r} -> {tok.decode(runs[0].tokens[row])!r}")
    for r in runs:
        print(f"{'with' if r.cached else 'without'} KV cache: {r.tokens.size} tokens in {r.seconds:.3f} s, "
              f"{r.tokens_per_second:.1f} tokens/s (prompt {prompt.shape[1]} tokens, batch {prompt.shape[0]})")
    if len(runs) == 2:
        a = agreement(runs[1], runs[0])
        print(f"cache vs no cache: first divergence {a['first_divergence']}, logits cosine min "
              f"{min(a['logits_cosine']):.6f}")
    return 0
