"""Run a build matrix on Ray: local by default, a cluster with `--address` / RAY_ADDRESS.

    shared stage (1 CPU; 1 GPU for 2:4 recovery when the cluster has one) --ObjectRef-->
    variant (1 CPU; 1 GPU for QAT) --> build per target (1 GPU + the target's accelerator
    resource), the builds into one bundle one after another

Shared stages and variants are submitted at once (Ray starts a variant when the export it takes
is ready); a variant's builds are submitted by the driver when the variant is done (none when
it failed), the next one into the same bundle when the last finished (each rewrites the
manifest). The driver waits on the tasks, updates each cell's record and the progress bar, then writes the
report (`compiler.matrix.report`) and the combined Triton repository
(`compiler.matrix.repository`). A cell whose target no worker offers is "waiting" (its
bundle still prepared); a failed task fails only the cells that need it. Ray is imported
here only, inside functions.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.artifacts import sha256_file
from compiler.errors import CompilerError
from compiler.matrix import tasks
from compiler.matrix.cells import Cell, SharedStage, Variant, expand
from compiler.matrix.records import Records
from compiler.matrix.report import FORMAT, read_previous, reusable, write_report
from compiler.matrix.spec import MatrixSpec
from compiler.matrix.targets import resources_for

log = logging.getLogger("compiler.matrix")

# Environment a worker needs as the driver has it (offline hub, caches), forwarded via runtime_env.
FORWARD_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_CACHE")


@dataclass
class MatrixRun:
    """What `run_matrix` returns: the report (as written) and where it lies."""

    report: dict[str, Any]
    json_path: Path
    markdown_path: Path


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Connect to Ray (a running session in this process is used as it is).

    Args:
        address: a cluster ("ray://head:10001", "head:6379", "auto"); None: RAY_ADDRESS, else a
            local Ray on this machine with `num_cpus` CPUs (default: all).

    Returns:
        True when this call started or joined Ray (the caller shuts it down), False when Ray
        was already initialized.

    Raises:
        CompilerError: Ray is not installed (the extra that installs it), or the cluster is
            not reachable.
    """
    try:
        import ray
    except ImportError as e:
        raise CompilerError(f"the build matrix runs on Ray, which is not importable ({e}); install it with "
                            "`pip install -e '.[ray]'`") from e
    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    kw: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    kw["log_to_driver"] = logging.getLogger().isEnabledFor(logging.DEBUG)
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CompilerError(f"cannot start or reach Ray at {address or 'this machine'}: {e}. Check the head "
                            "node's address (`ray status` on it) or leave --address out for a local run") from e
    return True


def _failure(kind: str, e: BaseException) -> dict[str, Any]:
    """A task that Ray itself could not finish (its worker died after the retries, an upstream one did)."""
    cause = getattr(e, "cause", None) or e
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return {"ok": False, "status": "failed", "error": f"{kind}: {type(cause).__name__}: {first}",
            "message": str(cause), "type": type(cause).__name__, "retryable": True, "attempts": None}


class _Submitter:
    """Submits the remote tasks of a run and remembers what each ObjectRef is."""

    def __init__(self, ray: Any, retries: int, command: str, cluster: dict[str, float]) -> None:
        self.ray, self.retries, self.command, self.cluster = ray, retries, command, cluster
        self.gpus = cluster.get("GPU", 0) >= 1
        self.pending: dict[Any, tuple[str, str]] = {}
        self.shared_refs: dict[str, Any] = {}
        self.queued: dict[str, list[tuple[Cell, dict[str, Any]]]] = {}  # variant id -> builds to submit
        self.variant_input: dict[str, dict[str, Any]] = {}  # variant id -> its finished result
        remote = ray.remote
        self._shared, self._variant, self._build = (remote(tasks.run_shared), remote(tasks.run_variant),
                                                    remote(tasks.run_build))

    def shared(self, stage: SharedStage) -> Any:
        if stage.key not in self.shared_refs:
            gpu = stage.until == "sparsity" and self.gpus  # 2:4 recovery trains on a GPU where there is one
            refs = self._shared.options(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=self.retries,
                                        num_returns=2, name=f"matrix shared {stage.label}").remote(
                stage.settings, stage.until, self.retries, gpu)
            self.shared_refs[stage.key] = refs  # (summary, export): the driver waits on the summary only
            self.pending[refs[0]] = ("shared", stage.key)
        return self.shared_refs[stage.key]

    def variant(self, variant: Variant) -> Any:
        gpu = variant.gpu_training and self.gpus
        ref = self._variant.options(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=self.retries,
                                    name=f"matrix variant {variant.id}").remote(
            variant.settings, *self.shared(variant.shared), self.retries,
            f"{self.command} (variant {variant.id})", gpu)
        self.pending[ref] = ("variant", variant.id)
        return ref

    def queue_build(self, cell: Cell, resources: dict[str, Any]) -> None:
        self.queued.setdefault(cell.variant.id, []).append((cell, resources))

    def next_build(self, variant_id: str, variant_result: dict[str, Any] | None = None) -> None:
        """Submit the variant's next queued build (its result given once it is known; nothing
        when the variant failed: its cells already say why)."""
        if variant_result is not None:
            self.variant_input[variant_id] = variant_result
        result = self.variant_input.get(variant_id)
        if not result or not result.get("ok") or not self.queued.get(variant_id):
            return
        cell, resources = self.queued[variant_id].pop(0)
        ref = self._build.options(num_cpus=1, max_retries=self.retries, name=f"matrix build {cell.id}",
                                  **resources).remote(result, cell.target.to_dict(), self.retries,
                                                      f"{self.command} (cell {cell.id})")
        self.pending[ref] = ("build", cell.id)


def _plan(records: Records, variants: list[Variant], cells: list[Cell], previous: dict[str, dict[str, Any]]
          ) -> tuple[list[Variant], list[Cell]]:
    """Mark what a rerun reuses; return the variants to run and the cells whose build is to do."""
    reused_variant: dict[str, dict[str, Any]] = {}
    by_variant = {r.get("variant_key"): r for r in previous.values() if r.get("prepared")}
    todo_cells = []
    for cell in cells:
        record = previous.get(cell.id)
        what = reusable(record, cell.key, cell.variant.key)
        if what is None:  # the same variant under another cell (another target): its bundle still serves
            record = by_variant.get(cell.variant.key)
            what = reusable(record, cell.key, cell.variant.key)
        if what == "cell":
            records.reuse_cell(cell, record)
        else:
            todo_cells.append(cell)
        if what:
            reused_variant.setdefault(cell.variant.id, record)
    for variant_id, record in reused_variant.items():
        records.reuse_variant(variant_id, record)
    todo_ids = {c.variant.id for c in todo_cells}
    return [v for v in variants if v.id in todo_ids and v.id not in reused_variant], todo_cells


def _submit(sub: _Submitter, records: Records, run_variants: list[Variant], todo_cells: list[Cell]) -> None:
    for variant in run_variants:
        sub.variant(variant)
    for cell in todo_cells:
        if cell.target is None:
            continue
        resources, why = resources_for(cell.target, sub.cluster)
        if resources is None:
            records.waiting(cell, why)
            continue
        records.target_resource(cell, why)
        sub.queue_build(cell, resources)
    running = {v.id for v in run_variants}
    for variant_id in list(sub.queued):
        if variant_id not in running:  # reused from the last run: its builds can start now
            sub.next_build(variant_id, records.variant_result(variant_id))


def _wait_all(ray: Any, sub: _Submitter, records: Records) -> None:
    while sub.pending:
        ready, _ = ray.wait(list(sub.pending), num_returns=1, timeout=1.0)
        for ref in ready:
            kind, name = sub.pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a RayError: the worker died after its retries
                result = _failure(kind, e)
            records.finish(kind, name, result)
            if kind == "variant":
                sub.next_build(name, result)
            elif kind == "build":
                sub.next_build(records.variant_of(name))
        records.show()


def run_matrix(spec: MatrixSpec, *, spec_path: str = "", address: str | None = None, retries: int | None = None,
               fresh: bool = False, out: str | None = None, num_cpus: int | None = None,
               progress: bool = True) -> MatrixRun:
    """Expand `spec`, run what is not finished, write the report and the Triton repository.

    Args:
        spec: a validated spec (`compiler.matrix.spec.load_spec`).
        spec_path: the spec's file (recorded, with its sha256).
        address: a Ray cluster; None: RAY_ADDRESS or a local Ray.
        retries: tries after the first for failing tasks (None: the spec's); `CompilerError`s
            (bad input) are never retried.
        fresh: ignore the last report (every cell runs again; the pipeline's content-hash
            caches still reuse unchanged artifacts).
        out: artifact root (None: the spec's `output_dir`); the report goes to
            `<out>/matrix/<spec name>/report.json` and `report.md`, the repository to
            `<out>/matrix/<spec name>/model_repository/`.
        num_cpus: CPUs of a local Ray (None: the spec's, else all).
        progress: show the progress bar (cells done / running / waiting / failed).

    Returns:
        The `MatrixRun`. Failing cells do not raise: their status and message are in the report.

    Raises:
        CompilerError: an invalid spec, Ray not installed or not reachable, an unwritable folder.
    """
    start = time.perf_counter()
    out_dir = str(Path(out or spec.output_dir).expanduser().resolve())
    shared, variants, cells = expand(spec, out_dir)
    folder = Path(out_dir) / "matrix" / spec.name
    retries = spec.retries if retries is None else retries
    previous = {} if fresh else read_previous(folder / "report.json")
    records = Records(cells, progress)
    run_variants, todo_cells = _plan(records, variants, cells, previous)
    cluster: dict[str, float] = {}
    if run_variants or todo_cells:
        import ray

        started = connect(address, num_cpus or spec.num_cpus)
        try:
            cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
            command = f"python -m compiler matrix {spec_path or spec.name}"
            sub = _Submitter(ray, retries, command, cluster)
            _submit(sub, records, run_variants, todo_cells)
            records.show()
            _wait_all(ray, sub, records)
        finally:
            records.close()
            if started:
                ray.shutdown()
    else:
        records.close()
    repository = records.combine(folder / "model_repository")
    report = {"format": FORMAT, "name": spec.name, "spec": str(spec_path),
              "spec_sha256": sha256_file(spec_path) if spec_path and Path(spec_path).is_file() else None,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "wall_seconds": round(time.perf_counter() - start, 2), "retries": retries,
              "ray": {"address": address or os.environ.get("RAY_ADDRESS") or ("local" if cluster else None),
                      "cluster_resources": cluster},
              "counts": records.counts(), "shared": records.shared_summary(shared),
              "repository": repository, "cells": records.cell_list()}
    json_path, md_path = write_report(folder, report)
    return MatrixRun(report, json_path, md_path)
