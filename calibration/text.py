"""Real text -> token ids, cached by content hash.

A `TokenizedSet` holds unpadded samples (ragged int64 arrays) so that callers can batch and
pad them however the stage needs (the verifier pads each batch to its longest sample).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from compiler.artifacts import atomic_write, cached
from compiler.errors import DataError
from compiler.settings import DataSettings

log = logging.getLogger(__name__)


def shared_data_path(relative: str) -> Path | None:
    """`shared/data/<relative>` beside the cwd or this checkout (the project is checked out next
    to the shared data folder), or None when it exists in neither place."""
    here = Path(__file__).resolve().parent.parent
    for root in (Path.cwd().parent, here.parent, Path.cwd()):
        if (root / "shared" / "data" / relative).exists():
            return root / "shared" / "data" / relative
    return None


def default_text_path() -> Path | None:
    """WikiText-2 test from `../shared/data` (relative to the cwd or to this checkout), or None."""
    return shared_data_path("wikitext-2/test.txt")


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
    texts = _read_source(data)
    long_enough = [t for t in texts if word_count(t) >= data.min_words]
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


def _read_source(data: DataSettings) -> list[str]:
    if data.path is None:
        path = default_text_path()
        if path is None:
            raise DataError(
                "no text given and ../shared/data/wikitext-2/test.txt was not found: pass a text "
                "or TSV file with --calib PATH (Makefile: CALIB=path)."
            )
    else:
        path = Path(data.path)
    if path.is_dir():
        raise DataError(f"{path} is a directory: pass a text file (one sample a line), a TSV/CSV "
                        "file with a header or a JSON Lines file.")
    if path.is_file():
        if path.suffix.lower() in (".tsv", ".csv"):
            return _read_table(path, data.text_column)
        if path.suffix.lower() in JSON_LINES:
            return _read_json_lines(path, data.text_column)
        return read_text_file(path).splitlines()
    if data.path is not None and _looks_like_dataset(data.path):
        return _read_hf_dataset(data.path, data.text_column)
    raise DataError(f"{path}: no such file. Pass a text, TSV/CSV or JSON Lines file with --calib PATH.")


def _looks_like_dataset(spec: str) -> bool:
    """`glue:sst2:validation` or `user/name`: at most one '/', no leading '.'/'/', no file suffix."""
    name = spec.split(":")[0]
    return (name.count("/") <= 1 and not name.startswith((".", "/"))
            and Path(name).suffix.lower() not in (".txt", ".tsv", ".csv", *JSON_LINES))


# A control character in more than this share of a file's characters marks it as binary (real
# text, even with stray form feeds or escape codes, stays far below; random bytes are ~11 %).
MAX_CONTROL_SHARE = 0.01
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls but \t \n \v \f \r


def read_text_file(path: Path) -> str:
    """The text of `path`: UTF-8 (a BOM dropped), UTF-16 with a BOM, else Windows-1252/Latin-1.

    A file that is not UTF-8 is decoded as cp1252 (latin-1 where cp1252 leaves a byte
    undefined) with a WARNING naming the file and the encoding; a UTF-8 file with a few stray
    bytes keeps its UTF-8 and reads each stray byte as U+FFFD, also with a WARNING.

    Raises:
        DataError: the file cannot be read (permissions), or is not text: it holds NUL bytes
            (executables, .safetensors, archives) or more than `MAX_CONTROL_SHARE` control
            characters.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e}): check that it exists and is "
                        "readable, or pass another text, TSV/CSV or JSON Lines file.") from e
    text = None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a BOM (Excel's "Unicode text")
        try:
            text = raw.decode("utf-16")
        except UnicodeDecodeError:
            pass  # not UTF-16 after all: the NUL check decides
    if text is None:
        if b"\0" in raw:
            raise _not_text(path, "NUL bytes")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            text = _decode_non_utf8(path, raw, e.start)
    controls = len(_CONTROL.findall(text))
    if controls > MAX_CONTROL_SHARE * len(text):
        raise _not_text(path, f"{controls} control characters in {len(text)}")
    return text


def _decode_non_utf8(path: Path, raw: bytes, first_bad: int) -> str:
    lenient = raw.decode("utf-8-sig", errors="replace")
    if re.search("[\x80-\ufffc\ufffe-\U0010ffff]", lenient):  # real UTF-8 sequences too: keep UTF-8
        bad = lenient.count("\ufffd")
        log.warning("%s: UTF-8 with %d invalid byte sequence(s) (the first at byte %d), read as U+FFFD; "
                    "re-save the file as UTF-8 to read them.", path, bad, first_bad)
        return lenient
    try:
        text, encoding = raw.decode("cp1252"), "cp1252 (Windows Latin-1)"
    except UnicodeDecodeError:
        text, encoding = raw.decode("latin-1"), "latin-1 (ISO-8859-1)"
    log.warning("%s is not UTF-8 (byte 0x%02x at offset %d): read as %s; re-save it as UTF-8 if "
                "that is not its encoding.", path, raw[first_bad], first_bad, encoding)
    return text


def _not_text(path: Path, why: str) -> DataError:
    return DataError(f"{path} is not a text file ({why} / binary): pass a text file (one sample a "
                     "line) or a TSV/CSV file with a header.")


# csv's default limit is 131,072 characters a field; a long document in one cell is still text
# (tokenizing truncates it). The limit is a C long: 2**31 - 1 fits every platform.
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


def text_column(fields: Any, column: str | None) -> str | None:
    """The column (or JSON field) that holds the text: `column` when given, else the first of
    `sentence` and `text` among `fields`, else None."""
    return column or next((c for c in ("sentence", "text") if c in fields), None)


def _read_table(path: Path, column: str | None) -> list[str]:
    """The text column of a TSV or CSV file with a header. A TSV is read as GLUE writes it:
    quote characters are text (SST-2's sentences open and close quotes freely). A CSV is read
    as RFC 4180 and Python's csv and pandas write it: a field holding a comma, a quote or a
    newline is quoted, a quote inside doubled."""
    tsv = path.suffix.lower() == ".tsv"
    reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    previous = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        fields = reader.fieldnames or []
        name = text_column(fields, column)
        if name not in fields:
            raise DataError(
                f"{path}: no column {column or 'sentence/text'!r} in header {fields}; "
                "choose one with --text-column NAME."
            )
        return [row[name] or "" for row in reader]
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: {e}; fix that line or pass another file.") from e
    finally:
        csv.field_size_limit(previous)


JSON_LINES = (".jsonl", ".ndjson")


def _read_json_lines(path: Path, column: str | None) -> list[str]:
    """The text field of a JSON Lines file: one object a line, as `datasets`' `to_json` and
    pandas' `to_json(lines=True)` write them. The field is `column`, default `sentence` or
    `text` (chosen on the first object); blank lines are skipped, a null or missing field is an
    empty text (skipped by `min_words`), a number or list is its JSON text.

    Raises:
        DataError: a line that is not a JSON object (its line number), or a first object
            without the field (its keys and the flag that picks another).
    """
    texts: list[str] = []
    name = column
    for number, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}, line {number}: not JSON ({e}); fix that line or pass another file.") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object; JSON Lines "
                            "text needs one object a line, e.g. {\"text\": \"...\"}.")
        if not texts:
            name = text_column(row, column)
            if name not in row:
                raise DataError(f"{path}: no field {column or 'sentence/text'!r} in its first object (keys "
                                f"{sorted(row)[:20]}); choose one with --text-column NAME.")
        value = row.get(name)
        texts.append(value if isinstance(value, str) else "" if value is None else json.dumps(value))
    return texts


def _read_hf_dataset(spec: str, column: str | None) -> list[str]:
    """`name[:config][:split]` through the `datasets` package (needs a reachable hub)."""
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    try:
        import datasets  # optional: only for hub datasets
    except ImportError as e:
        raise DataError(f"{spec!r} is not a file, and reading a Hugging Face dataset needs "
                        f"`pip install datasets` ({e}). Or pass a local text, TSV/CSV or JSON Lines file.") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # hub unreachable, unknown dataset: both end here
        raise DataError(f"could not load Hugging Face dataset {spec!r}: {e}. "
                        "Pass a local text, TSV/CSV or JSON Lines file with --calib PATH instead.") from e
    name_col = text_column(ds.column_names, column)
    if name_col not in ds.column_names:
        raise DataError(f"dataset {spec!r} has no column {column!r}: {ds.column_names}")
    return [str(t) for t in ds[name_col]]


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
