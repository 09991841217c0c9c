"""calibration/text.py: reading real text, tokenizing with a content-hash cache, batching."""

from __future__ import annotations

import os

import numpy as np
import pytest

from calibration import default_text_path, load_texts, tokenized_set
from calibration.text import TokenizedSet
from compiler.errors import DataError
from compiler.settings import DataSettings, ModelSettings
from compiler.training.models import load_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(ModelSettings(name="minilm")).tokenizer


class CountingTokenizer:
    """A tokenizer that counts its calls: a cache hit must not tokenize again."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.pad_token_id = inner.pad_token_id

    def get_vocab(self):
        return self.inner.get_vocab()

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_wikitext_default_skips_short_lines():
    assert default_text_path() is not None
    texts = load_texts(DataSettings(samples=20))
    assert len(texts) == 20 and all(len(t.split()) >= 8 for t in texts)
    held_out = load_texts(DataSettings(samples=5), skip=20)
    assert not set(held_out) & set(texts)
    assert load_texts(DataSettings(samples=25))[20:] == held_out  # skip counts kept samples


def test_tsv_column(tmp_path):
    sst2 = default_text_path().parent.parent / "sst2" / "dev.tsv"
    texts = load_texts(DataSettings(path=str(sst2), samples=10, min_words=1))
    assert texts[0].startswith("it 's a charming and often affecting journey")
    with pytest.raises(DataError, match="--text-column"):
        load_texts(DataSettings(path=str(sst2), text_column="review", samples=10))


def test_csv_named_column_and_min_words(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("id,body\n1,one two three\n2,a b\n3,four five six seven\n")
    data = DataSettings(path=str(table), text_column="body", samples=2, min_words=3)
    assert load_texts(data) == ["one two three", "four five six seven"]  # "a b" has 2 words
    with pytest.raises(DataError, match="no column"):
        load_texts(DataSettings(path=str(table), samples=1, min_words=1))  # no sentence/text column


def test_csv_quoted_fields_keep_their_commas_quotes_and_newlines(tmp_path):
    import csv

    texts = ['a sentence, with a comma in it', 'she said "no" and left the room',
             'two lines\nin one field of the table', 'plain words without any quoting at all']
    table = tmp_path / "t.csv"
    with open(table, "w", newline="") as f:  # as Python's csv (and pandas) write a table
        csv.writer(f).writerows([["id", "text", "label"], *[[i, t, 1] for i, t in enumerate(texts)]])
    assert load_texts(DataSettings(path=str(table), samples=4, min_words=1)) == texts


def test_tsv_quote_characters_are_text(tmp_path):
    table = tmp_path / "t.tsv"  # GLUE's TSVs: an opening quote is part of the sentence
    table.write_text('sentence\tlabel\n"the film opens\t1\nwell , " it says\t0\n')
    assert load_texts(DataSettings(path=str(table), samples=2, min_words=1)) == ['"the film opens', 'well , " it says']


def test_json_lines_text_field(tmp_path):
    import json

    rows = [{"id": 1, "text": "a sentence, with \"quotes\" and a comma", "label": 0},
            {"id": 2, "text": None}, {"id": 3}, {"id": 4, "text": "line two\nof one sample", "label": 1}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line at the end
    assert load_texts(DataSettings(path=str(path), samples=2, min_words=1)) == [rows[0]["text"], rows[3]["text"]]
    (tmp_path / "r.ndjson").write_text('{"review": "good film overall", "text": "x"}\n')
    data = DataSettings(path=str(tmp_path / "r.ndjson"), text_column="review", samples=1, min_words=1)
    assert load_texts(data) == ["good film overall"]


def test_a_json_file_in_each_form(tmp_path):
    """`.json` was read as plain text: a JSON array came back as one "sample" of JSON syntax."""
    import json

    forms = {
        "array.json": [{"text": "first text here"}, {"text": "second text here"}],
        "strings.json": ["first text here", "second text here"],
        "wrapped.json": {"version": 2, "data": [{"text": "first text here"}, {"text": "second text here"}]},
        "squad.json": {"data": [{"title": "t", "paragraphs": [{"context": "first text here", "qas": []},
                                                              {"context": "second text here", "qas": []}]}]},
    }
    for name, doc in forms.items():
        (tmp_path / name).write_text(json.dumps(doc))
        assert load_texts(DataSettings(path=str(tmp_path / name), samples=2, min_words=1)) == [
            "first text here", "second text here"], name
    (tmp_path / "lines.json").write_text('{"text": "first text here"}\n{"text": "second text here"}\n')  # to_json
    assert len(load_texts(DataSettings(path=str(tmp_path / "lines.json"), samples=2, min_words=1))) == 2
    (tmp_path / "odd.json").write_text('{"a": 1, "b": 2}')
    with pytest.raises(DataError, match=r"a JSON dict with keys \['a', 'b'\]; the texts are read from"):
        load_texts(DataSettings(path=str(tmp_path / "odd.json"), samples=1, min_words=1))


def test_compressed_files_read_as_their_inner_format(tmp_path):
    import bz2
    import gzip

    (tmp_path / "t.tsv.gz").write_bytes(gzip.compress(b"sentence\tlabel\na good film indeed\t1\n"))
    assert load_texts(DataSettings(path=str(tmp_path / "t.tsv.gz"), samples=1, min_words=1)) == ["a good film indeed"]
    (tmp_path / "t.txt.bz2").write_bytes(bz2.compress("one line of text\n".encode()))  # was "not a text file"
    assert load_texts(DataSettings(path=str(tmp_path / "t.txt.bz2"), samples=1, min_words=1)) == ["one line of text"]
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip file"):
        load_texts(DataSettings(path=str(tmp_path / "bad.txt.gz"), samples=1, min_words=1))


def test_a_csv_without_a_header_by_column_number(tmp_path):
    path = tmp_path / "ag_news.csv"  # AG News: class, title, description; no header
    path.write_text('3,"Wall St. Bears Claw Back","Short-sellers, Wall Street\'s band, see green again."\n'
                    '4,"Carlyle Looks Toward Aerospace","Private investment firm Carlyle Group."\n')
    data = DataSettings(path=str(path), text_column="3", samples=2, min_words=1)
    assert load_texts(data) == ["Short-sellers, Wall Street's band, see green again.",
                                "Private investment firm Carlyle Group."]  # the first line is a row too
    with pytest.raises(DataError, match="the column's number, from 1"):
        load_texts(DataSettings(path=str(path), samples=2, min_words=1))
    with pytest.raises(DataError, match="--text-column 9: its first line has 3 column"):
        load_texts(DataSettings(path=str(path), text_column="9", samples=2, min_words=1))


@pytest.mark.parametrize("content, match", [
    ('{"text": "fine"}\n{"text": broken\n', "line 2: not JSON"),
    ('["a list", "not an object"]\n', "line 1: a JSON list, not an object"),
    ('{"body": "no text field"}\n', r"no field 'sentence/text/content/.*'.*\['body'\].*--text-column"),
])
def test_json_lines_errors_name_the_line_and_the_fix(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_texts(DataSettings(path=str(path), samples=1, min_words=1))
    with pytest.raises(DataError, match="no such file"):  # a missing .jsonl is a file, not a dataset id
        load_texts(DataSettings(path="missing.jsonl", samples=1))


def test_missing_file_and_too_few_samples(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_texts(DataSettings(path=str(tmp_path / "nope.txt")))
    small = tmp_path / "small.txt"
    small.write_text("one two three four five six seven eight\nshort\n")
    with pytest.raises(DataError, match="found 1 samples"):
        load_texts(DataSettings(path=str(small), samples=2))
    assert load_texts(DataSettings(path=str(small), samples=2), minimum=1) == [
        "one two three four five six seven eight"]


def test_text_without_spaces_counts_a_word_a_character(tmp_path):
    """Chinese or Japanese lines have no spaces: each ideograph or kana is a word (as BERT's
    tokenizer splits them), so `min_words` does not drop every line of such a file."""
    from calibration.text import word_count

    assert word_count("the quick  brown fox") == 4 and word_count("") == 0
    assert word_count("这是一个测试") == 6 and word_count("これはテスト") == 6
    assert word_count("Hello 世界 ok") == 4 and word_count("한국어 문장") == 2  # Hangul is spaced
    text = tmp_path / "zh.txt"
    text.write_text("这是一个用于校准模型精度的测试句子\n太短了\n", encoding="utf-8")
    assert load_texts(DataSettings(path=str(text), samples=1)) == ["这是一个用于校准模型精度的测试句子"]
    with pytest.raises(DataError, match=r"of the file's 2 lines or rows, 1 are long enough"):
        load_texts(DataSettings(path=str(text), samples=2))


def test_parquet_text_column(tmp_path, monkeypatch):
    """A Parquet file (the hub's dataset format) is read through pyarrow: its `sentence`/`text`
    column or --text-column; without pyarrow, or with no such column, a DataError says the fix."""
    import sys

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"idx": [0, 1, 2], "sentence": ["one two three four", None, "five six seven eight"]}), path)
    assert load_texts(DataSettings(path=str(path), samples=2, min_words=4)) == ["one two three four",
                                                                                "five six seven eight"]
    with pytest.raises(DataError, match=r"no column 'review' .*--text-column"):
        load_texts(DataSettings(path=str(path), text_column="review", samples=1, min_words=1))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_texts(DataSettings(path=str(tmp_path / "bad.parquet"), samples=1, min_words=1))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as where pyarrow is not installed
    with pytest.raises(DataError, match=r"pip install pyarrow.*TSV/CSV or JSON Lines"):
        load_texts(DataSettings(path=str(path), samples=1, min_words=1))


def test_tokenized_set_cache_reused_and_keyed(tmp_path, tokenizer):
    texts = load_texts(DataSettings(samples=10))
    counting = CountingTokenizer(tokenizer)
    first = tokenized_set(texts, counting, 32, tmp_path)
    assert counting.calls == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    again = tokenized_set(texts, counting, 32, tmp_path)
    assert counting.calls == 1  # read back from the cache, not tokenized again
    assert again.key == first.key
    assert all(np.array_equal(a, b) for a, b in zip(first.input_ids, again.input_ids, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(first.token_type_ids, again.token_type_ids, strict=True))
    direct = tokenizer(texts, truncation=True, max_length=32)["input_ids"]
    assert [list(x) for x in again.input_ids] == direct  # the reference: the tokenizer itself
    other = tokenized_set(texts, counting, 16, tmp_path)  # changed input -> new key, a second file
    assert counting.calls == 2 and other.key != first.key and len(list(tmp_path.glob("*.npz"))) == 2
    assert max(len(x) for x in other.input_ids) == 16
    uncached = tokenized_set(texts, counting, 32, None)
    assert counting.calls == 3 and uncached.key == first.key


def test_batches_pad_mask_and_random_ids():
    tokens = TokenizedSet([np.array([5, 6, 7]), np.array([8])], [np.array([0, 0, 1]), np.array([1])], 0, "k")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    (feeds, lengths), = list(tokens.batches(4, names))
    np.testing.assert_array_equal(feeds["input_ids"], [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(feeds["attention_mask"], [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(feeds["token_type_ids"], [[0, 0, 1], [1, 0, 0]])
    np.testing.assert_array_equal(lengths, [3, 1])
    assert [len(l) for _, l in tokens.batches(1, names)] == [1, 1]  # one sample a batch
    rng = np.random.default_rng(0)
    (rand, _), = list(tokens.batches(4, names, rng=rng, vocab_size=1000))
    np.testing.assert_array_equal(rand["attention_mask"], feeds["attention_mask"])
    np.testing.assert_array_equal(rand["input_ids"][rand["attention_mask"] == 0], [0, 0])  # padding kept
    expected = np.random.default_rng(0)
    np.testing.assert_array_equal(rand["input_ids"][0], expected.integers(0, 1000, 3))
    with pytest.raises(DataError, match="cannot be filled"):
        next(tokens.batches(1, ["pixel_values"]))


def test_batches_by_length_pad_less_and_keep_each_samples_ids():
    lengths = (3, 9, 2, 8, 3, 9)
    tokens = TokenizedSet([np.arange(1, n + 1) * (i + 1) for i, n in enumerate(lengths)], None, 0, "k")
    names = ["input_ids", "attention_mask"]

    def rows(batches):
        return sorted(tuple(f["input_ids"][k, :n]) for f, ls in batches for k, n in enumerate(ls))

    plain, longest = list(tokens.batches(2, names)), list(tokens.batches(2, names, by_length=True))
    assert rows(plain) == rows(longest)  # the same samples, unpadded ids unchanged
    assert [list(ls) for _, ls in longest] == [[9, 9], [8, 3], [3, 2]]  # stable: equal lengths keep set order
    assert sum(f["input_ids"].size for f, _ in longest) < sum(f["input_ids"].size for f, _ in plain)
    # random ids are drawn per sample in the set's order, whatever the batching
    rand = [list(tokens.batches(2, names, rng=np.random.default_rng(5), vocab_size=99, by_length=b)) for b in (0, 1)]
    assert rows(rand[0]) == rows(rand[1])


LATIN = "un café très bon, à deux pas de la gare, où l'on mange bien"  # é è à ù: not ASCII


@pytest.mark.parametrize("name, header", [("latin.tsv", "sentence\tlabel\n"), ("latin.csv", "text,label\n"),
                                          ("latin.txt", "")])
def test_latin1_file_is_read_with_a_warning(tmp_path, caplog, name, header):
    sep = "" if not header else ("\t1" if name.endswith(".tsv") else ",1")
    path = tmp_path / name
    path.write_bytes((header + f"{LATIN.replace(',', ';')}{sep}\n" * 3).encode("cp1252"))
    with caplog.at_level("WARNING", logger="calibration.text"):
        texts = load_texts(DataSettings(path=str(path), samples=3, min_words=1))
    assert texts == [LATIN.replace(",", ";")] * 3  # the reference: the string before encoding
    warning, = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(path) in warning and "not UTF-8" in warning and "cp1252" in warning


def test_utf8_with_a_stray_byte_keeps_utf8_and_warns(tmp_path, caplog):
    path = tmp_path / "mixed.txt"
    path.write_bytes("naïve café ok\n".encode() + b"bad \xff byte here\n")
    with caplog.at_level("WARNING", logger="calibration.text"):
        texts = load_texts(DataSettings(path=str(path), samples=2, min_words=1))
    assert texts == ["naïve café ok", "bad \ufffd byte here"]  # not mojibake: UTF-8 kept
    assert any(str(path) in r.getMessage() and "1 invalid" in r.getMessage() for r in caplog.records)


def test_utf8_and_utf16_bom_files_read_without_warning(tmp_path, caplog):
    (tmp_path / "bom.tsv").write_bytes(("sentence\tlabel\n" + LATIN + "\t1\n").encode("utf-8-sig"))
    (tmp_path / "excel.tsv").write_bytes(("sentence\tlabel\n" + LATIN + "\t1\n").encode("utf-16"))
    with caplog.at_level("WARNING", logger="calibration.text"):
        for name in ("bom.tsv", "excel.tsv"):  # the BOM must not hide the `sentence` column
            assert load_texts(DataSettings(path=str(tmp_path / name), samples=1, min_words=1)) == [LATIN]
    assert not caplog.records


def test_tsv_field_over_csv_default_limit(tmp_path):
    import csv

    long = " ".join(["word"] * 40_000)  # 199,999 characters > csv's default 131,072
    path = tmp_path / "long.tsv"
    path.write_text(f"sentence\tlabel\n{long}\t1\nshort one\t0\n")
    limit = csv.field_size_limit()
    assert load_texts(DataSettings(path=str(path), samples=2, min_words=1)) == [long, "short one"]
    assert csv.field_size_limit() == limit  # the module-wide limit is restored


@pytest.mark.parametrize("content", [
    b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4,  # an executable's start
    b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64,  # a .safetensors header
    bytes(range(1, 32)) * 40,  # control bytes, no NUL
], ids=["elf", "safetensors", "controls"])
def test_binary_file_is_refused(tmp_path, content):
    path = tmp_path / "model.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"is not a text file \(.*binary\): pass a text file") as err:
        load_texts(DataSettings(path=str(path), samples=1, min_words=1))
    assert str(path) in str(err.value)
    table = tmp_path / "model.tsv"
    table.write_bytes(content)
    with pytest.raises(DataError, match="is not a text file"):
        load_texts(DataSettings(path=str(table), samples=1, min_words=1))


def test_directory_is_refused(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_texts(DataSettings(path=str(tmp_path), samples=1))


def test_a_device_or_pipe_is_refused_as_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in ("/dev/null", str(fifo)):  # was "no such file" for a file that exists
        with pytest.raises(DataError, match="is not a regular file .*write the text to a file"):
            load_texts(DataSettings(path=path, samples=1))


def test_too_few_samples_suggests_only_flags_that_exist(tmp_path):
    import re

    from compiler.cli import build_parser

    small = tmp_path / "small.txt"
    small.write_text("one two\n")
    with pytest.raises(DataError) as err:
        load_texts(DataSettings(path=str(small), samples=2))
    suggested = set(re.findall(r"--[a-z][a-z-]+", str(err.value)))
    compile_parser = build_parser()._subparsers._group_actions[0].choices["compile"]
    known = {s for a in compile_parser._actions for s in a.option_strings}
    assert suggested >= {"--min-words", "--samples"} and suggested <= known


def test_a_large_corpus_is_word_counted_only_as_far_as_the_samples_wanted(tmp_path, monkeypatch):
    import calibration.text as text

    big = tmp_path / "corpus.txt"
    big.write_text("".join(f"line {i} has a few more words in it\n" for i in range(20000)))
    calls = []
    counted = text.word_count
    monkeypatch.setattr(text, "word_count", lambda t: calls.append(t) or counted(t))
    picked = load_texts(DataSettings(path=str(big), min_words=3), count=4, skip=2)
    assert picked[0].startswith("line 2 ") and len(picked) == 4 and len(calls) == 6  # was 20000
    with pytest.raises(DataError, match="of the file's 20000 lines or rows, 0 are long enough"):
        load_texts(DataSettings(path=str(big), min_words=50), count=4)  # too few: the message still counts all


def test_a_text_column_on_a_plain_text_file_is_named_as_without_effect(tmp_path, caplog):
    path = tmp_path / "plain.txt"
    path.write_text("one line of text\n")
    assert load_texts(DataSettings(path=str(path), text_column="review", samples=1, min_words=1)) == ["one line of text"]
    assert "--text-column review has no effect on a plain text file" in caplog.text  # was ignored without a word


@pytest.mark.parametrize("name, body, column", [
    ("c.jsonl", '{"id": 1, "content": "crawled text of four words"}\n', "content"),
    ("p.tsv", "sentence1\tsentence2\tlabel\nthe first of a pair here\tthe second\t1\n", "sentence1"),
    ("n.csv", "premise,hypothesis\nthe premise has five words,a hypothesis\n", "premise"),
    ("q.jsonl", '{"question": "what is in the question here", "answers": []}\n', "question"),
])
def test_the_usual_text_columns_of_other_datasets_are_found(tmp_path, caplog, name, body, column):
    """A JSON Lines file with `content` (crawled corpora), GLUE/MNLI pairs and SQuAD-style
    questions were refused ("no field 'sentence/text'"); they are read, the column logged."""
    path = tmp_path / name
    path.write_text(body)
    with caplog.at_level("INFO", logger="calibration.readers"):
        texts = load_texts(DataSettings(path=str(path), samples=1, min_words=1))
    assert len(texts) == 1 and texts[0].split()[0] in ("crawled", "the", "what")
    assert f"text column {column!r}" in caplog.text


def test_a_csv_with_semicolons_reads_its_columns(tmp_path):
    """A CSV saved with a European locale's list separator was one column ("sentence;label")."""
    path = tmp_path / "semi.csv"
    path.write_text('sentence;label\n"the first; sentence here";1\nanother sentence, with a comma;0\n')
    assert load_texts(DataSettings(path=str(path), samples=2, min_words=1)) == [
        "the first; sentence here", "another sentence, with a comma"]
    assert load_texts(DataSettings(path=str(path), samples=2, min_words=1, text_column="1")) == [
        "sentence", "the first; sentence here"]  # no header: the first line is a row
