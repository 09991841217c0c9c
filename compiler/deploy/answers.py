"""What a bundle's outputs answer for each text, by task (`run` prints them and writes them into
`run.json`): the reading a deployment engineer checks first, next to the raw `.npy` outputs.

| task | answer per text |
|---|---|
| `text-classification` | the top class (`labels.txt` name) and its softmax probability; multi-label: every class whose sigmoid is >= 0.5; regression: the value |
| `token-classification` | each real token (special tokens and padding left out) with its top class |
| `fill-mask` | for each mask token, the `top_k` tokens and their probabilities |
| `question-answering` | the best span (start <= end, at most `MAX_ANSWER_TOKENS`) of the context (`run --context`; else of the text), decoded |
| `text-generation` | the greedy next token after the text |

Other tasks (`feature-extraction`, `sentence-embedding`) have no answer beyond the embedding.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

MAX_ANSWER_TOKENS = 30  # the longest span `question-answering` returns (the Hugging Face pipeline's default)


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis, computed in float64."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def task_answers(task: str, outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray], tokenizer: Any,
                 labels: Sequence[str] | None = None, top_k: int = 5, paired: bool = False,
                 problem_type: str | None = None) -> list[Any] | None:
    """One answer per text for `task`, or None for a task without one.

    Args:
        task: the bundle's task. outputs: the graph's outputs, e.g. `logits` float32 (batch,
            labels) or (batch, sequence, vocab). feeds: the request, `input_ids` and
            `attention_mask` int64 (batch, sequence), padded on the right.
        tokenizer: the bundle's tokenizer (token strings, the mask token, decoding).
        labels: class names in id order (the bundle's `labels.txt`); ids where None.
        top_k: tokens listed per mask (fill-mask).
        paired: the texts were tokenized as (question, context) pairs: an answer span lies in
            the context, after the first separator token.
        problem_type: text-classification's `config.problem_type`: `multi_label_classification`
            (a sigmoid per class: every class at 0.5 or more), `regression` (the one logit as the
            score), else one softmax class.

    Returns:
        A list with one JSON-ready answer per text (dicts of str, int and float), or None.
    """
    ids = feeds["input_ids"]
    mask = feeds.get("attention_mask", np.ones_like(ids))
    name = lambda i: labels[i] if labels is not None and i < len(labels) else str(i)  # noqa: E731
    if task == "text-classification" and problem_type == "regression":
        return [{"score": round(float(v), 6)} for v in np.asarray(outputs["logits"], np.float64)[:, 0]]
    if task == "text-classification" and problem_type == "multi_label_classification":
        probs = 1.0 / (1.0 + np.exp(-np.asarray(outputs["logits"], np.float64)))
        return [{"labels": [name(i) for i in np.flatnonzero(p >= 0.5)],
                 "scores": {name(i): round(float(v), 6) for i, v in enumerate(p)}} for p in probs]
    if task == "text-classification":
        probs = softmax(outputs["logits"])
        return [{"label": name(int(p.argmax())), "score": round(float(p.max()), 6)} for p in probs]
    if task == "token-classification":
        probs, special = softmax(outputs["logits"]), set(tokenizer.all_special_ids)
        return [[{"token": tokenizer.convert_ids_to_tokens(int(t)), "label": name(int(p.argmax())),
                  "score": round(float(p.max()), 6)}
                 for t, p, m in zip(row, rows, valid) if m and int(t) not in special]
                for row, rows, valid in zip(ids, probs, mask)]
    if task == "fill-mask":
        if tokenizer.mask_token_id is None:
            return None
        probs = softmax(outputs["logits"])
        answers = []
        for row, p in zip(ids, probs):
            where = np.flatnonzero(row == tokenizer.mask_token_id)
            answers.append([[{"token": tokenizer.decode([int(i)]).strip(), "score": round(float(p[pos, i]), 6)}
                             for i in np.argsort(-p[pos])[:top_k]] for pos in where])
        return answers
    if task == "question-answering":
        if paired and tokenizer.sep_token_id is not None:  # the context: after the question's separator
            after = np.cumsum(ids == tokenizer.sep_token_id, axis=1) >= 1
            mask = mask * after
        return [_best_span(s, e, row, valid, tokenizer) for s, e, row, valid
                in zip(outputs["start_logits"], outputs["end_logits"], ids, mask)]
    if task in ("text-generation", "text-generation-with-past"):
        last = np.maximum(mask.sum(axis=1) - 1, 0)
        nxt = [int(outputs["logits"][b, last[b]].argmax()) for b in range(len(ids))]
        return [{"next_token": tokenizer.decode([t]), "id": t} for t in nxt]
    return None


def _best_span(start: np.ndarray, end: np.ndarray, row: np.ndarray, valid: np.ndarray, tokenizer: Any) -> dict:
    """The span (i <= j < i + MAX_ANSWER_TOKENS, real tokens only) maximising start[i] + end[j]."""
    real = np.flatnonzero(valid.astype(bool) & ~np.isin(row, list(tokenizer.all_special_ids)))
    if not len(real):
        return {"answer": "", "start": 0, "end": 0, "score": None}
    s, e = start[real].astype(np.float64), end[real].astype(np.float64)
    score = s[:, None] + e[None, :]
    gap = real[None, :] - real[:, None]
    score[(gap < 0) | (gap >= MAX_ANSWER_TOKENS)] = -np.inf
    i, j = np.unravel_index(int(np.argmax(score)), score.shape)
    a, b = int(real[i]), int(real[j])
    return {"answer": tokenizer.decode([int(t) for t in row[a:b + 1]]).strip(), "start": a, "end": b,
            "score": round(float(score[i, j]), 6)}


def answer_line(task: str, answer: Any) -> str:
    """One printable line of an answer (`task_answers`'s element)."""
    if task == "text-classification" and "labels" in answer:  # multi-label
        return ", ".join(f"{n} ({answer['scores'][n]:.4f})" for n in answer["labels"]) or "(no class at 0.5 or more)"
    if task == "text-classification" and "label" not in answer:  # regression
        return f"{answer['score']:.4f}"
    if task == "text-classification":
        return f"{answer['label']} ({answer['score']:.4f})"
    if task == "token-classification":
        return " ".join(f"{t['token']}/{t['label']}" for t in answer)
    if task == "fill-mask":
        return " | ".join(", ".join(f"{c['token']!r} {c['score']:.3f}" for c in cands) for cands in answer) \
            or "(no mask token in the text)"
    if task == "question-answering":
        return repr(answer["answer"])
    return repr(answer.get("next_token"))
