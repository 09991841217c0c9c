"""One tiny bundle per test session (tiny random BERT, hybrid), made through the CLI as a user would.

The bundle's profile is small (max 4x16) so that a request past it is easy to make. Tests that
change a bundle work on a copy (`bundle_copy`)."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest

PROFILE_MAX = (4, 16)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from tests.models import minilm_tokenizer

    path = tmp_path_factory.mktemp("deploy-tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522)).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """(bundle folder, what `python -m compiler bundle` printed)."""
    from compiler.cli import main

    out = tmp_path_factory.mktemp("deploy-engines")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["-q", "bundle", "--model", str(tiny_checkpoint), "--precision", "hybrid", "--samples", "4",
                     "--calib-samples", "4", "--max-length", "16", "--batch-size", "4", "--output-dir", str(out),
                     "--min-shape", "1x1", "--opt-shape", "2x8", "--max-shape", f"{PROFILE_MAX[0]}x{PROFILE_MAX[1]}"])
    assert code == 0, printed.getvalue()
    bundles = list(out.rglob("bundle"))
    assert len(bundles) == 1, bundles
    return bundles[0], printed.getvalue()


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A copy of the session's bundle that a test may change."""
    return Path(shutil.copytree(tiny_bundle[0], tmp_path / "bundle"))
