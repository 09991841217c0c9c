"""Task accuracy (beside the verify stage, for `benchmarks.sst2_probe`), measured with a linear probe on SST-2.

Cosine similarity against FP32 (`compiler.eval.verify`) says how far a variant's outputs
moved; this module says whether the move matters for a downstream task. Sentence
embeddings (the first output, `last_hidden_state`, mean-pooled over valid tokens) of
SST-2 sentences train a logistic regression probe on the FP32 graph; the same fixed
probe then scores each variant's dev-set embeddings, so an accuracy change is due to
the variant's embeddings alone.

Graphs holding FP16 tensors run on the faithful FP16 reference
(`compiler.eval.fp16_reference`), as in the verifier: ONNX Runtime's CPU provider would
compute their FP16 chains in FP32 and hide any overflow. FP32 and INT8 Q/DQ graphs run
on ONNX Runtime's CPU provider, graph optimizations on.

scikit-learn is needed only by `train_probe` and is imported there.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from calibration.readers import read_text_file
from compiler.errors import DataError

log = logging.getLogger(__name__)

SST2_SPLITS = ("train", "dev")
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# --------------------------------------------------------------------------------------
# Sessions and embeddings


def embedding_session(model: Any,
                      faithful_fp16: bool | None = None) -> tuple[Any, bool]:
    """An ONNX Runtime CPU session that computes `model` as the verifier does.

    Args:
        model: onnx.ModelProto, or a path to an ONNX file (read by ONNX Runtime itself
            when the graph has no FP16 tensor; loaded, with its external data, to build
            the FP16 emulation graph otherwise).
        faithful_fp16: True runs the faithful FP16 reference (`fp16_emulation`, graph
            optimizations off); False runs the graph as it is (optimizations on); None
            (auto) is True exactly when the graph has FP16 tensors (`has_fp16`).

    Returns:
        (session, faithful): the session and whether it is the FP16 reference.

    Raises:
        InvalidOnnxError: `model` is a path that is not a readable ONNX file.
    """
    import onnx

    from compiler.eval.fp16_reference import fp16_emulation, has_fp16, session
    from compiler.graph.onnx_io import load_onnx

    is_path = isinstance(model, (str, os.PathLike))
    if is_path and not Path(model).is_file():
        load_onnx(model, check=False)  # raises InvalidOnnxError with the next step
    if faithful_fp16 is None:
        light = onnx.load(str(model), load_external_data=False) if is_path else model
        faithful_fp16 = has_fp16(light)
        del light
    if not faithful_fp16:
        return session(str(model) if is_path else model, faithful_fp16=False), False
    full = load_onnx(model, check=False) if is_path else model
    # From a path the loaded copy is ours: the session may take its weights (no copy).
    return session(fp16_emulation(full), faithful_fp16=True, consume=is_path), True


def _is_session(obj: Any) -> bool:
    return hasattr(obj, "run") and hasattr(obj, "get_inputs")


def sentence_embeddings(model: Any, texts: Sequence[str], tokenizer: Any,
                        input_names: Sequence[str], max_length: int = 128,
                        batch_size: int = 32,
                        faithful_fp16: bool | None = None) -> np.ndarray:
    """Mean-pooled sentence embeddings of `texts` from an ONNX graph's first output.

    Texts are tokenized (truncated to `max_length` tokens, special tokens added), sorted
    by length and run in batches of `batch_size`, each padded to its longest sample (the
    tokenizer's pad id, attention mask 0 there), then returned in input order. The first
    graph output (`last_hidden_state`, (batch, sequence, hidden)) is averaged over each
    sample's valid tokens (accumulated in float64).

    Args:
        model: onnx.ModelProto, a path to an ONNX file, or a session made by
            `embedding_session` (reused as it is; `faithful_fp16` is then ignored).
        texts: N strings.
        tokenizer: a transformers tokenizer matching the graph's vocabulary.
        input_names: graph inputs to feed, each (batch, sequence) int64; any of
            `input_ids`, `attention_mask`, `token_type_ids` (zeros when the tokenizer
            gives none).
        max_length: tokens per text after truncation.
        batch_size: texts per run.
        faithful_fp16: see `embedding_session` (None: the FP16 reference when the graph
            holds FP16 tensors).

    Returns:
        (N, hidden) float32 array; row i is texts[i]'s embedding. Non-finite values of
        the graph (an FP16 overflow) are kept, not hidden. N == 0 gives a (0, 0) array.

    Raises:
        DataError: an input name cannot be filled from text.
        ValueError: the first output is not (batch, sequence, hidden); batch_size < 1.
        InvalidOnnxError: `model` is a path that is not a readable ONNX file.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need >= 1")
    unknown = [n for n in input_names if n not in _TEXT_INPUTS]
    if unknown:
        raise DataError(f"graph inputs {unknown} cannot be filled from text; "
                        f"known: {list(_TEXT_INPUTS)}")
    texts = list(texts)
    if not texts:
        return np.zeros((0, 0), np.float32)
    sess = model if _is_session(model) else embedding_session(model, faithful_fp16)[0]
    output = sess.get_outputs()[0].name
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    ids = [np.asarray(x, np.int64) for x in enc["input_ids"]]
    types = None
    if "token_type_ids" in enc:
        types = [np.asarray(x, np.int64) for x in enc["token_type_ids"]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = np.argsort([len(x) for x in ids], kind="stable")
    result: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        seq = max(len(ids[i]) for i in rows)
        feeds = {"input_ids": np.full((len(rows), seq), pad_id, np.int64),
                 "attention_mask": np.zeros((len(rows), seq), np.int64),
                 "token_type_ids": np.zeros((len(rows), seq), np.int64)}
        for k, i in enumerate(rows):
            n = len(ids[i])
            feeds["input_ids"][k, :n] = ids[i]
            feeds["attention_mask"][k, :n] = 1
            if types is not None:
                feeds["token_type_ids"][k, :n] = types[i]
        (hidden,) = sess.run([output], {n: feeds[n] for n in input_names})
        if hidden.ndim != 3 or hidden.shape[:2] != (len(rows), seq):
            raise ValueError(f"first output {output!r} has shape {hidden.shape}; "
                             f"expected (batch={len(rows)}, sequence={seq}, hidden)")
        mask = feeds["attention_mask"][:, :, None].astype(np.float64)
        total = (hidden.astype(np.float64) * mask).sum(axis=1)
        pooled = total / np.maximum(mask.sum(axis=1), 1.0)
        if result is None:
            result = np.empty((len(texts), hidden.shape[2]), np.float32)
        result[rows] = pooled
    assert result is not None
    return result


# --------------------------------------------------------------------------------------
# SST-2


def default_sst2_dir() -> Path | None:
    """`shared/data/sst2` beside the checkout or the cwd, or None."""
    from calibration.readers import shared_data_path

    return shared_data_path("sst2")


def load_sst2(split: str, count: int | None = None,
              path: str | os.PathLike | None = None) -> tuple[list[str], np.ndarray]:
    """Sentences and labels of SST-2 (GLUE), in file order.

    Args:
        split: `train` (67,349 rows) or `dev` (872 rows).
        count: the first `count` rows; None for all.
        path: a folder holding `<split>.tsv`, or the TSV file itself; None:
            `../shared/data/sst2`.

    Returns:
        (texts, labels): N stripped strings and an (N,) int64 array, 0 negative and
        1 positive.

    Raises:
        DataError: unknown split, missing file, no `sentence`/`label` columns, a label
            outside {0, 1}, or fewer than `count` rows.
    """
    if split not in SST2_SPLITS:
        raise DataError(f"SST-2 split {split!r}: expected one of {SST2_SPLITS}")
    if count is not None and count < 0:
        raise DataError(f"count={count}: need >= 0")
    if path is None:
        folder = default_sst2_dir()
        if folder is None:
            raise DataError("SST-2 not found: expected ../shared/data/sst2/"
                            "{train,dev}.tsv beside the checkout (see "
                            "../shared/data/README.md); pass the folder or the TSV "
                            "file with path=.")
        file = folder / f"{split}.tsv"
    else:
        file = Path(path)
        if file.is_dir():
            file = file / f"{split}.tsv"
    if not file.is_file():
        raise DataError(f"{file}: no such SST-2 file (header `sentence<TAB>label`). "
                        "Pass the folder holding train.tsv/dev.tsv, or the TSV.")
    texts: list[str] = []
    labels: list[int] = []
    # the project's one text reader: UTF-8/UTF-16/cp1252 with a warning, binary refused
    with io.StringIO(read_text_file(file), newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        fields = reader.fieldnames or []
        if "sentence" not in fields or "label" not in fields:
            raise DataError(f"{file}: header {fields} lacks `sentence` and `label`")
        for line, row in enumerate(reader, start=2):
            if count is not None and len(texts) >= count:
                break
            label = (row["label"] or "").strip()
            if label not in ("0", "1"):
                raise DataError(f"{file}:{line}: label {label!r}, expected 0 or 1")
            texts.append((row["sentence"] or "").strip())
            labels.append(int(label))
    if count is not None and len(texts) < count:
        raise DataError(f"{file}: {len(texts)} rows, need {count}; ask for fewer")
    return texts, np.asarray(labels, np.int64)


# --------------------------------------------------------------------------------------
# Linear probe


def _sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ImportError("the SST-2 linear probe needs scikit-learn: "
                          "`pip install scikit-learn`") from e
    from sklearn.feature_selection import VarianceThreshold
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return VarianceThreshold, StandardScaler, LogisticRegression, make_pipeline


def train_probe(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0,
                min_relative_std: float = 1e-3) -> Any:
    """A logistic-regression probe on standardized embeddings.

    scikit-learn `Pipeline(VarianceThreshold, StandardScaler, LogisticRegression(C=1.0,
    solver="lbfgs", max_iter=2000, random_state=seed))`; lbfgs is deterministic, so one
    seed gives one probe.

    The VarianceThreshold step drops features whose standard deviation over the training
    rows is at most `min_relative_std` x the median feature's: near-constant features
    carry no signal, and standardizing them would blow rounding noise up into large
    inputs. (all-MiniLM-L6-v2 has three such dimensions in its mean-pooled output, std
    0, 0 and 3e-9 on SST-2 against a median of ~0.3: FP16 rounding moved the third by 12
    standard deviations, and a fixed probe lost 8 points on 200 dev sentences whose
    embeddings kept cosine 0.999998 to FP32.) 0 keeps every non-constant feature. The
    number kept is `probe[0].get_support().sum()`.

    Args:
        embeddings: (N, H) float array, all finite.
        labels: (N,) integer class labels, at least two classes.
        seed: random_state of the classifier.
        min_relative_std: features with std <= this x the median std are dropped.

    Returns:
        The fitted scikit-learn Pipeline (`predict` takes (M, H) arrays).

    Raises:
        ValueError: shapes disagree, a non-finite embedding, a single class, or every
            feature constant.
        ImportError: scikit-learn is not installed.
    """
    VarianceThreshold, StandardScaler, LogisticRegression, make_pipeline = _sklearn()
    x, y = _check(embeddings, labels)
    bad = nonfinite_rows(x)
    if bad:
        raise ValueError(f"{bad} of {len(x)} training embeddings hold NaN/Inf: train "
                         "the probe on a graph whose outputs are finite")
    if len(np.unique(y)) < 2:
        raise ValueError("training labels hold a single class")
    std = x.astype(np.float64).std(axis=0)
    threshold = float((min_relative_std * np.median(std)) ** 2)
    if not np.any(std ** 2 > threshold):
        raise ValueError("every embedding feature is constant over the training rows")
    classifier = LogisticRegression(C=1.0, solver="lbfgs", max_iter=2000,
                                    random_state=seed)
    probe = make_pipeline(VarianceThreshold(threshold), StandardScaler(), classifier)
    return probe.fit(x, y)


def probe_accuracy(probe: Any, embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows the probe labels correctly, in [0, 1].

    A row whose embedding holds NaN/Inf (an overflowing variant) counts as wrong: its
    prediction is undefined. `nonfinite_rows` counts them.

    Args:
        probe: a fitted classifier (`train_probe`'s pipeline).
        embeddings: (N, H) float array.
        labels: (N,) integer labels.

    Raises:
        ValueError: shapes disagree or there are no rows.
    """
    x, y = _check(embeddings, labels)
    if not len(x):
        raise ValueError("no rows to score")
    finite = np.isfinite(x).all(axis=1)
    correct = np.zeros(len(x), bool)
    if finite.any():
        correct[finite] = probe.predict(x[finite]) == y[finite]
    return float(correct.mean())


def nonfinite_rows(embeddings: np.ndarray) -> int:
    """Rows of an (N, H) array holding any NaN/Inf."""
    return int(np.count_nonzero(~np.isfinite(np.asarray(embeddings)).all(axis=1)))


def _check(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(embeddings), np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"embeddings {x.shape} and labels {y.shape}: "
                         "need (N, H) and (N,)")
    return x, y


@dataclass
class ProbeResult:
    """SST-2 dev accuracy of one graph.

    Attributes:
        name: the graph's label (`fp32`, `hybrid`, ...).
        path / sha256: the ONNX file and its `compiler.graph.onnx_io.onnx_sha256`.
        reference: the engine that ran it (ONNX Runtime CPU or the FP16 reference).
        accuracy: dev accuracy of the probe trained on FP32 train embeddings, in [0, 1].
        delta_points: (accuracy - FP32's) x 100, percentage points.
        retrained_accuracy: dev accuracy of a probe retrained on this graph's own train
            embeddings (None when not asked, or when they were non-finite).
        nonfinite_rows: dev rows whose embedding holds NaN/Inf (counted wrong).
        seconds: wall time of this graph's embeddings (0 when cached) and scoring.
    """

    name: str
    path: str
    sha256: str
    reference: str
    accuracy: float
    delta_points: float
    retrained_accuracy: float | None
    nonfinite_rows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
