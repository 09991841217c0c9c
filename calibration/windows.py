"""Long training lines as several samples: a line of more than `max_length` tokens gives every
consecutive window of it, not only the first `max_length` tokens that truncation keeps.

WikiText-2 paragraphs often run to 300-500 tokens: at MiniLM's 128 tokens, truncation dropped
158k of the 570k tokens of the 2:4 recovery's default text (1,882 of its 6,093 lines run past
the cap). Windowing gives fine-tuning that text; the teacher's targets for it cost no more
than for any other sample. Measured on that recovery, it did not raise the held-out cosine at
equal steps (docs/sparsity.md), so it is off unless asked for (`--train-windows`). Training
text only: calibration and held-out samples stay one per line, so the figures keep their
meaning.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

from calibration.text import WORD

log = logging.getLogger(__name__)


def split_windows(texts: list[str], tokenizer: Any, max_length: int, min_words: int = 1) -> list[str]:
    """Each text, cut between words (`calibration.text.word_count`'s: at whitespace, and between
    the characters of a script written without spaces) into consecutive pieces of at most `max_length` tokens
    (special tokens included), in order; a text that fits stays as it is.

    Words are packed greedily by their token counts in the whole text; each piece is then
    tokenized on its own and, where that gives more tokens (a byte-level BPE tokenizer encodes
    a first word without its leading space differently), gives its last words to the next
    piece. A single word longer than a window is a piece of its own (truncated later, as
    any sample). Pieces with fewer than `min_words` words (a paragraph's short tail) are
    dropped; the first piece of a text is always kept, as truncation would have kept it.

    Args:
        texts: strings, one sample each.
        tokenizer: a Hugging Face tokenizer. Without a fast (Rust) tokenizer there are no
            character offsets to count words by: the texts are returned unchanged, with a warning.
        max_length: tokens per sample, special tokens included (`DataSettings.max_length`).
        min_words: the fewest words of a later piece.

    Returns:
        The pieces, stripped, text by text; a text that fits is returned as given.

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
        if len(enc.ids) <= body:
            out.append(text)
            continue
        spans = [m.span() for m in WORD.finditer(text)]
        ends = [e for _, e in spans]
        counts = [0] * len(spans)
        for start, _ in enc.offsets:  # a token belongs to the word it starts in or before
            counts[min(bisect.bisect_right(ends, start), len(spans) - 1)] += 1
        i = 0
        while i < len(spans):
            j, used = i, 0
            while j < len(spans) and used + counts[j] <= body:
                used, j = used + counts[j], j + 1
            j = max(j, i + 1)
            while j > i + 1 and len(tokenizer(text[spans[i][0]:spans[j - 1][1]])["input_ids"]) > max_length:
                j -= 1
            if i == 0 or j - i >= min_words:
                out.append(text[spans[i][0]:spans[j - 1][1]])
            i = j
    return out
