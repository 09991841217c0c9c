"""Each cell's record while a matrix runs: its status, stage times, fidelity and bundle, updated as
tasks finish, with the progress bar (tqdm: cells done / running / waiting / failed).

A record is what `report.json` lists per cell:

    id, key, variant_key, model, weights, sparsity, precision, target {name, cc, label, resource},
    shared (the shared stage's label), status ("running" while unfinished, then "done",
    "waiting" or "failed"), reused (taken from the last run), prepared (the bundle is there),
    error / message (why failed or waiting), attempts {shared, variant, build}, seconds {stage:
    s}, fidelity {real, random: cosine_min, cosine_mean, max_abs_err, nonfinite_count},
    variant_dir, report, onnx_sha256, bundle, engine (the manifest's entry for the target).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from compiler.errors import CompilerError
from compiler.matrix.cells import Cell, SharedStage

log = logging.getLogger("compiler.matrix")

VARIANT_FIELDS = ("variant_dir", "report", "onnx_sha256", "bundle", "fidelity")


def _base(cell: Cell) -> dict[str, Any]:
    s = cell.variant.settings
    return {"id": cell.id, "key": cell.key, "variant_key": cell.variant.key, "model": s.model.name,
            "weights": s.model.weights, "sparsity": s.sparsity.pattern or "dense", "precision": s.precision.mode,
            "target": cell.target.to_dict() if cell.target else None, "shared": cell.variant.shared.label,
            "status": "running", "reused": False, "prepared": False, "error": None, "message": None,
            "attempts": {}, "seconds": {}, "fidelity": None, "variant_dir": None, "report": None,
            "onnx_sha256": None, "bundle": None, "engine": None}


class Records:
    """The records of every cell of a run, keyed by cell id, in spec order."""

    def __init__(self, cells: list[Cell], progress: bool = True) -> None:
        self.cells = cells
        self.records = {c.id: _base(c) for c in cells}
        self.by_variant: dict[str, list[Cell]] = {}
        for c in cells:
            self.by_variant.setdefault(c.variant.id, []).append(c)
        self.variant_results: dict[str, dict[str, Any]] = {}
        self.shared_results: dict[str, dict[str, Any]] = {}
        self.bar, self.shown, self.shown_at = None, "", 0.0
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=len(cells), unit="cell", desc="matrix", dynamic_ncols=True)

    # --- reuse from the last run ------------------------------------------------------------
    def reuse_cell(self, cell: Cell, record: dict[str, Any]) -> None:
        """The whole cell is finished in the last run and unchanged: take its record."""
        keep = {k: record.get(k) for k in (*VARIANT_FIELDS, "seconds", "engine", "attempts")}
        self.records[cell.id].update(keep, status="done", reused=True, prepared=True)
        if cell.target:
            self.records[cell.id]["target"] = {**cell.target.to_dict(), **(record.get("target") or {})}

    def reuse_variant(self, variant_id: str, record: dict[str, Any]) -> None:
        """The variant's bundle is prepared and unchanged: its cells need only their builds."""
        seconds = {k: v for k, v in (record.get("seconds") or {}).items() if k != "build"}
        result = {"ok": True, "reused": True, "stage_seconds": seconds, **{k: record.get(k) for k in VARIANT_FIELDS}}
        self.variant_results[variant_id] = result
        for cell in self.by_variant[variant_id]:
            rec = self.records[cell.id]
            if rec["status"] == "running":
                rec.update({k: result[k] for k in VARIANT_FIELDS}, seconds=dict(seconds), prepared=True)
                if cell.target is None:  # nothing left to do for it
                    rec.update(status="done", reused=True)

    def variant_result(self, variant_id: str) -> dict[str, Any]:
        return self.variant_results[variant_id]

    def variant_of(self, cell_id: str) -> str:
        return next(c.variant.id for c in self.cells if c.id == cell_id)

    # --- while running ----------------------------------------------------------------------
    def waiting(self, cell: Cell, why: str) -> None:
        self.records[cell.id].update(status="waiting", error=why, message=why)

    def target_resource(self, cell: Cell, resource: str) -> None:
        self.records[cell.id]["target"]["resource"] = resource

    def _fail(self, rec: dict[str, Any], result: dict[str, Any]) -> None:
        rec.update(status=result.get("status", "failed"), error=result.get("error"), message=result.get("message"))

    def finish(self, kind: str, name: str, result: dict[str, Any]) -> None:
        """Take a finished task's result ("shared" stage key, "variant" id or "build" cell id)."""
        if kind == "shared":
            self.shared_results[name] = result
            for cell in self.cells:
                if cell.variant.shared.key == name and not self.records[cell.id]["reused"]:
                    rec = self.records[cell.id]
                    rec["seconds"]["shared"] = result.get("seconds")
                    rec["attempts"]["shared"] = result.get("attempts")
                    if not result.get("ok"):  # known now: its variant task only passes the error on
                        self._fail(rec, result)
        elif kind == "variant":
            self.variant_results[name] = result
            for cell in self.by_variant[name]:
                self._variant_done(self.records[cell.id], cell, result)
        else:
            rec = self.records[name]
            rec["attempts"]["build"] = result.get("attempts")
            if result.get("ok"):
                rec.update(status="done", engine=result.get("engine"))
                rec["seconds"]["build"] = result.get("build_seconds")
            elif not result.get("upstream"):
                self._fail(rec, result)
        log.debug("matrix: %s %s finished: %s", kind, name, "ok" if result.get("ok") else result.get("error"))

    def _variant_done(self, rec: dict[str, Any], cell: Cell, result: dict[str, Any]) -> None:
        if rec["reused"]:
            return
        rec["attempts"]["variant"] = result.get("attempts")
        if not result.get("ok"):
            self._fail(rec, result)
            return
        rec.update({k: result.get(k) for k in VARIANT_FIELDS}, prepared=True)
        rec["seconds"].update(result.get("stage_seconds") or {})
        rec["export_reused"] = result.get("export_reused")
        if cell.target is None:
            rec["status"] = "done"

    # --- summaries ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("done", "running", "waiting", "failed")}
        for rec in self.records.values():
            out[rec["status"]] = out.get(rec["status"], 0) + 1
        out["reused"] = sum(1 for r in self.records.values() if r["reused"])
        return out

    def show(self) -> None:
        if self.bar is None:
            return
        c = self.counts()
        text = f"done {c['done']}, running {c['running']}, waiting {c['waiting']}, failed {c['failed']}"
        if text == self.shown and time.monotonic() - self.shown_at < 10:  # a log file gets a line per change
            return
        self.shown, self.shown_at = text, time.monotonic()
        self.bar.n = c["done"] + c["failed"] + c["waiting"]
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.show()
            self.bar.close()

    def shared_summary(self, stages: list[SharedStage]) -> list[dict[str, Any]]:
        """Per shared stage: whether it ran in this run, whether its export was already on disk
        (`reused`), its time, attempts and error, and the variants that depend on it."""
        out = []
        for stage in stages:
            result = self.shared_results.get(stage.key)
            out.append({"key": stage.key, "label": stage.label, "until": stage.until,
                        "variants": sorted({c.variant.id for c in self.cells if c.variant.shared.key == stage.key}),
                        "ran": result is not None, "ok": None if result is None else bool(result.get("ok")),
                        "reused": None if result is None else result.get("reused"),
                        "seconds": None if result is None else result.get("seconds"),
                        "attempts": None if result is None else result.get("attempts"),
                        "error": None if result is None else result.get("error")})
        return out

    def cell_list(self) -> list[dict[str, Any]]:
        return [self.records[c.id] for c in self.cells]

    def combine(self, dest: Path) -> dict[str, Any] | None:
        """The combined Triton repository of every prepared bundle (`compiler.matrix.repository`),
        or None when there is none; an error there is recorded, not raised (the report still gets written)."""
        from compiler.matrix.repository import combine

        bundles = list(dict.fromkeys(Path(r["bundle"]) for r in self.records.values() if r["prepared"] and r["bundle"]))
        if not bundles:
            return None
        try:
            return {"path": str(dest), "models": combine(bundles, dest)}
        except CompilerError as e:
            log.warning("matrix: the combined model repository was not written: %s", e)
            return {"path": None, "error": str(e)}
