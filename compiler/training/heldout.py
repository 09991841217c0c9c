"""Held-out cosine during fine-tuning: how close the student is to the frozen teacher, measured
while it trains, so a recovery run leaves its own curve (cosine against training minutes).

The figure is the one verification reports for the exported graph (`compiler.eval.fidelity`):
per sample, the cosine of the first model output (`last_hidden_state`, or a head model's first
output) flattened over its valid tokens, averaged over samples. Here it runs in PyTorch on the
training device, student against teacher, on a few held-out samples that training never reads.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from compiler.eval.fidelity import sample_fidelity

HELDOUT_EVAL_SAMPLES = 64  # held-out samples per curve point: ~1 s on MiniLM on 2 CPU cores
EVAL_BATCH = 16
REFERENCE_MAX_MIB = 256  # the teacher's kept outputs, at most (a GPT-2 LM head's logits: ~1.6 GiB for 64 x 128)


def first_output(out: Any) -> Any:
    """The first output of a Hugging Face model's output (ModelOutput, tuple or tensor)."""
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    return out[0] if isinstance(out, (tuple, list)) else out


def sample_cosines(ref: Any, got: Any, lengths: np.ndarray) -> list[float]:
    """Cosine per sample of (B, T, ...) or (B, ...) tensors over each sample's valid tokens:
    `compiler.eval.fidelity.sample_fidelity`, verification's own figure, on each row."""
    r, g = ref.numpy(), got.numpy()
    return [sample_fidelity(r, g, i, int(n))[0] for i, n in enumerate(lengths)]


def heldout_cosine(teacher: Any, tokens: Any, input_names: list[str],
                   max_samples: int = HELDOUT_EVAL_SAMPLES) -> Callable[[Any], float]:
    """A function student -> mean held-out cosine against `teacher` (see the module docstring).

    The teacher's outputs are computed on the first call and kept (FP32, CPU: 64 samples x 128
    tokens x 384 floats is 12 MiB for MiniLM), batch by batch up to `REFERENCE_MAX_MIB` (at
    least one batch): a model whose first output is a vocabulary's logits is measured on fewer
    samples. Each call then runs the student alone, in eval mode, without gradients, on the
    device its parameters are on.

    Args:
        teacher: the frozen reference model (Hugging Face, returns a ModelOutput or tuple).
        tokens: `calibration.TokenizedSet` of held-out text (never the training set).
        input_names: model inputs to feed.
        max_samples: the first this many samples are used.

    Returns:
        A callable; its value is in [-1, 1].

    Raises:
        ValueError: `tokens` is empty.
    """
    import torch

    if len(tokens) == 0:
        raise ValueError("heldout_cosine: no held-out sample")
    subset = type(tokens)(tokens.input_ids[:max_samples],
                          None if tokens.token_type_ids is None else tokens.token_type_ids[:max_samples],
                          tokens.pad_id, tokens.key)
    batches = list(subset.batches(EVAL_BATCH, input_names))
    refs: list[Any] = []

    def run(model: Any, feeds: dict) -> Any:
        device = next(model.parameters()).device
        return first_output(model(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items()})).float().cpu()

    def evaluate(student: Any) -> float:
        was_training = student.training
        student.eval()
        cos: list[float] = []
        with torch.no_grad():
            if not refs:
                kept = 0
                for feeds, _ in batches:
                    refs.append(run(teacher, feeds))
                    kept += refs[-1].numel() * 4
                    if kept >= REFERENCE_MAX_MIB << 20:
                        break
            for (feeds, lengths), ref in zip(batches, refs):
                cos += sample_cosines(ref, run(student, feeds), lengths)
        student.train(was_training)
        return float(np.mean(cos))

    return evaluate

