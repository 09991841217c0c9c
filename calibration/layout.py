"""The text layout of one run: [calibration | held-out | training], never overlapping.

`DataSettings` says where the text lies; this module says which samples each stage reads:

- calibration: the first `calib_samples` samples (activation statistics, INT8 thresholds,
  Wanda's input norms);
- held-out: the next `samples` samples (verification, the `auto` and INT8 budgets, parity);
- training: up to `train_samples` after those, or from `train_path` texts (QAT, 2:4 recovery).

`TokenSets` tokenizes each at most once per run (and caches the result on disk by content hash,
`calibration.text.tokenized_set`).
"""

from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

from calibration.readers import default_text_path, shared_data_path
from calibration.text import TokenizedSet, load_texts, tokenized_set
from calibration.windows import split_windows
from compiler.errors import DataError
from compiler.settings import DataSettings, VocabSettings

log = logging.getLogger(__name__)


def calibration_texts(data: DataSettings) -> list[str]:
    """The first `data.calib_samples` samples of the text.

    Raises:
        DataError: the text is missing or holds fewer samples.
    """
    return load_texts(data, count=data.calib_samples)


def heldout_texts(data: DataSettings) -> list[str]:
    """The `data.samples` samples after the calibration samples.

    Raises:
        DataError: the text is missing or holds fewer samples.
    """
    return load_texts(data, skip=data.calib_samples)


def training_texts(data: DataSettings, batch_size: int, tokenizer: Any = None) -> list[str]:
    """Fine-tuning text: up to `train_samples` from the `data.train_path` texts, or else from the
    verification text after its calibration and held-out samples (see `DataSettings`).

    With several texts each gives an even share of `train_samples` (the first ones one more when
    it does not divide), and their samples are interleaved: a, b, a, b, ... A text that is the
    verification text itself is read after its calibration and held-out samples.

    Args:
        data: the data settings.
        batch_size: training batch size (`TrainSettings.batch_size`): the least samples accepted.

    Returns:
        Stripped strings, at most `train_samples`.

    Raises:
        DataError: a text is missing, or gives fewer samples than one training batch in all.
        ValueError: `data.train_windows` without a tokenizer.
    """
    if data.train_windows and tokenizer is None:
        raise ValueError("training_texts: train_windows needs the tokenizer")
    held_out = data.calib_samples + data.samples
    if not data.train_path:
        sources = [(data, held_out, data.train_samples)]
    else:
        n = len(data.train_path)
        shares = [data.train_samples // n + (i < data.train_samples % n) for i in range(n)]
        sources = [(replace(data, path=p), held_out if is_verification_text(p, data.path) else 0, share)
                   for p, share in zip(data.train_path, shares)]
    parts = []
    for source, skip, share in sources:
        if data.train_windows:  # the lines after `skip`, split, until the share of windows is full
            lines, texts = load_texts(source, count=sys.maxsize, skip=skip, minimum=1), []
            for i in range(0, len(lines), share):
                texts += split_windows(lines[i:i + share], tokenizer, data.max_length, data.min_words)
                if len(texts) >= share:
                    break
            texts = texts[:share]
        else:
            texts = load_texts(source, count=share, skip=skip, minimum=1)
        if len(texts) < share:
            log.warning("fine-tuning text %s: %d samples available, fewer than its share of %d (train_samples=%d)",
                        source.path or "default text", len(texts), share, data.train_samples)
        parts.append(texts)
    texts = [t for group in itertools.zip_longest(*parts) for t in group if t is not None]
    if len(texts) < batch_size:
        raise DataError(f"fine-tuning text: {len(texts)} samples in all, need {batch_size} (one "
                        "batch). Give a longer --train-text or a smaller --batch-size.")
    return texts


RECOVERY_MIX = ("sst2/train.tsv", "wikitext-2/test.txt", "wikitext-2/valid.txt")  # under shared/data


def recovery_data(data: DataSettings, samples: int) -> DataSettings:
    """The data settings of 2:4 recovery: `data` with the default recovery text when it applies.

    With no `data.train_path` given and the default verification text (`data.path` None), the
    recovery trains on `samples` samples of `RECOVERY_MIX` in even shares, interleaved: SST-2
    train sentences, WikiText-2 test after its calibration and held-out samples, WikiText-2
    valid. More and more varied text than the rest of WikiText-2 test alone (~2,000 samples),
    which long recoveries overfit: on MiniLM (Wanda) WikiText-2's rest gave held-out cosine
    mean 0.962 and SST-2 dev accuracy -3.21 points after 2,000 steps, the mix 0.967 and +0.34
    after 5,000 (docs/sparsity.md). Long lines are truncated, not windowed
    (`DataSettings.train_windows` off): all the windows of WikiText-2's lines, 1.44x its text,
    did not raise the held-out cosine at equal steps (docs/sparsity.md). Where any of the three
    files is missing, or a text was given, `data` is returned unchanged (fine-tuning as for
    QAT, `training_texts`).
    """
    if data.train_path or data.path is not None:
        return data
    paths = [shared_data_path(p) for p in RECOVERY_MIX]
    if any(p is None for p in paths):
        return data
    if samples < len(paths):
        from compiler.errors import DataError

        raise DataError(f"--recover-samples {samples}: the default recovery text mixes {len(paths)} files in even "
                        f"shares; pass --recover-samples {len(paths)} or more (default 6144)")
    return replace(data, train_path=tuple(str(p) for p in paths), train_samples=samples)


def vocabulary_texts(vocab: VocabSettings, data: DataSettings) -> list[str]:
    """Every line (sample) of the domain texts `vocab.texts`, whole, in order: vocabulary pruning
    counts tokens over all of them (no `min_words` filter: short lines count too).

    Raises:
        DataError: a text is missing or holds no sample.
    """
    texts: list[str] = []
    for path in vocab.texts:
        texts += load_texts(replace(data, path=path, min_words=1), count=1 << 30, minimum=1)
    return texts


def is_verification_text(path: str, verification: str | None) -> bool:
    """Whether fine-tuning text `path` is the verification text (`None`: the default WikiText-2)."""
    ref = Path(verification) if verification is not None else default_text_path()
    return ref is not None and Path(path).resolve() == ref.resolve()


class TokenSets:
    """The run's token sets, each read and tokenized at most once, when first asked for.

    Args:
        data: the data settings (`cache_dir` holds the tokenized sets).
        tokenizer: the model's Hugging Face tokenizer.
        train_batch_size: the least training samples accepted (`TrainSettings.batch_size`).
        heldout: the held-out texts when already read (the export stage reads them first).
    """

    def __init__(self, data: DataSettings, tokenizer: Any, train_batch_size: int,
                 heldout: list[str] | None = None) -> None:
        self.data, self.tokenizer, self.train_batch_size = data, tokenizer, train_batch_size
        if heldout is not None:
            self.__dict__["heldout_texts"] = heldout

    def _tokens(self, texts: list[str]) -> TokenizedSet:
        return tokenized_set(texts, self.tokenizer, self.data.max_length, self.data.cache_dir)

    @cached_property
    def heldout_texts(self) -> list[str]:
        return heldout_texts(self.data)

    @cached_property
    def calibration_texts(self) -> list[str]:
        return calibration_texts(self.data)

    @cached_property
    def training_texts(self) -> list[str]:
        return training_texts(self.data, self.train_batch_size, self.tokenizer)

    @cached_property
    def heldout(self) -> TokenizedSet:
        """Held-out samples, tokenized: (samples,) ragged int64 ids, at most `max_length` each."""
        return self._tokens(self.heldout_texts)

    @cached_property
    def calibration(self) -> TokenizedSet:
        """Calibration samples, tokenized."""
        return self._tokens(self.calibration_texts)

    @cached_property
    def training(self) -> TokenizedSet:
        """Fine-tuning samples, tokenized."""
        return self._tokens(self.training_texts)
