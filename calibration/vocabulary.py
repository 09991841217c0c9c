"""Which token ids a deployment's text uses: counts, the kept vocabulary, out-of-vocabulary rates.

Feeds the vocabulary-pruning pass (`compiler.passes.vocab_prune`): count the ids of the domain
text, keep those seen at least `min_count` times, the special tokens, and optionally the most
frequent ids of a general text; every other id then maps to the unknown token.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibration.text import TokenizedSet

BATCH = 1024  # texts per tokenizer call: bounds the memory of one encoding


def count_tokens(texts: list[str], tokenizer: Any, max_length: int | None = None) -> np.ndarray:
    """Occurrences of each token id in `texts` as `tokenizer` encodes them.

    Args:
        texts: the samples, one string each.
        tokenizer: a Hugging Face tokenizer; each text is encoded with its special tokens
            ([CLS] ... [SEP] for WordPiece), truncated to `max_length` tokens when given.
        max_length: tokens per sample at most. Defaults to None (no truncation).

    Returns:
        (len(tokenizer),) int64 counts, added tokens included.
    """
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for start in range(0, len(texts), BATCH):
        enc = tokenizer(texts[start : start + BATCH], truncation=max_length is not None, max_length=max_length)
        ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
        if ids:
            counts += np.bincount(np.concatenate(ids), minlength=counts.size)[: counts.size]
    return counts


def special_token_ids(tokenizer: Any) -> list[int]:
    """Every special token id of `tokenizer` (`all_special_ids`: [PAD], [UNK], [CLS], ...), sorted."""
    return sorted({int(i) for i in tokenizer.all_special_ids})


def choose_vocabulary(domain_counts: np.ndarray, min_count: int, special_ids: list[int] | np.ndarray,
                      general_counts: np.ndarray | None = None, keep_top: int = 0) -> np.ndarray:
    """The token ids to keep.

    Args:
        domain_counts: (V,) occurrences of each id in the domain text (`count_tokens`).
        min_count: keep every id seen at least this many times in the domain text.
        special_ids: ids always kept (`special_token_ids`).
        general_counts: (V,) occurrences in a general text, for `keep_top`. Defaults to None.
        keep_top: also keep the `keep_top` most frequent ids of `general_counts` (ties: the lower
            id first; ids never seen there are not frequent and are not added). Defaults to 0.

    Returns:
        Sorted unique int64 ids.

    Raises:
        ValueError: min_count < 1, keep_top < 0, keep_top > 0 without general_counts, counts of
            different lengths, or a special id outside [0, V).
    """
    domain = np.asarray(domain_counts)
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1 (got {min_count}): 0 would keep every id")
    if keep_top < 0:
        raise ValueError(f"keep_top must be >= 0, got {keep_top}")
    if keep_top > 0 and general_counts is None:
        raise ValueError(f"keep_top={keep_top} needs general_counts (a general text's token counts)")
    special = np.asarray(special_ids, dtype=np.int64).ravel()
    if special.size and (special.min() < 0 or special.max() >= domain.size):
        raise ValueError(f"special ids {special.tolist()} fall outside the vocabulary [0, {domain.size})")
    keep = [np.flatnonzero(domain >= min_count), special]
    if keep_top > 0:
        general = np.asarray(general_counts)
        if general.shape != domain.shape:
            raise ValueError(f"general_counts has shape {general.shape}, domain_counts {domain.shape}")
        order = np.lexsort((np.arange(general.size), -general))[:keep_top]  # by count desc, then id
        keep.append(order[general[order] > 0])
    return np.unique(np.concatenate(keep).astype(np.int64))


def oov_rate(tokens: TokenizedSet, kept: np.ndarray) -> float:
    """Share (0..1) of the token positions of `tokens` whose id is not in `kept`; 0.0 when empty."""
    if not len(tokens):
        return 0.0
    ids = np.concatenate(tokens.input_ids)
    return float(np.isin(ids, np.asarray(kept), invert=True).mean()) if ids.size else 0.0
