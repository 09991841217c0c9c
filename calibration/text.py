"""Real text -> token ids, cached by content hash.

A `TokenizedSet` holds unpadded samples (ragged int64 arrays) so that callers can batch and
pad them however the stage needs (the verifier pads each batch to its longest sample).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from calibration.readers import read_source
from compiler.artifacts import atomic_write, cached
from compiler.errors import DataError
from compiler.settings import DataSettings

log = logging.getLogger(__name__)


def load_texts(data: DataSettings, count: int | None = None, skip: int = 0,
               minimum: int | None = None) -> list[str]:
    """Read `count` (default `data.samples`) real-text samples, after skipping `skip` of them.

    Args:
        data: where the text lies and how to filter it (`min_words`, `text_column`).
        count: samples wanted; defaults to `data.samples`.
        skip: samples to skip first (held-out sets come after calibration sets).
        minimum: accept fewer than `count`, down to this many (default: exactly `count`).

    Returns:
        Stripped strings, each with at least `data.min_words` words, in file order.

    Raises:
        DataError: the file is missing, unreadable or not text (`read_text_file`), a TSV/CSV has
            no usable column or a malformed line, or too few samples.
    """
    count = data.samples if count is None else count
    texts = read_source(data)
    # only as far as the samples wanted: a large corpus is not word-counted whole (a 126 MB file:
    # 6.6 s -> 1.3 s); where it holds too few, the whole file has been counted for the message
    long_enough = list(itertools.islice((t for t in texts if word_count(t) >= data.min_words),
                                        min(skip + count, sys.maxsize)))
    picked = long_enough[skip : skip + count]
    need = count if minimum is None else min(minimum, count)
    if len(picked) < need:
        raise DataError(
            f"{data.path or 'default text'}: found {len(picked)} samples with >= {data.min_words} "
            f"words after skipping {skip}, need {need} (of the file's {len(texts)} lines or rows, "
            f"{len(long_enough)} are long enough). Use a larger file (CALIB=path), fewer "
            "samples (--samples, --calib-samples, --train-samples), or a smaller --min-words."
        )
    return picked


# Scripts written without spaces between words: each character counts as a word, as BERT's
# basic tokenizer splits CJK ideographs into tokens of their own (Devlin et al. 2019,
# `_tokenize_chinese_chars`); kana, Thai, Lao, Khmer and Myanmar the same way.
_UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
             "\uf900-\ufaff\U00020000-\U0002ffff")
WORD = re.compile(f"[{_UNSPACED}]|[^\\s{_UNSPACED}]+")


def word_count(text: str) -> int:
    """Words in `text` for the `min_words` filter: runs of non-space characters, where each
    character of a script written without spaces (Chinese, Japanese kana, Thai, ...) is one."""
    return len(WORD.findall(text))


class CacheInput(str):
    """The name of a KV-cache graph input, (batch, heads, past, head_dim) float32
    (`past_key_values.{i}.key` / `.value` of `text-generation-with-past`).

    Feed builders (`TokenizedSet.batches`, `compiler.quant.calibrate.window_feeds`) fill it with
    an empty past (past 0: the context phase, the prompt in one pass), so every pass that runs a
    graph on text (calibration, `auto`, INT8, fidelity) runs a cache graph as it runs any other.
    """

    heads: int
    head_dim: int

    def __new__(cls, name: str, heads: int, head_dim: int) -> CacheInput:
        self = super().__new__(cls, name)
        self.heads, self.head_dim = int(heads), int(head_dim)
        return self

    def __getnewargs__(self) -> tuple[str, int, int]:  # pickling (child processes)
        return str(self), self.heads, self.head_dim

    def empty(self, batch: int) -> np.ndarray:
        """An empty past: (batch, heads, 0, head_dim) float32."""
        return np.zeros((batch, self.heads, 0, self.head_dim), dtype=np.float32)


def cache_inputs(model: Any) -> list[CacheInput]:
    """The KV-cache inputs of an `onnx.ModelProto` (rank-4 float inputs named `past_key_values.*`
    whose heads and head_dim are static), as `CacheInput`s."""
    found = []
    for v in model.graph.input:
        dims = v.type.tensor_type.shape.dim
        if v.name.startswith("past_key_values.") and len(dims) == 4 and dims[1].dim_value and dims[3].dim_value:
            found.append(CacheInput(v.name, dims[1].dim_value, dims[3].dim_value))
    return found


def feed_names(model: Any) -> list[str]:
    """The graph inputs of an `onnx.ModelProto` (initializers excluded) to feed, cache inputs as
    `CacheInput`s."""
    inits = {t.name for t in model.graph.initializer}
    cache = {c: c for c in cache_inputs(model)}
    return [cache.get(v.name, v.name) for v in model.graph.input if v.name not in inits]


def text_feeds(feeds: dict[str, np.ndarray], input_names: list[str]) -> dict[str, np.ndarray]:
    """`feeds` (input_ids, attention_mask, token_type_ids, each (batch, sequence) int64) for
    `input_names`, a `CacheInput` filled with an empty past.

    Raises:
        DataError: an input that is neither a text input nor a `CacheInput`.
    """
    batch = len(feeds["input_ids"])
    unknown = [n for n in input_names if n not in feeds and not isinstance(n, CacheInput)]
    if unknown:
        raise DataError(f"graph inputs {unknown} cannot be filled from text; known: {sorted(feeds)}")
    return {n: n.empty(batch) if isinstance(n, CacheInput) else feeds[n] for n in input_names}


@dataclass
class TokenizedSet:
    """Unpadded token ids of real-text samples.

    Attributes:
        input_ids: list of (length,) int64 arrays, one per sample.
        token_type_ids: same shapes, or None when the tokenizer has no segment ids.
        pad_id: id used to pad batches.
        key: content hash of (texts, tokenizer, max_length).
    """

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    pad_id: int
    key: str

    def __len__(self) -> int:
        return len(self.input_ids)

    def batches(self, batch_size: int, input_names: list[str], rng: np.random.Generator | None = None,
                vocab_size: int | None = None, by_length: bool = False) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Padded batches as ONNX Runtime feeds.

        Args:
            batch_size: samples per batch; the last batch may be smaller.
            input_names: graph inputs to fill (`input_ids`, `attention_mask`, `token_type_ids`).
            rng, vocab_size: when given, token ids are replaced by uniform random ids in
                [0, vocab_size) at the same positions (same shapes and masks), drawn sample by
                sample in the set's order whatever `by_length` says.
            by_length: batch the samples longest first (a stable sort: equal lengths keep the
                set's order), so that each batch pads little. Per-sample results are unchanged;
                the work is not: 64 WikiText-2 held-out samples in batches of 8 run 5,408 tokens
                instead of 7,392 (BERT-large FP32 on 2 CPU cores: ~3.45 ms a token).

        Yields:
            (feeds, lengths): feeds maps each input name to a (batch, sequence) int64 array;
            lengths is a (batch,) array of valid tokens per sample.
        """
        order = list(range(len(self)))
        drawn = None
        if rng is not None:  # the draws do not depend on the batching
            drawn = [rng.integers(0, vocab_size, len(x)) for x in self.input_ids]
        if by_length:
            order.sort(key=lambda i: -len(self.input_ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            lengths = np.array([len(self.input_ids[i]) for i in rows])
            seq = int(lengths.max())
            batch = np.full((len(rows), seq), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), seq), dtype=np.int64)
            types = np.zeros((len(rows), seq), dtype=np.int64)
            for k, i in enumerate(rows):
                n = lengths[k]
                batch[k, :n] = self.input_ids[i] if drawn is None else drawn[i]
                mask[k, :n] = 1
                if self.token_type_ids is not None:
                    types[k, :n] = self.token_type_ids[i]
            yield text_feeds({"input_ids": batch, "attention_mask": mask, "token_type_ids": types}, input_names), lengths


def equal_length_batches(tokens: Any, batch_size: int, input_names: list[str], limit: int | None = None,
                         rng: np.random.Generator | None = None,
                         vocab_size: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Batches of samples of exactly equal length: no padding, so nothing needs masking.

    Args:
        tokens: a `calibration.TokenizedSet`.
        batch_size: samples per batch at most (a length with fewer samples gives a smaller batch).
        input_names: graph inputs to fill (`calibration.text.text_feeds`).
        limit: the first `limit` samples only (None: all).
        rng, vocab_size: random ids in [0, vocab_size) instead of the text's, drawn sample by
            sample in the set's order, the draws `TokenizedSet.batches(1, ...)` makes.

    Yields:
        (feeds of (batch, length) int64, lengths (batch,) all equal).
    """
    count = len(tokens) if limit is None else min(limit, len(tokens))
    groups: dict[int, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for i in range(count):
        ids = np.asarray(tokens.input_ids[i], np.int64)
        if rng is not None:
            ids = rng.integers(0, vocab_size, len(ids)).astype(np.int64)
        types = (np.asarray(tokens.token_type_ids[i], np.int64) if tokens.token_type_ids is not None
                 else np.zeros_like(ids))
        groups[len(ids)].append((ids, types))
    for length in sorted(groups, reverse=True):
        rows = groups[length]
        for s in range(0, len(rows), batch_size):
            part = rows[s:s + batch_size]
            ids = np.stack([r[0] for r in part])
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                     "token_type_ids": np.stack([r[1] for r in part])}
            yield text_feeds(feeds, input_names), np.full(len(part), length)


def random_id_batches(tokens: TokenizedSet, batch_size: int, input_names: list[str], vocab_size: int, seed: int,
                      limit: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """The random-id set: uniform random ids in [0, vocab_size) at the lengths of `tokens`'
    samples (seeded with `seed`, drawn sample by sample in the set's order), in
    `equal_length_batches`. The `auto` precision pass collects its real-vs-random statistics on
    it and verify measures its random-id fidelity on it: one set, so verify reads the FP32
    outputs the statistics pass computed instead of running the FP32 graph again.

    Args:
        tokens: the samples whose lengths are kept (the held-out set).
        batch_size: samples per batch at most. input_names: graph inputs to fill.
        vocab_size: ids are drawn below it. seed: the generator's seed.
        limit: the first `limit` samples only (None: all).

    Yields:
        (feeds of (batch, length) int64, lengths (batch,) all equal).
    """
    yield from equal_length_batches(tokens, batch_size, input_names, limit, np.random.default_rng(seed), vocab_size)


def tokenized_set(texts: list[str], tokenizer: Any, max_length: int, cache_dir: str | Path | None) -> TokenizedSet:
    """Tokenize `texts` (truncated to `max_length` tokens), reusing a cached result.

    Args:
        texts: the samples. tokenizer: a Hugging Face tokenizer (`get_vocab`, `pad_token_id`).
        max_length: tokens per sample at most.
        cache_dir: folder of `<sha256>.npz` (`compiler.artifacts.cached`), keyed by the texts,
            the tokenizer's vocabulary and class, and `max_length`: a changed input gives a new
            key. None: no cache.

    Returns:
        The TokenizedSet (int64 ids; `key` is the content key).
    """
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    key = hashlib.sha256(json.dumps([texts, type(tokenizer).__name__, max_length]).encode()
                         + hashlib.sha256(vocab.encode()).digest()).hexdigest()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def tokenize() -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
        types = [np.asarray(x, dtype=np.int64) for x in enc["token_type_ids"]] if "token_type_ids" in enc else None
        return ids, types

    if not cache_dir:
        return TokenizedSet(*tokenize(), pad_id, key)
    path = Path(cache_dir) / f"{key[:32]}.npz"
    made: list[tuple[list[np.ndarray], list[np.ndarray] | None]] = []

    def compute() -> None:
        made.append(tokenize())
        ids, types = made[0]
        arrays = {"input_ids": np.concatenate(ids), "lengths": np.array([len(x) for x in ids])}
        if types is not None:
            arrays["token_type_ids"] = np.concatenate(types)

        def write(p: Path) -> None:
            with open(p, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, **arrays)

        atomic_write(path, write)

    if not cached(key, [path], compute, "tokenized set"):
        return TokenizedSet(*made[0], pad_id, key)
    with np.load(path) as z:
        splits = np.cumsum(z["lengths"])[:-1]
        ids = np.split(z["input_ids"], splits)
        types = np.split(z["token_type_ids"], splits) if "token_type_ids" in z else None
    return TokenizedSet(ids, types, pad_id, key)
