"""compiler/training/tokenizers.py: the checkpoint's tokenizer, and why one cannot load."""

from __future__ import annotations

import pytest

from compiler.errors import UnknownModelError
from compiler.settings import ModelSettings
from compiler.training.models import load_model
from compiler.training.tokenizers import minilm_dir, sentencepiece_problem
from tests.models import minilm_tokenizer, tiny_bert


def save(module, directory):
    module.save_pretrained(directory)
    minilm_tokenizer().save_pretrained(directory)
    return str(directory)


def test_a_sentencepiece_tokenizer_that_cannot_load_here_says_why(tmp_path, monkeypatch):
    import importlib.util

    from compiler.training import tokenizers

    path = save(tiny_bert(), tmp_path / "spm")
    for name in ("tokenizer.json", "vocab.txt"):
        (tmp_path / "spm" / name).unlink(missing_ok=True)
    (tmp_path / "spm" / "spiece.model").write_bytes(b"\x00" * 64)
    (tmp_path / "spm" / "tokenizer_config.json").write_text('{"tokenizer_class": "AlbertTokenizer"}')
    real = importlib.util.find_spec
    monkeypatch.setattr(tokenizers, "find_spec", lambda n: None if n == "sentencepiece" else real(n))
    with pytest.raises(UnknownModelError, match=r"SentencePiece model \(spiece.model\) without tokenizer.json.*"
                                                r"pip install sentencepiece"):  # was: "`tiktoken` is required"
        load_model(ModelSettings(name=path))


def test_no_sentencepiece_problem_where_a_fast_tokenizer_or_no_model_file_is_there(tmp_path):
    assert sentencepiece_problem(minilm_dir()) is None  # tokenizer.json
    assert sentencepiece_problem(tmp_path) is None  # no *.model
    assert sentencepiece_problem("bert-base-uncased") is None  # a hub id: no folder to look in
