"""compiler/deploy/commands.py: the texts `run --text-file` reads, in the formats of `--calib`."""

from __future__ import annotations

import argparse
import json

import pytest

from compiler.deploy.commands import _texts, add_run_arguments
from compiler.errors import CompilerError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(["bundle", *argv])


def test_text_file_in_each_format(tmp_path):
    (tmp_path / "t.txt").write_text("first text\n\n  second text  \n")
    assert _texts(_args("--text-file", str(tmp_path / "t.txt"))) == ["first text", "second text"]
    (tmp_path / "t.tsv").write_text("sentence\tlabel\na good film\t1\n")  # the header is not a text
    assert _texts(_args("--text-file", str(tmp_path / "t.tsv"))) == ["a good film"]
    (tmp_path / "t.jsonl").write_text(json.dumps({"review": "fine, \"really\""}) + "\n")
    assert _texts(_args("--text-file", str(tmp_path / "t.jsonl"), "--text-column", "review")) == ['fine, "really"']


@pytest.mark.parametrize("name, content, match", [
    ("missing.txt", None, "no such file"),
    ("empty.txt", "\n \n", "no text"),
    ("t.csv", "id,body\n1,x\n", "no column 'sentence/text/content.*--text-column"),
])
def test_text_file_errors_name_the_file_and_the_fix(tmp_path, name, content, match):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(CompilerError, match=match):
        _texts(_args("--text-file", str(tmp_path / name)))


def test_no_texts_is_a_clear_error():
    with pytest.raises(CompilerError, match="--text TEXT.*--text-file FILE"):
        _texts(_args())


def test_outputs_too_large_to_hold_are_refused_before_running():
    from compiler.deploy.commands import RUN_OUTPUT_MAX_MIB, _check_output_size

    hidden = [{"name": "last_hidden_state", "shape": [-1, -1, 384]}, {"name": "pooler_output", "shape": [-1, 384]}]
    _check_output_size(hidden, 1000, 128, "t.txt")  # 188 MiB: fine
    with pytest.raises(CompilerError, match=r"100000 texts padded to 512 tokens give 75,146 MiB .* at most 5450 "
                                            r"texts a time \(split t.txt\)"):  # was killed for memory
        _check_output_size(hidden, 100_000, 512, "t.txt")
    assert RUN_OUTPUT_MAX_MIB == 4096


def test_a_manifest_missing_a_key_is_refused_by_name(tmp_path):
    from compiler.deploy.bundle import FORMAT, MANIFEST_KEYS, read_manifest

    manifest = {"format": FORMAT, **{k: {} for k in MANIFEST_KEYS}}
    del manifest["profiles"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CompilerError, match="lacks profiles .*make the bundle again"):  # was exit 3 in run
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(CompilerError, match="format 'list'"):
        read_manifest(tmp_path)
