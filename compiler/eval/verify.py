"""The verify stage: a precision variant against the FP32 graph on real text and random ids.

The FP32 graph runs on ONNX Runtime's CPU provider; an FP16 variant runs on the faithful FP16
reference (`compiler.eval.fp16_reference`: every FP16 tensor really rounded to FP16), an FP32
or FP32 + Q/DQ variant on ONNX Runtime CPU. Both through `compiler.eval.fidelity.FidelityProbe`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np

from calibration.text import feed_names, random_id_batches
from compiler.eval.fidelity import Batch, FidelityProbe, reference_name
from compiler.eval.reference_outputs import reference_cached
from compiler.graph.onnx_io import onnx_sha256

log = logging.getLogger(__name__)


def verify_variant(fp32_model: Any, variant_model: Any, output_names: list[str], tokens: Any,
                   batch_size: int, vocab_size: int, seed: int = 0,
                   edges: Mapping[str, list[Batch]] | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """Fidelity of `variant_model` against `fp32_model` on real text and on random token ids.

    Args:
        fp32_model: onnx.ModelProto, or its path (ONNX Runtime then reads the file itself,
            which saves a copy of the weights in memory).
        variant_model: onnx.ModelProto with the same inputs/outputs (its weights are handed to
            the session: do not use it afterwards).
        output_names: graph outputs; the first is the one cosine and max error are measured on,
            NaN/Inf are counted over all of them.
        tokens: a `calibration.TokenizedSet` of real text.
        batch_size: samples per batch; real text longest first (`TokenizedSet.batches` with
            `by_length`, as the budgets batch it), padded to the batch's longest sample.
        vocab_size, seed: the random-id set: uniform ids in [0, vocab_size) at the real samples'
            lengths, seeded, drawn sample by sample. Batched by exact length
            (`calibration.text.random_id_batches`) when the `auto` statistics pass stored the
            FP32 outputs of those batches (they are read back), else longest first and padded
            (fewer, fuller runs); the samples are the same either way.
        edges: more input sets by name, e.g. {"profile_max": [one batch at the optimization
            profile's max batch x max sequence]}: real text at the shapes the engine must serve.
        cache_dir: where the FP32 reference outputs are cached when `fp32_model` is a path
            (`FidelityProbe`; the `auto` and INT8 budgets ran the same held-out batches).

    Returns:
        {"real": Fidelity.report(), "random": Fidelity.report(), <each edge set>: the same,
        "reference": what the variant ran on, "fp32_outputs_reused": the sets whose FP32
        reference outputs came from the cache (a budget's or the statistics pass's)}: cosine
        min/mean and max abs error of the first output (None once it has a non-finite value),
        nonfinite_count, samples, seconds, and per output the same.
    """
    names = feed_names(variant_model)  # KV-cache inputs get an empty past (the context phase)
    sha = onnx_sha256(fp32_model) if cache_dir and isinstance(fp32_model, (str, os.PathLike)) else None
    random = list(random_id_batches(tokens, batch_size, names, vocab_size, seed))
    if not reference_cached(fp32_model, random, output_names, cache_dir, sha):  # the same ids, padded: fewer runs
        random = list(tokens.batches(batch_size, names, np.random.default_rng(seed), vocab_size, by_length=True))
    probe = FidelityProbe(fp32_model, output_names,
                          {"real": tokens.batches(batch_size, names, by_length=True), "random": random,
                           **(edges or {})}, cache_dir, sha)
    engine = reference_name(variant_model, optimize=True)
    result = probe.measure(variant_model, optimize=True, consume=True)
    return {**{name: f.report() for name, f in result.items()}, "reference": engine,
            "fp32_outputs_reused": list(probe.reused)}
