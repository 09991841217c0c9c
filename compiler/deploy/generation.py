"""Greedy generation on a bundle: `Bundle.generate(prompts, n)` and `python -m compiler run BUNDLE
--generate N --prompt TEXT`.

The loop is `compiler.eval.generate.greedy_generate`; its step is the bundle's own `infer` (the
TensorRT engine where TensorRT and a GPU are, else the bundle's ONNX Runtime model), so every
step passes the same request checks as any other request. On a `text-generation-with-past`
bundle the KV cache is reused: the prompt runs once on the context profile (profile 0, past 0)
and each later step feeds one token and the previous `present.*` on the decode profile (profile
1: sequence 1, past 1..max past; `compiler.training.tasks.kv_cache_profiles`). Without the cache
(`use_cache=False`, or a `text-generation` bundle) every step runs the whole prefix on profile 0.

Limits: before the first step, the shapes of the first and the last step are checked against
the optimization profiles; a run that would leave them is refused (DeploymentRefusedError,
exit 4) with the number of new tokens that fits, never cut short silently. Prompts of different
token counts run as separate batches (no padding), each at most the profile's largest batch.
Exactly `max_new_tokens` tokens are generated (no stop at EOS), as `generate(do_sample=False,
min_new_tokens=n)` would; the cache travels through host memory between steps. No PyTorch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from shlex import quote
from typing import Any

import numpy as np

from calibration.text import CacheInput
from compiler.deploy.checks import check_request_shape
from compiler.errors import CompilerError, DeploymentRefusedError
from compiler.eval.generate import Generation, greedy_generate

GENERATION_TASKS = ("text-generation", "text-generation-with-past")


@dataclass
class BundleGeneration:
    """What `generate` produced, one entry per prompt, in the prompts' order.

    Attributes:
        prompts: the prompts' token ids. tokens: the generated ids (max_new_tokens each).
        texts: the decoded continuations ("" when the prompts were given as ids).
        seconds: wall time of every step of every batch. cached: the KV cache was reused.
        backend: "tensorrt" or "onnxruntime". batches: the greedy runs, one per batch.
    """

    prompts: list[list[int]]
    tokens: list[list[int]]
    texts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = True
    backend: str = ""
    batches: list[Generation] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all prompts) per second of stepping (prompt passes included)."""
        count = sum(len(t) for t in self.tokens)
        return count / self.seconds if self.seconds else float("inf")


def bundle_task(manifest: dict[str, Any]) -> str | None:
    """The task of a bundle's graph: the manifest's `model.task`; for a bundle made before it was
    recorded, `text-generation-with-past` when the graph takes a KV cache, else None (unknown)."""
    task = (manifest.get("model") or {}).get("task")
    if task is None and cache_inputs(manifest):
        return "text-generation-with-past"
    return task


def check_generation_task(manifest: dict[str, Any], root: Path | str) -> str:
    """The bundle's generation task, or a CompilerError (exit 1) naming its task and what to do."""
    task = bundle_task(manifest)
    if task in GENERATION_TASKS:
        return task
    what = f"task {task}" if task else "a task it does not record (made before bundles recorded their task)"
    raise CompilerError(
        f"{root}: --generate needs a bundle of a text-generation graph (logits over the vocabulary for every "
        f"position); this bundle holds {what}. Make one of a decoder (GPT-2 family) with `python -m compiler bundle "
        "--model MODEL --task text-generation-with-past` (or `make bundle MODEL=... TASK=text-generation-with-past`), "
        "or run this bundle without --generate.")


def cache_inputs(manifest: dict[str, Any]) -> list[CacheInput]:
    """The KV-cache inputs of a manifest's I/O: `past_key_values.*` of rank 4 (batch, heads, past,
    head_dim) with static heads and head_dim."""
    return [CacheInput(t["name"], t["shape"][1], t["shape"][3]) for t in manifest["io"]["inputs"]
            if t["name"].startswith("past_key_values.") and len(t["shape"]) == 4
            and t["shape"][1] > 0 and t["shape"][3] > 0]


def step_shapes(names: list[str], cache: list[CacheInput], batch: int, sequence: int,
                past: int) -> dict[str, tuple[int, ...]]:
    """{input: shape} of one step: `input_ids` (batch, sequence), the mask (batch, past + sequence),
    each cache input (batch, heads, past, head_dim)."""
    shapes: dict[str, tuple[int, ...]] = {"input_ids": (batch, sequence), "attention_mask": (batch, past + sequence),
                                          "token_type_ids": (batch, sequence)}
    shapes.update({c: (batch, c.heads, past, c.head_dim) for c in cache})
    return {n: shapes[n] for n in names if n in shapes}


def run_shapes(names: list[str], cache: list[CacheInput], batch: int, prompt: int, new_tokens: int,
               use_cache: bool) -> list[dict[str, tuple[int, ...]]]:
    """The shapes of the first and the last step of a greedy run (every step lies between them)."""
    first = step_shapes(names, cache, batch, prompt, 0)
    if new_tokens == 1:
        return [first]
    if use_cache:  # the last step feeds token n-1 on a past of prompt + n - 2
        return [first, step_shapes(names, cache, batch, 1, 1), step_shapes(names, cache, batch, 1, prompt + new_tokens - 2)]
    return [first, step_shapes(names, cache, batch, prompt + new_tokens - 1, 0)]


def check_generation_fits(bundle: Any, batch: int, prompt: int, new_tokens: int, use_cache: bool) -> None:
    """Refuse, before running, a greedy run whose steps leave the bundle's optimization profiles.

    Args:
        bundle: a loaded `Bundle`. batch / prompt: the prompts' count and token count.
        new_tokens: tokens to generate. use_cache: reuse the KV cache (decode profile).

    Raises:
        DeploymentRefusedError: (check "generation length", exit 4) some step has no profile;
            names the most new tokens that fit for this prompt (0: the prompt alone does not
            fit) and the rebuild that serves longer runs.
    """
    profiles, names, cache = bundle.manifest["profiles"], bundle.input_names, cache_inputs(bundle.manifest)

    def fits(n: int) -> DeploymentRefusedError | None:
        try:
            for shapes in run_shapes(names, cache, batch, prompt, n, use_cache):
                check_request_shape(profiles, shapes, bundle=bundle.root)
        except DeploymentRefusedError as e:
            return e
        return None

    refusal = fits(new_tokens)
    if refusal is None:
        return
    lo, hi = 0, new_tokens - 1  # the largest n in 1..new_tokens-1 that fits (0: none)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) is None else (lo, mid - 1)
    how = "through the KV cache" if use_cache else "without the KV cache (the whole prefix every step)"
    limit = f"at most {lo} new tokens fit (`--generate {lo}`)" if lo else \
        "the prompt alone does not fit: shorten it or split the batch"
    raise DeploymentRefusedError(
        "generation length", f"{batch} prompt(s) of {prompt} tokens + {new_tokens} new tokens {how}; the first step "
        f"outside the profiles: {refusal.found}", refusal.expected,
        f"{limit}; or make the bundle with a larger profile (`python -m compiler bundle ... --max-shape BATCHxSEQUENCE "
        f"--max-past PAST`, or `python -m compiler build --bundle {quote(str(bundle.root))} --max-shape BATCHxSEQUENCE` on the "
        "GPU host)")


def prompt_ids(bundle: Any, prompts: list[str] | np.ndarray) -> tuple[list[list[int]], bool]:
    """(token ids per prompt, whether they came from text): texts are tokenized by the bundle's
    tokenizer without special tokens (as `python -m compiler generate` does).

    Raises:
        CompilerError: no prompt, or a prompt without tokens.
    """
    if isinstance(prompts, np.ndarray):
        ids = [[int(v) for v in row] for row in np.atleast_2d(prompts)]
        text = False
    else:
        ids = [list(bundle.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        text = True
    if not ids:
        raise CompilerError("no prompt given: pass at least one (`--prompt TEXT`)")
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise CompilerError(f"prompt(s) {empty} have no tokens: give each prompt some text")
    return ids, text


def batches(ids: list[list[int]], max_batch: int) -> list[list[int]]:
    """Indices of prompts grouped by token count (no padding), each group cut at `max_batch`."""
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        groups.setdefault(len(row), []).append(i)
    return [g[k:k + max_batch] for g in groups.values() for k in range(0, len(g), max_batch)]


def generate(bundle: Any, prompts: list[str] | np.ndarray, max_new_tokens: int,
             use_cache: bool = True) -> BundleGeneration:
    """Greedy decoding on a loaded bundle (the module docstring tells how).

    Args:
        bundle: a `compiler.deploy.runtime.Bundle`. prompts: texts, or int64 ids (batch, length).
        max_new_tokens: tokens generated per prompt (>= 1).
        use_cache: reuse the KV cache; ignored (False) on a bundle without one.

    Returns:
        BundleGeneration, one entry per prompt in the given order.

    Raises:
        CompilerError: not a generation bundle, no prompt, max_new_tokens < 1.
        DeploymentRefusedError: (exit 4) a run beyond the optimization profiles, before running.
    """
    check_generation_task(bundle.manifest, bundle.root)
    if max_new_tokens < 1:
        raise CompilerError(f"--generate {max_new_tokens}: ask for at least 1 new token")
    cache = cache_inputs(bundle.manifest)
    use_cache = bool(use_cache and cache)
    ids, from_text = prompt_ids(bundle, prompts)
    max_batch = min(int(p["input_ids"]["max"][0]) for p in bundle.manifest["profiles"] if "input_ids" in p)
    groups = batches(ids, max(1, max_batch))
    for group in groups:  # every refusal before the first step
        check_generation_fits(bundle, len(group), len(ids[group[0]]), max_new_tokens, use_cache)

    def step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return bundle.infer(**feeds)

    tokens: list[list[int]] = [[] for _ in ids]
    runs = []
    for group in groups:
        prompt = np.array([ids[i] for i in group], dtype=np.int64)
        # without the cache, a cache graph is fed an empty past every step (context profile)
        run = greedy_generate(step, bundle.input_names, cache, prompt, max_new_tokens, use_cache=use_cache)
        runs.append(run)
        for row, i in enumerate(group):
            tokens[i] = [int(v) for v in run.tokens[row]]
    texts = [bundle.tokenizer.decode(t) for t in tokens] if from_text else []
    return BundleGeneration(ids, tokens, texts, sum(r.seconds for r in runs), use_cache, bundle.backend, runs)
