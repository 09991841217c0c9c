"""The export wrappers of the tasks (`compiler.training.tasks`): a module taking the graph's
inputs positionally and returning its outputs as a tuple, with the outputs' dynamic axes.

- `sentence-embedding`: the base model, then the checkpoint's sentence-transformers modules
  inside the graph: pooling over valid tokens, Dense layers, L2 normalisation
  (`compiler.training.sentence_modules`; Reimers & Gurevych 2019).
- heads (`text-classification`, `token-classification`, `question-answering`, `fill-mask`,
  `text-generation`): the task model's named outputs, no cache.
- `text-generation-with-past`: flat KV-cache tensors in and out; inside, a transformers
  `DynamicCache` is filled from `past_key_values.{i}.key/value` (batch, heads, past, head_dim)
  and its updated layers are returned as `present.{i}.key/value` (batch, heads, past +
  sequence, head_dim). The `attention_mask` covers past and new tokens (batch, past + sequence).
"""

from __future__ import annotations

from typing import Any

from compiler.training.sentence_modules import dense_module, pool
from compiler.training.tasks import SPECS

BATCH_SEQUENCE = {0: "batch", 1: "sequence"}
TOTAL = "past_sequence+sequence"


def task_module(loaded: Any) -> Any:
    """The export wrapper of `loaded.task` around `loaded.module` (eval mode)."""
    import torch

    module, names, task = loaded.module, list(loaded.input_names), loaded.task
    text_names = [n for n in names if not n.startswith("past_key_values.")]
    outputs = SPECS[task].outputs

    def kwargs_of(inputs: tuple[Any, ...]) -> dict[str, Any]:
        kw = dict(zip(text_names, inputs))
        if "use_cache" in _params(module):
            kw["use_cache"] = False
        return kw

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module
            self.dense = torch.nn.ModuleList(dense_module(d) for d in loaded.pooling.dense)

        def forward(self, *inputs: torch.Tensor):
            kw = kwargs_of(inputs)
            states = self.model(**kw, return_dict=True).last_hidden_state
            return (pool(states, kw["attention_mask"], loaded.pooling, self.dense),)

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, *inputs: torch.Tensor):
            out = self.model(**kwargs_of(inputs), return_dict=True)
            return tuple(out[n] for n in outputs)

    class WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
            from transformers import DynamicCache

            cache = DynamicCache()
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                             use_cache=True, return_dict=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    wrapper = {"sentence-embedding": Pooled, "text-generation-with-past": WithPast}.get(task, Head)
    return wrapper().eval()


def task_axes(loaded: Any, output_names: list[str]) -> dict[str, dict[int, str]]:
    """Dynamic axes of every input and output of the task graph (torch.onnx.export's form)."""
    spec = SPECS[loaded.task]
    axes: dict[str, dict[int, str]] = {}
    for n in loaded.input_names:
        axes[n] = {0: "batch", 2: "past_sequence"} if n.startswith("past_key_values.") else dict(BATCH_SEQUENCE)
    if loaded.cache is not None:
        axes["attention_mask"] = {0: "batch", 1: TOTAL}
    for n in output_names:
        axes[n] = ({0: "batch", 2: TOTAL} if n.startswith("present.")
                   else dict(BATCH_SEQUENCE) if n in spec.sequence_outputs else {0: "batch"})
    return axes


def dummy_inputs(loaded: Any, batch: int = 2, sequence: int = 16, past: int = 3) -> tuple[Any, ...]:
    """Tracing inputs: ids of ones; with a cache, a random past of `past` tokens (non-zero, so
    the trace keeps the past axis dynamic) and a mask over past + sequence."""
    import torch

    out = []
    for n in loaded.input_names:
        if n.startswith("past_key_values."):
            c = loaded.cache
            out.append(torch.randn(batch, c.heads, past, c.head_dim, generator=torch.Generator().manual_seed(0)))
        elif n == "attention_mask" and loaded.cache is not None:
            out.append(torch.ones(batch, past + sequence, dtype=torch.long))
        else:
            out.append(torch.ones(batch, sequence, dtype=torch.long))
    return tuple(out)


def task_output_names(loaded: Any) -> list[str]:
    """The graph outputs of `loaded.task`: the spec's, then `present.*` with a cache."""
    return list(SPECS[loaded.task].outputs) + (loaded.cache.output_names() if loaded.cache is not None else [])


def _params(module: Any) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)
