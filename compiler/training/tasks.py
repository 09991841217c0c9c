"""Tasks: which head a graph ends in, its outputs and their dynamic axes (Optimum's task names).

| task | transformers class | outputs (dynamic axes) |
|---|---|---|
| `feature-extraction` | `AutoModel` | `last_hidden_state` (batch, sequence, hidden), `pooler_output` (batch, hidden) where the model has one |
| `sentence-embedding` | `AutoModel` + pooling + L2 norm in the graph | `sentence_embedding` (batch, hidden) |
| `text-classification` | `AutoModelForSequenceClassification` | `logits` (batch, labels) |
| `token-classification` | `AutoModelForTokenClassification` | `logits` (batch, sequence, labels) |
| `question-answering` | `AutoModelForQuestionAnswering` | `start_logits`, `end_logits` (batch, sequence) |
| `fill-mask` | `AutoModelForMaskedLM` | `logits` (batch, sequence, vocab) |
| `text-generation` | `AutoModelForCausalLM` | `logits` (batch, sequence, vocab) |
| `text-generation-with-past` | `AutoModelForCausalLM` with a KV cache | `logits`, `present.{i}.key` / `.value` (batch, heads, past_sequence + sequence, head_dim); inputs add `past_key_values.{i}.key` / `.value` (batch, heads, past_sequence, head_dim) and an `attention_mask` of (batch, past_sequence + sequence) |

The natural task of a checkpoint (`natural_task`): `sentence-embedding` for a sentence-transformers
checkpoint (its `modules.json` lists a Pooling module), else the one its `config.architectures`
names (`...ForSequenceClassification` -> `text-classification`, `...ForTokenClassification` ->
`token-classification`, `...LMHeadModel` /
`...ForCausalLM` -> `text-generation-with-past`, ...), else `feature-extraction`. Optimum's
exporter chooses the same way (`optimum.exporters.tasks.TasksManager.infer_task_from_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compiler.settings import TASKS
from compiler.training.sentence_modules import sentence_transformers_pooling

DECODER_TASKS = ("text-generation", "text-generation-with-past")
# Architecture name endings -> task (transformers' class naming)
_ARCHITECTURES = (("ForSequenceClassification", "text-classification"),
                  ("ForTokenClassification", "token-classification"), ("ForQuestionAnswering", "question-answering"), ("ForMaskedLM", "fill-mask"),
                  ("LMHeadModel", "text-generation-with-past"), ("ForCausalLM", "text-generation-with-past"))


@dataclass(frozen=True)
class TaskSpec:
    """One task's export contract.

    Attributes:
        name: Optimum's task name.
        auto_class: the transformers Auto class the head comes from (None: the base model).
        outputs: graph outputs before the KV cache's `present.*`.
        sequence_outputs: the outputs with a sequence axis (axis 1); the others are (batch, ...).
        family: `encoder`, `decoder` or `any`.
    """

    name: str
    auto_class: str | None
    outputs: tuple[str, ...]
    sequence_outputs: tuple[str, ...]
    family: str


SPECS = {s.name: s for s in (
    TaskSpec("feature-extraction", None, ("last_hidden_state",), ("last_hidden_state",), "any"),
    TaskSpec("sentence-embedding", None, ("sentence_embedding",), (), "any"),  # decoders: lasttoken pooling
    TaskSpec("text-classification", "AutoModelForSequenceClassification", ("logits",), (), "any"),
    TaskSpec("token-classification", "AutoModelForTokenClassification", ("logits",), ("logits",), "any"),
    TaskSpec("question-answering", "AutoModelForQuestionAnswering", ("start_logits", "end_logits"),
             ("start_logits", "end_logits"), "encoder"),
    TaskSpec("fill-mask", "AutoModelForMaskedLM", ("logits",), ("logits",), "encoder"),
    TaskSpec("text-generation", "AutoModelForCausalLM", ("logits",), ("logits",), "decoder"),
    TaskSpec("text-generation-with-past", "AutoModelForCausalLM", ("logits",), ("logits",), "decoder"),
)}


@dataclass(frozen=True)
class CacheSpec:
    """A decoder's KV cache geometry: `layers` x (key, value), each (batch, heads, past, head_dim)."""

    layers: int
    heads: int
    head_dim: int

    def input_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]


def cache_spec(config: Any, module: Any = None) -> CacheSpec:
    """The KV cache geometry of a Hugging Face decoder: layers, KV heads and head_dim.

    With `module` (the loaded decoder), measured: one forward of 2 tokens with `use_cache=True`,
    the shapes read from the cache it returns, (batch, kv_heads, past, head_dim) per layer. This
    holds for layouts a config describes in its own words (Falcon's `multi_query`: one KV head;
    grouped-query `num_key_value_heads`; Gemma's `head_dim` apart from hidden / heads). Without
    it, or where the cache is not in that form, read from the config: GPT-2's
    n_layer/n_head/n_embd or num_hidden_layers/num_attention_heads/hidden_size,
    num_key_value_heads when set.

    Raises:
        CompilerError: neither gives a KV cache (a state-space model such as Mamba), naming
            `--task text-generation` instead.
    """
    from compiler.errors import CompilerError

    measured = _measured_cache_spec(module) if module is not None else None
    if measured is not None:
        return measured
    model_type = getattr(config, "model_type", "model")
    try:
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    except Exception as e:  # noqa: BLE001 - e.g. transformers' per-layer attributes (Gemma 4's head_dim)
        raise CompilerError(f"--task text-generation-with-past: {model_type}'s layers differ in their KV cache "
                            f"({type(e).__name__}: {str(e)[:200]}); one (batch, heads, past, head_dim) shape "
                            f"for every layer is needed. {USE_NO_CACHE}") from e
    if not (layers and heads and hidden):
        raise CompilerError(
            f"--task text-generation-with-past needs a KV cache of (batch, heads, past, head_dim) tensors per "
            f"layer; this {model_type} model keeps no such cache (e.g. a state-space model's recurrent state). "
            f"{USE_NO_CACHE}")
    return CacheSpec(int(layers), int(kv_heads), int(head_dim))


USE_NO_CACHE = "Use --task text-generation (the whole prefix every step)."


def _measured_cache_spec(module: Any) -> CacheSpec | None:
    """The cache geometry from one 2-token forward of `module`, or None where the probe fails or
    the cache it returns is not per-layer (batch, kv_heads, past, head_dim) tensors.

    Raises:
        CompilerError: some layers keep no key tensor (linear-attention or state-space layers
            beside attention ones: Qwen3.5, Jamba) or the layers' shapes differ (per-layer head_dim).
    """
    from collections import Counter

    import torch

    from compiler.errors import CompilerError

    try:
        with torch.no_grad():
            out = module(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True)
    except Exception:  # noqa: BLE001 - a model that cannot run this probe keeps its config's figures
        return None
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        return None
    if hasattr(cache, "layers"):  # transformers' Cache: one object per layer with .keys
        keys = [getattr(layer, "keys", None) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        keys = list(cache.key_cache)
    else:
        keys = [layer[0] if isinstance(layer, (tuple, list)) and layer else None for layer in cache]
    shapes = [tuple(k.shape) if isinstance(k, torch.Tensor) and k.numel() else None for k in keys]
    if not any(shapes):
        return None
    if None in shapes or len(set(shapes)) != 1:
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        layers = f"layers by key shape: {dict(Counter(shapes))}" + (f"; cache layers {kinds}" if kinds else "")
        raise CompilerError(
            f"--task text-generation-with-past: the model's cache is not one (batch, heads, past, head_dim) key "
            f"and value per layer ({layers}): layers that keep another state (linear attention, state-space) or "
            f"differ in shape cannot be fed as past_key_values inputs. {USE_NO_CACHE}")
    if len(shapes[0]) != 4:
        return None
    batch, kv_heads, past, head_dim = next(iter(shapes))
    if batch != 1 or past != 2:
        return None
    return CacheSpec(len(keys), int(kv_heads), int(head_dim))


def check_task(task: str, family: str, name: str) -> TaskSpec:
    """The spec of `task` for a model of `family`.

    Raises:
        CompilerError: an unknown task, or one the model family has no head for (e.g.
            question-answering on GPT-2), naming the tasks that fit.
    """
    from compiler.errors import CompilerError

    if task not in SPECS:
        raise CompilerError(f"--task {task!r}: unknown; expected one of {', '.join(TASKS)}")
    spec = SPECS[task]
    if spec.family not in ("any", family):
        fits = [t for t, s in SPECS.items() if s.family in ("any", family)]
        raise CompilerError(f"--task {task} needs a{'n' if spec.family == 'encoder' else ''} {spec.family} "
                            f"model; {name} is a{'n' if family == 'encoder' else ''} {family}: use one of {', '.join(fits)}")
    return spec


def natural_task(where: str | Path, config: Any) -> str:
    """The task a checkpoint was made for: `sentence-embedding` for a sentence-transformers
    directory, else the task its `config.architectures` names, else `feature-extraction`."""
    if Path(str(where)).is_dir() and sentence_transformers_pooling(where) is not None:
        return "sentence-embedding"
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        for ending, task in _ARCHITECTURES:
            if arch.endswith(ending):
                return task if task != "text-generation-with-past" or keeps_kv_cache(config) else "text-generation"
    heads = [a for a in architectures if "For" in a]
    if heads:  # e.g. ...ForMultipleChoice: no task here has that head
        import logging

        logging.getLogger(__name__).warning(
            "%s: %s names a head no task here exports; compiling the base model (feature-extraction) "
            "without its head's weights. Tasks: %s", where, ", ".join(heads), ", ".join(SPECS))
    return "feature-extraction"


def keeps_kv_cache(config: Any) -> bool:
    """Whether a causal LM of this config takes a KV cache (`past_key_values`): its config has
    `use_cache`, and its transformers class is not stateful (Mamba, RWKV, Qwen3.5's linear
    attention) and builds a `DynamicCache`. False sends the default task to `text-generation`
    (OpenAI GPT, Reformer); a class transformers does not know (remote code) counts as True."""
    if not hasattr(config, "use_cache"):
        return False
    try:
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except Exception:  # noqa: BLE001 - remote code, or a config without a causal-LM class
        return True
    supports = getattr(cls, "_supports_default_dynamic_cache", None)
    return not getattr(cls, "_is_stateful", False) and (supports is None or bool(supports()))


def kv_cache_profiles(profile: Any, max_past: int) -> tuple[Any, Any]:
    """One engine, two optimization profiles for a graph with a KV cache.

    context (profile 0): past 0, batch and sequence as `profile` (the prompt, one pass);
    decode (profile 1): sequence 1, past 1..`max_past` (opt: half of it), batch as `profile`.
    Past 0 is an empty tensor, which TensorRT supports (developer guide, "Empty Tensors").

    Args:
        profile: the user's `ProfileSettings` (batch x sequence triples).
        max_past: longest cache the decode profile serves (tokens).
    """
    context = replace(profile, min_past=0, opt_past=0, max_past=0)
    b_min, b_opt, b_max = profile.min_shape[0], profile.opt_shape[0], profile.max_shape[0]
    decode = replace(profile, min_shape=(b_min, 1), opt_shape=(b_opt, 1), max_shape=(b_max, 1),
                     min_past=1, opt_past=max(1, max_past // 2), max_past=max_past)
    return context, decode


def check_training(settings: Any) -> None:
    """Refuse what a task's graph cannot go through: pruning the vocabulary of a tied LM head.

    2:4 recovery and QAT run on every task: on a head model their distillation matches the last
    block's output and the head's outputs (`compiler.training.distill.split_outputs`).

    Raises:
        CompilerError: `--prune-vocab --vocab-tied` with fill-mask / text-generation, naming what
            works.
    """
    from compiler.errors import CompilerError

    task = settings.model.task or "feature-extraction"
    if settings.vocab.texts and settings.vocab.tied and task in ("fill-mask", *DECODER_TASKS):
        raise CompilerError(f"--prune-vocab --vocab-tied with --task {task}: the tied LM head would return logits "
                            "over the kept tokens only, which cannot be verified against the full-vocabulary FP32 "
                            "graph (and whose argmax is no longer a token id). Prune the vocabulary of a "
                            "feature-extraction or sentence-embedding graph, or leave the vocabulary whole.")


def class_labels(config: Any, task: str) -> tuple[str, ...] | None:
    """The class names of a classification head in id order (`config.id2label`; transformers
    fills it with LABEL_0, LABEL_1, ... when the checkpoint names none), for `text-classification`
    and `token-classification`; None for other tasks."""
    if task not in ("text-classification", "token-classification"):
        return None
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    count = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
    return tuple(id2label.get(i, f"LABEL_{i}") for i in range(count)) or None
