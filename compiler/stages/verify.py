"""The verify stage: the variant against the dense FP32 graph on real text, random ids and real
text at the optimization profile's max shape.
"""

from __future__ import annotations

import logging
from typing import Any

from calibration.layout import TokenSets
from calibration.text import load_texts, tokenized_set
from compiler.build.engine import sparse_weights_flag
from compiler.errors import DataError, VerificationError
from compiler.eval.task_agreement import task_agreement
from compiler.eval.verify import verify_variant
from compiler.graph.onnx_io import load_onnx
from compiler.quant.calibrate import WindowTooShort, calibration_windows, window_feeds
from compiler.results import ExportResult, PrecisionResult, VerifyResult
from compiler.settings import BuildSettings

log = logging.getLogger(__name__)


def profile_edge(settings: BuildSettings, export: ExportResult) -> list[tuple[dict[str, Any], Any]]:
    """Real text at the first optimization profile's max sequence: `data.profile_max_rows`
    windows (at most the profile's max batch; None: that many) of exactly max-sequence tokens
    (`compiler.quant.calibrate.calibration_windows`) from the text after the calibration
    samples, read until it holds them; run in batches of at most `data.batch_size` windows. The
    samples of a batch do not interact on the CPU references, so each window's output is the
    one it has in a max-batch run, while the reference's peak memory stays that of one smaller
    batch (BERT-large at 32x512 in one batch: 9.5 GB peak) and its time that of the rows
    checked (BERT-large, 32 rows: ~4x the 8-row default).

    The pipeline takes these right after the export, so that a text too short for them is
    refused before the expensive stages.

    Raises:
        compiler.errors.DataError: the text after the calibration samples holds fewer tokens
            than one window of the max sequence (special tokens aside).
    """
    import numpy as np

    max_batch, seq = settings.engine.profiles[0].max_shape
    rows = settings.data.profile_max_rows
    batch = max_batch if rows is None else min(rows, max_batch)
    data, tok = settings.data, export.loaded.tokenizer
    lines = max(data.samples, 16)
    while True:  # load_texts raises DataError past the text's end
        texts = load_texts(data, count=lines, skip=data.calib_samples, minimum=1)
        tokens = tokenized_set(texts, tok, seq, data.cache_dir)
        try:  # the windows' stream leaves out each line's special tokens: count it, not the lines
            windows = calibration_windows(tokens, count=batch, length=seq)
            break
        except WindowTooShort as e:  # more text does not help
            raise DataError(f"verify at the profile's max shape {batch}x{seq}: {e}; use --max-shape "
                            f"{batch}x{e.needed} or longer") from e
        except ValueError as e:
            if len(texts) < lines:  # the whole text is read
                raise DataError(f"verify at the profile's max shape {batch}x{seq}: {e}; give a longer "
                                "text (--calib) or a smaller --max-shape") from e
        lines *= 2
    feeds, step = window_feeds(windows, export.loaded.input_names), max(1, data.batch_size)
    return [({k: v[i:i + step] for k, v in feeds.items()}, np.full(min(step, batch - i), seq))
            for i in range(0, batch, step)]


def stage_verify(settings: BuildSettings, export: ExportResult, precision: PrecisionResult,
                 tokens: TokenSets, edge: list[tuple[dict[str, Any], Any]] | None = None) -> VerifyResult:
    """Fidelity of the variant against the dense FP32 graph on real text and random ids.

    `fidelity["nonfinite_check"]` says whether the variant may ship (`nonfinite_verdict`; the
    pipeline stops on a refusal after writing the report). A 2:4 run also checks that the
    variant (FP16, Q/DQ) kept the pattern. `edge`: the profile-max batches (`profile_edge`),
    when the caller took them already.
    """
    data = settings.data
    edge = edge if edge is not None else profile_edge(settings, export)
    task = export.loaded.task
    agreement = None
    if task != "feature-extraction":  # before verify_variant, which hands the variant's weights to its session
        agreement = task_agreement(task, export.onnx, load_onnx(precision.onnx, check=False), export.output_names,
                                   tokens.heldout.batches(data.batch_size, export.loaded.input_names),
                                   generate={"prompt_tokens": 16, "new_tokens": 16})
    fidelity = verify_variant(export.onnx, load_onnx(precision.onnx, check=False), export.output_names,
                              tokens.heldout, data.batch_size, export.loaded.vocab_size, settings.model.seed,
                              edges={"profile_max": edge}, cache_dir=data.cache_dir)
    longest = max(len(x) for x in tokens.heldout.input_ids)
    fidelity["shapes_verified"] = {"real": [min(data.batch_size, len(tokens.heldout)), longest],
                                   "random": [min(data.batch_size, len(tokens.heldout)), longest],
                                   "profile_max": [sum(len(n) for _, n in edge), int(edge[0][1][0])],
                                   "profile_max_shape": list(settings.engine.profiles[0].max_shape)}
    fidelity["data"] = {"path": data.path or "wikitext-2/test.txt (default)", "samples": len(tokens.heldout),
                        "max_length": data.max_length,
                        "tokens": int(sum(len(x) for x in tokens.heldout.input_ids))}
    if agreement is not None:
        fidelity["task"] = agreement
        log.info("verify task %s: %s", task, {k: v for k, v in agreement.items() if k not in ("task", "generation")})
    for which in ("real", "random"):
        f = fidelity[which]
        num = lambda v: "nan" if v is None else f"{v:.6g}"  # noqa: E731  (None: a non-finite output)
        log.info("verify %s: cosine min %s mean %s, max abs error %s, %d non-finite over %d samples", which,
                 num(f["cosine_min"]), num(f["cosine_mean"]), num(f["max_abs_err"]), f["nonfinite_count"],
                 f["samples"])
    fidelity["nonfinite_check"] = nonfinite_verdict(fidelity, settings.precision.mode,
                                                    settings.precision.allow_nonfinite)
    fidelity["cosine_check"] = cosine_verdict(fidelity, settings)
    check = None
    if settings.sparsity.pattern is not None:  # FP16 and Q/DQ must keep the 2:4 pattern

        flag, found = sparse_weights_flag(precision.onnx, settings.engine)
        check = {**found, "sparse_weights_flag": flag}
    return VerifyResult(fidelity, check)


SHIPPED_SETS = ("real", "profile_max")  # real text: what the engine will be given
_TO_AUTO = ("PRECISION=auto (--precision auto) finds the tensors that pass FP16's 65504 on real text and keeps "
            "their producers in FP32")
_FLOAT_FP32 = "--float-mode fp32 keeps what runs outside Q/DQ in FP32"
NONFINITE_FIX = {  # per precision mode: what removes the NaN/Inf
    "fp16": _TO_AUTO, "hybrid": _TO_AUTO, "int8": _FLOAT_FP32, "int8-qat": _FLOAT_FP32,
    "auto": "auto's search ended with them (precision_report.json lists its steps); PRECISION=fp32 ships the "
            "FP32 graph",
    "fp32": "the variant's FP32 graph itself (2:4 recovery or vocabulary pruning) gives them: check that step's "
            "report",
}


def nonfinite_verdict(fidelity: dict[str, Any], mode: str, allow: bool) -> dict[str, Any]:
    """Whether verify lets the variant ship: NaN/Inf values on real text (held-out samples and
    the profile's max shape, `SHIPPED_SETS`) where the FP32 graph gives none refuse it. On random
    ids only, or where the FP32 graph is itself non-finite on that text, it ships with a
    warning: random ids are not what the engine will see, and the precision is not to blame for
    the model's own overflow. The FP16 reference shows an overflow as TensorRT computes it
    (`compiler.eval.fp16_reference`), so a refused FP16 variant would give NaN/Inf on the GPU.

    Args:
        fidelity: verify's `fidelity` section: {set: {"nonfinite_count", "reference_nonfinite_count", ...}}.
        mode: the precision mode (`PrecisionSettings.mode`): which fix the message names.
        allow: `PrecisionSettings.allow_nonfinite`: ship it all the same.

    Returns:
        {"status": "ok" | "refused" | "allowed", "nonfinite": {set: variant's NaN/Inf values},
        "reference_nonfinite": {set: the FP32 graph's}}, and unless ok "sets" (the real-text
        sets to blame) and "fix" (`NONFINITE_FIX`).
    """
    sets = [s for s in ("real", "profile_max", "random") if s in fidelity]
    counts = {s: int(fidelity[s]["nonfinite_count"]) for s in sets}
    ref = {s: int(fidelity[s].get("reference_nonfinite_count", 0)) for s in sets}
    for s in sets:
        if ref[s]:
            log.warning("verify %s: the FP32 graph itself gives %d NaN/Inf values on this text; the variant is "
                        "compared against them", s, ref[s])
    blamed = [s for s in SHIPPED_SETS if counts.get(s) and not ref.get(s)]
    if counts.get("random") and not ref.get("random") and not blamed:
        log.warning("verify random: the variant gives %d NaN/Inf values on random ids, none on real text: "
                    "inputs unlike the real text may overflow FP16", counts["random"])
    verdict: dict[str, Any] = {"status": "ok", "nonfinite": counts, "reference_nonfinite": ref}
    if blamed:
        verdict.update(status="allowed" if allow else "refused", fix=NONFINITE_FIX.get(mode, NONFINITE_FIX["fp32"]),
                       sets=blamed)
    return verdict


def refuse_nonfinite(verdict: dict[str, Any], mode: str, report_path: Any) -> None:
    """Raise for a refused `nonfinite_verdict`; log an allowed one.

    Raises:
        compiler.errors.VerificationError: status "refused" (exit 1): the message names the
            sets, the counts, the fix and `--allow-nonfinite`.
    """
    if verdict["status"] == "ok":
        return
    found = ", ".join(f"{verdict['nonfinite'][s]} on {s.replace('_', ' ')}" for s in verdict["sets"])
    what = f"the {mode} variant gives NaN/Inf values on real text where the FP32 graph gives none ({found})"
    if verdict["status"] == "allowed":
        log.warning("verify: %s; kept (--allow-nonfinite)", what)
        return
    raise VerificationError(f"verify refused it: {what}. Fix: {verdict['fix']}; or pass --allow-nonfinite to "
                            f"keep it anyway. Figures: {report_path}")


BROKEN_BELOW = 0.99  # INT8's default budget (QuantSettings.min_cosine): an FP16 variant further off has lost the output


def cosine_verdict(fidelity: dict[str, Any], settings: BuildSettings) -> dict[str, Any]:
    """Whether an `fp16` or `hybrid` variant kept the output on real text.

    Those modes pin by op type, not by measurement: a variant whose FP16 tensors lose the output
    without a NaN (a Llama's RMS norm squares past 65504: the norm is 0, the output unrelated)
    would otherwise ship with exit 0. The floor is `BROKEN_BELOW` (0.99, what the INT8 budget
    accepts by default: FP16 rounding alone stays far above it; the published hybrid figure is
    0.9998), or `precision.min_cosine` where that is lower (`--min-cosine`). Checked where
    verify's figures are the precision's alone: `fp16` or `hybrid`, no 2:4 sparsity, no
    vocabulary pruning (their own losses count against the dense FP32 graph). `auto` and INT8
    meet their budgets in their own search.

    Args:
        fidelity: verify's `fidelity` section ({set: {"cosine_mean", ...}}).
        settings: `precision.mode`, `precision.min_cosine`, `sparsity.pattern`, `vocab.texts`.

    Returns:
        {"status": "ok" | "refused" | "not checked", "min_cosine": the floor, "cosine_mean":
        {set: figure}, "sets": the sets below it} over `SHIPPED_SETS` (None: non-finite, left
        to `nonfinite_verdict`). The mean over samples, not the minimum: a lost output is lost
        on most samples, while one sample's near-zero output (a regression head's scalar) can
        flip sign under any rounding.
    """
    p = settings.precision
    if p.mode not in ("fp16", "hybrid") or settings.sparsity.pattern is not None or settings.vocab.texts:
        return {"status": "not checked"}
    floor = min(p.min_cosine, BROKEN_BELOW)
    found = {s: fidelity[s].get("cosine_mean") for s in SHIPPED_SETS if s in fidelity}
    low = [s for s, c in found.items() if c is not None and c < floor]
    return {"status": "refused" if low else "ok", "min_cosine": floor, "cosine_mean": found, "sets": low}


def refuse_low_cosine(verdict: dict[str, Any], mode: str, report_path: Any) -> None:
    """Raise for a refused `cosine_verdict`.

    Raises:
        compiler.errors.VerificationError: status "refused" (exit 1): the message names the
            figures, the budget, `--precision auto` and `--min-cosine`.
    """
    if verdict.get("status") != "refused":
        return
    where = {"real": "held-out text", "profile_max": "the profile's max shape"}
    found = ", ".join(f"{verdict['cosine_mean'][s]:.6g} on {where.get(s, s)}" for s in verdict["sets"])
    raise VerificationError(
        f"verify refused it: the {mode} variant's mean cosine similarity to the FP32 graph on real text is {found}, "
        f"below {verdict['min_cosine']:g}, without a NaN/Inf to show it: FP16 lost the output, not rounded it. Fix: "
        f"{_TO_AUTO}; or pass a lower --min-cosine to keep it anyway. "
        f"Figures: {report_path}")
