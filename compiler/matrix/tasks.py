"""The work of a matrix, one function per stage kind, run inside Ray tasks (plain functions here:
`compiler.matrix.runner` wraps them with `ray.remote` and the resources each needs).

Each returns a JSON-ready dict and never raises for a failing cell: `attempt` retries errors
that may pass (anything but a `CompilerError`, which is bad input and would fail again) and
returns {"ok": False, "error": ...} after the last try, so one failing cell never stops the
others. A stage whose upstream failed returns at once, naming the upstream error.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from compiler.errors import CompilerError, TensorRTUnavailableError

log = logging.getLogger("compiler.matrix")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def attempt(work: Callable[[], dict[str, Any]], retries: int, what: str) -> dict[str, Any]:
    """`work()` tried up to `retries` + 1 times.

    Returns:
        {"ok": True, "attempts", "seconds", "host", **work()} on success; after a
        `CompilerError` (bad input: not retried) or the last failed try {"ok": False, "status":
        "failed" (or "waiting" for `TensorRTUnavailableError`: no TensorRT or GPU on the
        worker), "error": "<what>: <first line>", "message": the whole message, "type",
        "retryable", "attempts", "traceback" (not for `CompilerError`s)}.
    """
    start, host = time.perf_counter(), socket.gethostname()
    last: BaseException | None = None
    for n in range(1, retries + 2):
        try:
            out = work()
            return {"ok": True, "attempts": n, "seconds": round(time.perf_counter() - start, 2), "host": host, **out}
        except CompilerError as e:  # bad input, or no TensorRT here: trying again changes nothing
            return {"ok": False, "status": "waiting" if isinstance(e, TensorRTUnavailableError) else "failed",
                    "error": f"{what}: {_first_line(e)}", "message": str(e), "type": type(e).__name__,
                    "retryable": False, "attempts": n, "host": host, "seconds": round(time.perf_counter() - start, 2)}
        except Exception as e:  # noqa: BLE001 - isolated: reported with the cell, retried first
            last = e
            log.warning("%s: attempt %d of %d failed: %s", what, n, retries + 1, _first_line(e))
    assert last is not None
    return {"ok": False, "status": "failed", "error": f"{what}: {type(last).__name__}: {_first_line(last)}",
            "message": str(last), "type": type(last).__name__, "retryable": True, "attempts": retries + 1,
            "host": host, "seconds": round(time.perf_counter() - start, 2),
            "traceback": "".join(traceback.format_exception(last))[-4000:]}


def upstream_failed(upstream: dict[str, Any]) -> dict[str, Any]:
    """The result of a stage that did not run because the stage it needs failed."""
    return {"ok": False, "status": upstream.get("status", "failed"), "error": upstream["error"],
            "message": upstream.get("message", upstream["error"]), "type": upstream.get("type"),
            "retryable": False, "attempts": 0, "upstream": True}


def resolved(settings: Any) -> Any:
    """`settings` as the CLI completes them before the pipeline: `model.task` None becomes the
    checkpoint's natural task (MiniLM: sentence-embedding), with KV-cache profiles for
    `text-generation-with-past` (`compiler.training.models.resolve_task`). Done in the worker:
    it reads the checkpoint's config, which the driver need not reach."""
    from compiler.training.models import resolve_task

    return resolve_task(settings)


def passes_export(settings: Any) -> bool:
    """Whether the shared export can be handed to the variants as it is: not when 2:4 or QAT
    follow (they need the PyTorch module, which stays out of the object store; those variants
    run the export stage themselves and find it on disk)."""
    return settings.sparsity.pattern is None and settings.precision.mode != "int8-qat"


def run_shared(settings: Any, until: str, retries: int, gpu: bool = False) -> tuple[dict[str, Any], Any]:
    """The shared stage: the FP32 export (and for 2:4 the recovered student), once for every
    variant that derives from it.

    Returns:
        (summary, export): `attempt`'s dict with "reused" (the export was already on disk with
        the same content key), "onnx" (the FP32 graph the variants derive from) and
        "stage_seconds"; and the `ExportResult` (tokenizer, held-out text, report; no PyTorch
        module) that the variants start from (`run_pipeline(export=...)`), or None. With `gpu`
        (the task was given a GPU) the 2:4 recovery trains on `cuda`.
    """
    from compiler.pipeline import run_pipeline

    if gpu:
        settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train, device="cuda"))
    done: dict[str, Any] = {}

    def work() -> dict[str, Any]:
        run = run_pipeline(resolved(settings), until=until)
        done["export"] = run.export
        return {"reused": bool(run.report["export"]["reused"]), "onnx": str(run.fp32_onnx),
                "stage_seconds": dict(run.seconds)}

    summary = attempt(work, retries, "export")
    export = done.get("export") if summary["ok"] and until == "export" else None
    if export is not None:
        export.loaded.module = None  # only 2:4 and QAT need it, and they do not get this export
        export.report = {**export.report, "export": {**export.report["export"], "reused": True}}  # for the variants
    return summary, export


def fidelity_summary(fidelity: dict[str, Any]) -> dict[str, Any]:
    """cosine min/mean, max abs error and non-finite count per input set of report.json's `fidelity`."""
    keys = ("samples", "cosine_min", "cosine_mean", "max_abs_err", "nonfinite_count")
    return {k: {f: v.get(f) for f in keys} for k, v in fidelity.items() if isinstance(v, dict) and "cosine_min" in v}


def _prepare(settings: Any, run: Any, command: str) -> str:
    """The bundle folder (`compiler.deploy.bundle.prepare_bundle`)."""
    from compiler.deploy.bundle import prepare_bundle

    return str(prepare_bundle(settings, run=run, command=command))


def run_variant(settings: Any, shared: dict[str, Any], export: Any, retries: int, command: str,
                gpu: bool) -> dict[str, Any]:
    """A variant's CPU work: precision pass, statistics, verification, the prepared bundle.

    Args:
        settings: the variant's BuildSettings.
        shared: `run_shared`'s summary (Ray passes the finished value of its ObjectRef).
        export: `run_shared`'s export (None: run the export stage here, reused from disk).
        retries: tries after the first.
        command: recorded in the bundle's manifest.
        gpu: QAT / 2:4 recovery train on `cuda` (the task was given a GPU).

    Returns:
        `attempt`'s dict with "variant_dir", "report", "bundle", "stage_seconds" (export,
        precision, verify, bundle...), "fidelity" (`fidelity_summary`), "export_reused".
    """
    if not shared.get("ok"):
        return upstream_failed(shared)
    from compiler.pipeline import run_pipeline

    if gpu:
        settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train, device="cuda"))

    def work() -> dict[str, Any]:
        given = export if export is not None and passes_export(settings) else None
        cell = resolved(settings)
        run = run_pipeline(cell, until="verify", export=given)
        start = time.perf_counter()
        bundle = _prepare(cell, run, command)
        seconds = dict(run.seconds, bundle=round(time.perf_counter() - start, 2))
        return {"variant_dir": str(cell.variant_dir()), "report": str(cell.variant_dir() / "report.json"),
                "onnx_sha256": run.precision.sha256, "bundle": bundle, "stage_seconds": seconds,
                "fidelity": fidelity_summary(run.report.get("fidelity", {})),
                "export_reused": bool(run.report["export"]["reused"])}

    return attempt(work, retries, "variant")


def _build(bundle: str, target: dict[str, Any], command: str) -> dict[str, Any]:
    from compiler.build.device import find_gpu
    from compiler.deploy.bundle import build_here_problem, build_into_bundle

    problem = build_here_problem()
    if problem:
        raise TensorRTUnavailableError(f"worker {socket.gethostname()} cannot build: {problem}")
    gpu = find_gpu()
    if gpu.compute_capability != target["cc"]:
        raise CompilerError(f"worker {socket.gethostname()} has {gpu.name} (compute capability "
                            f"{gpu.compute_capability}), target {target['name']} needs {target['cc']}: fix the "
                            "worker's accelerator_type / cc_* resource")
    start = time.perf_counter()
    manifest = build_into_bundle(Path(bundle), command=command)
    entry = next(e for e in manifest["engines"] if e["compute_capability"] == target["cc"])
    return {"engine": entry, "gpu": gpu.to_dict(), "build_seconds": round(time.perf_counter() - start, 2)}


def run_build(variant: dict[str, Any], target: dict[str, Any], retries: int, command: str) -> dict[str, Any]:
    """A cell's GPU work: the TensorRT plan for `target`, built on this worker into the variant's
    bundle (`compiler.deploy.bundle.build_into_bundle`), after checking this worker's GPU has the
    target's compute capability.

    Args:
        variant: `run_variant`'s result.
        target: `Target.to_dict()`.
        retries: tries after the first.
        command: recorded in the manifest's `builds`.

    The driver submits one build into a bundle at a time (each rewrites the bundle's manifest).
    """
    if not variant.get("ok"):
        return upstream_failed(variant)
    return attempt(lambda: _build(variant["bundle"], target, command), retries, f"build {target['name']}")
