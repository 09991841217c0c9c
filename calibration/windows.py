"""Long training lines as several samples: a line of more than `max_length` tokens gives every
consecutive window of it, not only the first `max_length` tokens that truncation keeps.

WikiText-2 paragraphs often run to 300-500 tokens; at MiniLM's 128 tokens, truncation dropped
158k of the 570k tokens of the 2:4 recovery's default text (1,882 of its 6,093 lines run past
the cap). Windowing gives fine-tuning that unseen text, as the teacher's targets for it cost
nothing more than for any other sample (docs/sparsity.md). Training text only: calibration and
held-out samples stay one per line, so the figures keep their meaning.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def split_windows(texts: list[str], tokenizer: Any, max_length: int, min_words: int = 1) -> list[str]:
    """Each text, cut at word boundaries into consecutive pieces of at most `max_length` tokens
    (special tokens included), in order; a text that fits stays as it is.

    A piece ends at the last whole word (whitespace-separated) that fits (a single word longer than a window is cut
    inside it). Pieces with fewer than `min_words` whitespace-separated words (a paragraph's
    short tail) are dropped; the first piece of a text is always kept, as truncation would have
    kept it.

    Args:
        texts: stripped strings, one sample each.
        tokenizer: a Hugging Face tokenizer. Without a fast (Rust) tokenizer there are no
            character offsets to cut at: the texts are returned unchanged, with a warning.
        max_length: tokens per sample, special tokens included (`DataSettings.max_length`).
        min_words: the fewest words of a later piece.

    Returns:
        The pieces, text by text: every text's first piece, then its later ones, in order.

    Raises:
        ValueError: `max_length` leaves no room after the tokenizer's special tokens.
    """
    body = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if body < 1:
        raise ValueError(f"max_length={max_length} leaves no token after the special tokens")
    if not getattr(tokenizer, "is_fast", False):
        log.warning("split_windows: %s has no character offsets (not a fast tokenizer); long lines "
                    "stay truncated to their first %d tokens", type(tokenizer).__name__, max_length)
        return list(texts)
    out: list[str] = []
    for text, enc in zip(texts, tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                                          verbose=False).encodings):
        n, offsets = len(enc.ids), enc.offsets
        if n <= body:
            out.append(text)
            continue
        start = 0
        while start < n:
            end = min(start + body, n)
            if end < n:  # back to a whitespace boundary, unless one word fills the window
                cut = end
                while cut > start and not _starts_word(text, offsets[cut][0]):
                    cut -= 1
                end = cut if cut > start else end
            piece = text[offsets[start][0]:offsets[end - 1][1]].strip()
            if start == 0 or len(piece.split()) >= min_words:
                out.append(piece)
            start = end
    return out


def _starts_word(text: str, at: int) -> bool:
    """Whether the token starting at character `at` begins a whitespace-separated word (a
    byte-level BPE token may carry the space itself)."""
    return at == 0 or text[at - 1].isspace() or text[at].isspace()
