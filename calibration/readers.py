"""Reading samples from files: text (any common encoding), TSV/CSV with a header, JSON Lines,
Parquet, or a Hugging Face dataset id; each a list of strings in file order (`read_source`).
`calibration.text.load_texts` filters and picks from them."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from compiler.errors import DataError
from compiler.settings import DataSettings

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, str]] = set()  # (file, --text-column) already named as without effect


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


def read_source(data: DataSettings) -> list[str]:
    """The samples of `data.path` (default: WikiText-2 test from `../shared/data`), one per line
    or row, in file order, unfiltered: a text file, a TSV/CSV file with a header, JSON Lines, a
    Parquet file (with `pyarrow`), or a Hugging Face dataset id (with `datasets` and a hub).

    Raises:
        DataError: no such file, a directory, a file that is not text, a table without the text
            column, a malformed line; each names the file and the fix.
    """
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
        kind = format_suffix(path)
        if kind in (".tsv", ".csv"):
            return _read_table(path, data.text_column)
        if kind in JSON_LINES:
            return _read_json_lines(path, data.text_column)
        if kind == ".json":
            return _read_json(path, data.text_column)
        if kind == ".parquet":
            return _read_parquet(path, data.text_column)
        if data.text_column is not None and (str(path), data.text_column) not in _WARNED:  # once a file
            _WARNED.add((str(path), data.text_column))
            log.warning("%s: --text-column %s has no effect on a plain text file (one sample a line); it picks a "
                        "column of a TSV/CSV, JSON or Parquet file", path, data.text_column)
        return read_text_file(path).splitlines()
    if data.path is not None and _looks_like_dataset(data.path):
        return _read_hf_dataset(data.path, data.text_column)
    if path.exists():  # a device or a pipe (/dev/null, <(zcat ...)): read more than once, so refused
        raise DataError(f"{path} is not a regular file (a device or a pipe): write the text to a file and pass "
                        "its path (the text is read by more than one stage).")
    raise DataError(f"{path}: no such file. Check the path given to --calib, --train-text, --prune-vocab or "
                    "--text-file: a text, TSV/CSV, JSON Lines or Parquet file.")


def _looks_like_dataset(spec: str) -> bool:
    """`glue:sst2:validation` or `user/name`: at most one '/', no leading '.'/'/', no file suffix."""
    name = spec.split(":")[0]
    return (name.count("/") <= 1 and not name.startswith((".", "/"))
            and Path(name).suffix.lower() not in (".txt", ".tsv", ".csv", ".parquet", ".json", *JSON_LINES,
                                                  *COMPRESSED))


# A control character in more than this share of a file's characters marks it as binary (real
# text, even with stray form feeds or escape codes, stays far below; random bytes are ~11 %).
MAX_CONTROL_SHARE = 0.01
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls but \t \n \v \f \r


COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # read through the standard library's modules


def format_suffix(path: Path) -> str:
    """The suffix that names the format, past a compression suffix: `corpus.tsv.gz` -> ".tsv"."""
    suffixes = [x.lower() for x in path.suffixes]
    return suffixes[-2] if len(suffixes) > 1 and suffixes[-1] in COMPRESSED else path.suffix.lower()


def read_text_file(path: Path) -> str:
    """The text of `path`: UTF-8 (a BOM dropped), UTF-16 with a BOM, else Windows-1252/Latin-1;
    decompressed first where its suffix is `.gz`, `.bz2` or `.xz` (`COMPRESSED`).

    A file that is not UTF-8 is decoded as cp1252 (latin-1 where cp1252 leaves a byte
    undefined) with a WARNING naming the file and the encoding; a UTF-8 file with a few stray
    bytes keeps its UTF-8 and reads each stray byte as U+FFFD, also with a WARNING.

    Raises:
        DataError: the file cannot be read (permissions) or decompressed, or is not text: it holds NUL bytes
            (executables, .safetensors, archives) or more than `MAX_CONTROL_SHARE` control
            characters.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e}): check that it exists and is "
                        "readable, or pass another text, TSV/CSV or JSON Lines file.") from e
    if path.suffix.lower() in COMPRESSED:  # corpus.txt.gz, data.jsonl.bz2, ...
        import importlib

        try:
            raw = importlib.import_module(COMPRESSED[path.suffix.lower()]).decompress(raw)
        except Exception as e:  # noqa: BLE001 - gzip.BadGzipFile, OSError, lzma.LZMAError, EOFError
            raise DataError(f"{path}: not a readable {COMPRESSED[path.suffix.lower()]} file ({e}); "
                            "decompress it or pass the plain file.") from e
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


# The text's usual column names, in order: GLUE's single sentence, plain text, crawled content,
# the first of a GLUE / MNLI / QQP pair, SQuAD's question, document and review corpora.
TEXT_COLUMNS = ("sentence", "text", "content", "sentence1", "premise", "question1", "question", "document",
                "passage", "review")
NAMED = "/".join(TEXT_COLUMNS)


def text_column(fields: Any, column: str | None) -> str | None:
    """The column (or JSON field) that holds the text: `column` when given, else the first of
    `TEXT_COLUMNS` among `fields` (logged when it is not `sentence` or `text`), else None. (A
    TSV/CSV's `column` that is a number names a column of a file without a header, from 1:
    `_read_table`.)"""
    if column:
        return column
    found = next((c for c in TEXT_COLUMNS if c in fields), None)
    if found not in (None, "sentence", "text"):
        log.info("text column %r (of %s); --text-column NAME chooses another", found, list(fields)[:12])
    return found


def _read_table(path: Path, column: str | None) -> list[str]:
    """The text column of a TSV or CSV file with a header. A TSV is read as GLUE writes it:
    quote characters are text (SST-2's sentences open and close quotes freely). A CSV is read
    as RFC 4180 and Python's csv and pandas write it: a field holding a comma, a quote or a
    newline is quoted, a quote inside doubled."""
    tsv = format_suffix(path) == ".tsv"
    text = read_text_file(path)
    delimiter = "\t" if tsv else _csv_delimiter(path, text)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    previous = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        fields = reader.fieldnames or []
        name = text_column(fields, column)
        if column is not None and column.isdigit():
            # a number: the column of a file without a header (AG News, Yelp CSVs), from 1; the first line is a row
            if not 1 <= int(column) <= len(fields):
                raise DataError(f"{path}: --text-column {column}: its first line has {len(fields)} column(s)")
            rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter,
                              quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
            return [row[int(column) - 1] if len(row) >= int(column) else "" for row in rows]
        if name not in fields:
            raise DataError(
                f"{path}: no column {column or NAMED!r} in header {fields}; "
                "choose one with --text-column NAME (a file without a header: the column's number, from 1)."
            )
        return [row[name] or "" for row in reader]
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: {e}; fix that line or pass another file.") from e
    finally:
        csv.field_size_limit(previous)


def _csv_delimiter(path: Path, text: str) -> str:
    """"," for a CSV, or the ";" / "|" / tab its first line holds where it holds no comma (a CSV
    saved with a European locale's list separator), logged."""
    first = text.split("\n", 1)[0]
    if "," not in first:
        for d in (";", "|", "\t"):
            if d in first:
                log.info("%s: no comma in its first line: columns separated by %r", path, d)
                return d
    return ","


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
                raise DataError(f"{path}: no field {column or NAMED!r} in its first object (keys "
                                f"{sorted(row)[:20]}); choose one with --text-column NAME.")
        value = row.get(name)
        texts.append(value if isinstance(value, str) else "" if value is None else json.dumps(value))
    return texts


def _read_json(path: Path, column: str | None) -> list[str]:
    """The texts of a `.json` file: a JSON array of objects (their text field, as for JSON
    Lines) or of strings; an object holding one such array (`{"data": [...]}`); SQuAD's nesting
    (`data[].paragraphs[].context`: the passages). A file of one object a line is JSON Lines
    (`datasets`' `to_json` writes it under `.json`).

    Raises:
        DataError: JSON of another shape (names what was found and the forms read).
    """
    text = read_text_file(path)
    try:
        doc = json.loads(text)
    except ValueError:
        return _read_json_lines(path, column)  # one object a line
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        doc = lists[0] if len(lists) == 1 else doc
    if isinstance(doc, list) and doc and all(isinstance(r, dict) and "paragraphs" in r for r in doc):
        doc = [{"text": p.get("context", "")} for r in doc for p in r["paragraphs"] if isinstance(p, dict)]
    if isinstance(doc, list) and all(isinstance(r, str) for r in doc):
        return list(doc)
    if isinstance(doc, list) and doc and all(isinstance(r, dict) for r in doc):
        name = text_column(doc[0], column)
        if name not in doc[0]:
            raise DataError(f"{path}: no field {column or NAMED!r} in its first object (keys "
                            f"{sorted(doc[0])[:20]}); choose one with --text-column NAME.")
        return [v if isinstance(v, str) else "" if v is None else json.dumps(v) for v in (r.get(name) for r in doc)]
    found = type(doc).__name__ + (f" with keys {sorted(doc)[:10]}" if isinstance(doc, dict) else "")
    raise DataError(f"{path}: a JSON {found}; the texts are read from an array of objects or strings, an object "
                    "holding one such array, SQuAD's data[].paragraphs[].context, or JSON Lines.")


def _read_parquet(path: Path, column: str | None) -> list[str]:
    """The text column of a Parquet file (what the Hugging Face hub serves datasets as), through
    `pyarrow`; a null is an empty text (skipped by `min_words`).

    Raises:
        DataError: `pyarrow` is missing (the fix: install it, or export the column to a TSV or
            JSON Lines file), the file is not Parquet, or it has no such column.
    """
    try:
        import pyarrow.parquet as pq  # optional: only for Parquet input
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs `pip install pyarrow` ({e}); or save the text column "
                        "as a TSV/CSV or JSON Lines file.") from e
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError
        raise DataError(f"{path}: not a readable Parquet file ({e}); re-save it, or pass a text, TSV/CSV "
                        "or JSON Lines file.") from e
    name = text_column(schema.names, column)
    if name not in schema.names:
        raise DataError(f"{path}: no column {column or NAMED!r} in {schema.names[:20]}; choose one "
                        "with --text-column NAME.")
    values = pq.read_table(path, columns=[name]).column(name).to_pylist()
    return [v if isinstance(v, str) else "" if v is None else str(v) for v in values]


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
