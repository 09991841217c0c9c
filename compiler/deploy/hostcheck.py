"""`run --check`: the bundle's engine (or ONNX Runtime model) against its FP32 reference, on this host.

The bundle's backend (what `Bundle.load` chose: the TensorRT plan, or the ONNX Runtime model)
and `reference/model.fp32.onnx` on ONNX Runtime CPU (the reference of every fidelity figure in
`report.json`) run the same tokenized texts; per sample and output, at the sample's unpadded
positions, `compiler.eval.fidelity.sample_fidelity` gives the cosine, the max |error| and the
non-finite count, aggregated exactly as the verify stage does (`OutputFidelity`, `Fidelity.report`).
The texts are the request's plus a few held-out real texts (WikiText-2 test after the
calibration samples, when that file is here).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from compiler.deploy.runtime import Bundle
from compiler.errors import CompilerError, DeploymentRefusedError
from compiler.eval.fidelity import Fidelity, FidelityTally

log = logging.getLogger(__name__)


def heldout_sample(count: int) -> list[str]:
    """Up to `count` held-out real texts (the verify stage's), [] where the text is not on this host."""
    from calibration.layout import heldout_texts
    from compiler.settings import DataSettings

    if count <= 0:
        return []
    try:
        return heldout_texts(DataSettings(samples=count))
    except CompilerError as e:
        log.info("no held-out text for --check here (%s); checking the request's texts only", e)
        return []


def check_on_host(bundle: Bundle, texts: list[str], batch_size: int = 8) -> dict[str, Any]:
    """Fidelity of the bundle's loaded backend against its FP32 reference on `texts`.

    Args:
        bundle: a loaded bundle (its backend is what is measured).
        texts: the texts (each truncated to the tokenizer's max_length, the profile's longest sequence).
        batch_size: texts per request (at most the profile's largest batch).

    Returns:
        {"backend", "engine", "reference", "texts", and `Fidelity.report()`: cosine_min,
        cosine_mean, max_abs_err (None once a value is non-finite), nonfinite_count, per-output
        figures} — the figures of report.json's `fidelity` sections.
    """
    import onnxruntime as ort

    if not texts:
        raise CompilerError("--check needs at least one text")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    reference = ort.InferenceSession(str(bundle.root / bundle.manifest["reference"]["file"]), options,
                                     providers=["CPUExecutionProvider"])
    ref_inputs = {i.name for i in reference.get_inputs()}
    names = [n for n in bundle.output_names if n in {o.name for o in reference.get_outputs()}]
    max_batch = max(int(s["max"][0]) for p in bundle.manifest["profiles"] for s in p.values())
    step = max(1, min(batch_size, max_batch))
    tally = FidelityTally(names)
    for start in range(0, len(texts), step):
        feeds = bundle.tokenize(texts[start:start + step], truncate=True)
        got = bundle.infer_batches(feeds)  # a last chunk below the profile's min batch is padded
        ref = reference.run(names, {k: v for k, v in feeds.items() if k in ref_inputs})
        lengths = feeds["attention_mask"].sum(axis=1) if "attention_mask" in feeds else \
            np.full(len(feeds["input_ids"]), feeds["input_ids"].shape[1])
        tally.add(ref, [got[n] for n in names], lengths)
    report = Fidelity(tally.outputs(), 0.0).report()
    report.pop("seconds", None)
    return {"backend": bundle.backend, "engine": (bundle.engine or {}).get("file") or bundle.manifest["onnxruntime"]["file"],
            "reference": bundle.manifest["reference"]["file"], "texts": len(texts), **report}


def refuse_nonfinite_here(check: dict[str, Any], run_json: Any) -> None:
    """The verify stage's rule on this host: the backend's NaN/Inf values where the FP32
    reference gives none on the same texts refuse it (`compiler.stages.verify.nonfinite_verdict`).
    ONNX Runtime CPU runs FP16 chains in FP32, so it is the TensorRT plan this catches.

    Args:
        check: `check_on_host`'s result. run_json: where the figures were written (named in the message).

    Raises:
        compiler.errors.DeploymentRefusedError: (check "fidelity on this host", exit 4).
    """
    if check["nonfinite_count"] and not check.get("reference_nonfinite_count"):
        raise DeploymentRefusedError(
            "fidelity on this host", f"{check['nonfinite_count']} NaN/Inf values from {check['backend']} "
            f"({check['engine']}) on {check['texts']} texts (figures: {run_json})",
            "none, as the FP32 reference gives none on the same texts",
            "rebuild the bundle with PRECISION=auto (it keeps the layers that overflow FP16 in FP32) and build "
            "the plan again; compare with --backend onnxruntime")

