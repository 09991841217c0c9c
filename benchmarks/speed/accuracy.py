"""Accuracy beside speed: each backend's outputs against PyTorch FP32 on held-out real text, and
(for MiniLM) SST-2 dev accuracy with a fixed probe.

- Held-out cosine: the pipeline's held-out samples (`calibration.layout.heldout_texts`: the
  `data.samples` samples after the calibration ones, WikiText-2 test by default), each run alone
  at its own length (batch 1, no padding, truncated to `data.max_length`), first output
  (`last_hidden_state`) compared with PyTorch FP32 eager on the CPU over all its positions
  (`compiler.eval.fidelity.sample_fidelity`): cosine min and mean over samples, and the count
  of NaN/Inf values.
- SST-2: a logistic-regression probe (`compiler.eval.task_accuracy.train_probe`) trained once on
  PyTorch FP32's mean-pooled embeddings of the first `train` SST-2 train sentences and kept
  fixed; each backend's dev accuracy with it, so a change comes from its embeddings alone
  (the method of `benchmarks.sst2_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.speed.backends import Feeds, Runner


def heldout_feeds(settings: Any, tokenizer: Any, input_names: list[str]) -> list[Feeds]:
    """One feed dict per held-out sample: (1, length) int64 ids, mask ones, segment ids zero.

    Raises:
        compiler.errors.DataError: the text is missing or holds too few samples.
    """
    from calibration.layout import heldout_texts
    from compiler.quant.calibrate import window_feeds

    out = []
    for text in heldout_texts(settings.data):
        ids = tokenizer(text, truncation=True, max_length=settings.data.max_length)["input_ids"]
        out.append(window_feeds(np.asarray([ids], np.int64), input_names))
    return out


def reference_outputs(runner: Runner, feeds: list[Feeds]) -> list[np.ndarray]:
    """The reference's first output per held-out sample, (1, length, hidden) float32."""
    return [runner.outputs(f) for f in feeds]


def cosine_row(runner: Runner, feeds: list[Feeds], reference: list[np.ndarray]) -> dict[str, Any]:
    """{"cosine_min", "cosine_mean", "nonfinite"} of `runner` against the reference outputs
    (a sample holding a non-finite value scores cosine -1)."""
    from compiler.eval.fidelity import sample_fidelity

    cosines, bad = [], 0
    for f, ref in zip(feeds, reference):
        got = runner.outputs(f)
        cos, nonfinite, _ = sample_fidelity(ref, got, 0, ref.shape[1])
        cosines.append(cos)
        bad += nonfinite
    return {"cosine_min": round(float(min(cosines)), 6), "cosine_mean": round(float(np.mean(cosines)), 6),
            "nonfinite": int(bad), "samples": len(cosines)}


class SessionView:
    """A runner seen as the ONNX Runtime session `compiler.eval.task_accuracy.sentence_embeddings`
    takes: `get_outputs()[0].name` and `run([name], feeds) -> [first output]`."""

    @dataclass
    class _Arg:
        name: str

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def get_inputs(self) -> list[Any]:
        return []

    def get_outputs(self) -> list[Any]:
        return [self._Arg("last_hidden_state")]

    def run(self, names: Any, feeds: Feeds) -> list[np.ndarray]:
        return [self.runner.outputs(feeds)]


@dataclass
class Sst2Probe:
    """The fixed probe (trained on PyTorch FP32 train embeddings) and the dev split."""

    probe: Any
    dev_texts: list[str]
    dev_labels: np.ndarray
    tokenizer: Any
    input_names: list[str]
    fp32_accuracy: float = float("nan")

    @classmethod
    def fit(cls, runner: Runner, tokenizer: Any, input_names: list[str], train: int = 2000) -> "Sst2Probe":
        """Train the probe on `runner`'s (PyTorch FP32) embeddings of the first `train` sentences.

        Raises:
            compiler.errors.DataError: SST-2 is missing. ImportError: scikit-learn is missing.
        """
        from compiler.eval.task_accuracy import load_sst2, sentence_embeddings, train_probe

        texts, labels = load_sst2("train", train)
        dev_texts, dev_labels = load_sst2("dev")
        emb = sentence_embeddings(SessionView(runner), texts, tokenizer, input_names)
        probe = cls(train_probe(emb, labels), dev_texts, dev_labels, tokenizer, input_names)
        probe.fp32_accuracy = probe.accuracy(runner)
        return probe

    def accuracy(self, runner: Runner) -> float:
        """Dev accuracy (0..1, 4 decimals) of the fixed probe on `runner`'s embeddings."""
        from compiler.eval.task_accuracy import nonfinite_rows, probe_accuracy, sentence_embeddings

        emb = sentence_embeddings(SessionView(runner), self.dev_texts, self.tokenizer, self.input_names)
        if nonfinite_rows(emb):
            return float("nan")
        return round(probe_accuracy(self.probe, emb, self.dev_labels), 4)
