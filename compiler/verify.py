"""Stage 5 (fidelity): compare a precision variant against the FP32 graph on real and random text.

The FP32 graph runs on ONNX Runtime's CPU provider, the fast path; an FP16 variant runs on the
faithful FP16 reference of `compiler.fp16_reference` (every FP16 tensor really rounded to FP16).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from compiler.fp16_reference import REFERENCE_NAME, fp16_emulation, has_fp16, session
from compiler.metrics import _valid, sample_fidelity  # noqa: F401 (sample_fidelity re-exported)

log = logging.getLogger(__name__)


@dataclass
class Fidelity:
    """Variant vs FP32 over one input set.

    Attributes:
        cosine_min / cosine_mean: cosine similarity per sample over its flattened first output
            at valid (unpadded) positions; a sample with a non-finite value counts as NaN,
            reported as None.
        max_abs_err: largest |variant - fp32| over those values (None when non-finite).
        nonfinite_count: NaN/Inf values in the variant's outputs at valid positions.
        samples: samples compared.
    """

    cosine_min: float | None
    cosine_mean: float | None
    max_abs_err: float | None
    nonfinite_count: int
    samples: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(reference: Any, variant: Any, output_names: list[str],
            batches: Iterator[tuple[dict[str, np.ndarray], np.ndarray]]) -> Fidelity:
    """Run both sessions over `batches` and measure the variant against the reference.

    Args:
        reference, variant: ONNX Runtime sessions with the same inputs and outputs.
        output_names: outputs to check; the first gives cosine and max abs error.
        batches: (feeds, lengths) pairs, feeds of (batch, sequence) int64 arrays.
    """
    start = time.perf_counter()
    cosines, max_err, nonfinite = [], 0.0, 0
    for feeds, lengths in batches:
        ref = reference.run(output_names, feeds)
        got = variant.run(output_names, feeds)
        for i, length in enumerate(lengths):
            for k, (r, g) in enumerate(zip(ref, got)):
                gv = _valid(g, i, length).astype(np.float64)
                bad = int(np.size(gv) - np.count_nonzero(np.isfinite(gv)))
                nonfinite += bad
                if k:
                    continue
                rv = _valid(r, i, length).astype(np.float64).ravel()
                gv = gv.ravel()
                if bad:
                    cosines.append(np.nan)
                    max_err = np.nan
                    continue
                denom = np.linalg.norm(rv) * np.linalg.norm(gv)
                cosines.append(float(rv @ gv / denom) if denom else float(np.array_equal(rv, gv)))
                max_err = max(max_err, float(np.max(np.abs(rv - gv))))
    c = np.array(cosines)
    finite = not np.isnan(c).any()
    return Fidelity(
        cosine_min=float(c.min()) if finite else None,
        cosine_mean=float(c.mean()) if finite else None,
        max_abs_err=float(max_err) if finite else None,
        nonfinite_count=nonfinite,
        samples=len(cosines),
        seconds=round(time.perf_counter() - start, 2),
    )


def verify_variant(fp32_model: Any, variant_model: Any, output_names: list[str], tokens: Any,
                   batch_size: int, vocab_size: int, seed: int = 0) -> dict[str, Any]:
    """Fidelity of `variant_model` against `fp32_model` on real text and on random token ids.

    Args:
        fp32_model: onnx.ModelProto, or its path (ONNX Runtime then reads the file itself,
            which saves a copy of the weights in memory).
        variant_model: onnx.ModelProto with the same inputs/outputs.
        output_names: graph outputs; the first is the one cosine is measured on.
        tokens: a `calibration.TokenizedSet` of real text.
        batch_size: samples per batch (padded to the batch's longest sample).
        vocab_size: random ids are uniform in [0, vocab_size), at the real samples' shapes.
        seed: RNG seed of the random ids.

    Returns:
        {"real": Fidelity dict, "random": Fidelity dict, "reference": engine name}.
    """
    faithful = has_fp16(variant_model)
    # The variant's session first, so its graph is freed before the FP32 weights load.
    variant = session(fp16_emulation(variant_model), True, consume=True) if faithful else session(variant_model, False)
    del variant_model  # the sessions hold their own copies of the weights
    reference = session(fp32_model, faithful_fp16=False)
    names = [i.name for i in reference.get_inputs()]
    real = compare(reference, variant, output_names, tokens.batches(batch_size, names))
    rng = np.random.default_rng(seed)
    rand = compare(reference, variant, output_names,
                   tokens.batches(batch_size, names, rng=rng, vocab_size=vocab_size))
    engine = REFERENCE_NAME if faithful else "onnxruntime CPU (FP32 graph)"
    return {"real": real.to_dict(), "random": rand.to_dict(), "reference": engine}
