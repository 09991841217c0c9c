"""The matrix report: JSON (every cell, its status, stage times, fidelity, bundle) and a Markdown
table, both written atomically (`compiler.artifacts`); and what a rerun may reuse of it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from compiler.artifacts import write_bytes, write_json

log = logging.getLogger("compiler.matrix")

FORMAT = "trt-compiler-matrix/1"
STATUSES = ("done", "waiting", "failed")
STAGE_COLUMNS = ("shared", "export", "quantize", "sparsity", "precision", "verify", "bundle", "build")


def read_previous(path: Path) -> dict[str, dict[str, Any]]:
    """{cell id: cell record} of an earlier report at `path` ({} when absent or unreadable)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if report.get("format") != FORMAT:
        return {}
    return {c["id"]: c for c in report.get("cells", []) if isinstance(c, dict) and "id" in c}


def _variant_intact(record: dict[str, Any]) -> bool:
    """The verified ONNX is still the graph the record names, and the bundle's files are whole."""
    from compiler.graph.onnx_io import onnx_sha256

    onnx = Path(record.get("variant_dir") or "") / "model.onnx"
    report = Path(record.get("report") or "")
    try:
        if not report.is_file() or not onnx.is_file() or onnx_sha256(onnx) != record.get("onnx_sha256"):
            return False
    except (OSError, ValueError):
        return False
    bundle = record.get("bundle")
    if not bundle:
        return True
    try:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        from compiler.deploy.checks import check_file_hashes
    except (OSError, ValueError):
        return False
    except ImportError:  # the deployment checks are not here: sizes only
        return all((Path(bundle) / f).is_file() and (Path(bundle) / f).stat().st_size == e.get("bytes")
                   for f, e in manifest.get("files", {}).items())
    try:
        check_file_hashes(Path(bundle), manifest.get("files", {}))
    except Exception as e:  # noqa: BLE001 - DeploymentRefusedError: changed since; rebuild
        log.info("matrix: %s changed since the last run (%s): redone", bundle, str(e).splitlines()[0])
        return False
    return True


def _engine_intact(record: dict[str, Any]) -> bool:
    """The bundle still lists a plan for the record's target and the file is there."""
    target, bundle = record.get("target"), record.get("bundle")
    if not target or not bundle:
        return False
    try:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return any(e.get("compute_capability") == target["cc"] and (Path(bundle) / e.get("file", "")).is_file()
               for e in manifest.get("engines", []))


def reusable(record: dict[str, Any] | None, cell_key: str, variant_key: str) -> str | None:
    """What an earlier record lets a rerun skip: "cell" (all of it), "variant" (the CPU part:
    its bundle is prepared; the build still to do), or None.

    A record counts only when its content key equals the cell's (same settings, same target)
    and its artifacts are still the ones it names (hashes checked)."""
    if not record or record.get("variant_key") != variant_key or not record.get("prepared"):
        return None
    if not _variant_intact(record):
        return None
    if record.get("key") == cell_key and record.get("status") == "done" and (
            record.get("target") is None or _engine_intact(record)):
        return "cell"
    return "variant"


def _fmt(v: Any, digits: int = 6) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: counts, one table row per cell, then errors and reasons."""
    counts = report["counts"]
    lines = [f"# Build matrix `{report['name']}`", "",
             f"{len(report['cells'])} cells: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
             + f" ({counts.get('reused', 0)} reused from the last run); wall time {report['wall_seconds']:.1f} s; "
             f"shared stages: {len(report['shared'])} ({sum(1 for s in report['shared'] if s.get('ran'))} ran).",
             f"Spec: `{report['spec']}`. Triton model repository: `{(report.get('repository') or {}).get('path') or '-'}`.",
             "",
             "| cell | status | " + " | ".join(f"{c} s" for c in STAGE_COLUMNS)
             + " | cosine min (real) | cosine mean (real) | non-finite | bundle |",
             "|---|---|" + "---:|" * len(STAGE_COLUMNS) + "---:|---:|---:|---|"]
    notes = []
    for c in report["cells"]:
        sec = c.get("seconds") or {}
        real = (c.get("fidelity") or {}).get("real") or {}
        status = c["status"] + (" (reused)" if c.get("reused") else "")
        lines.append(f"| {c['id']} | {status} | " + " | ".join(_fmt(sec.get(s), 1) for s in STAGE_COLUMNS)
                     + f" | {_fmt(real.get('cosine_min'))} | {_fmt(real.get('cosine_mean'))} | "
                       f"{_fmt(real.get('nonfinite_count'))} | {c.get('bundle') or '-'} |")
        if c.get("error"):
            tries = ", ".join(f"{k} {v}" for k, v in (c.get("attempts") or {}).items()) or "none"
            notes.append(f"- `{c['id']}` ({c['status']}; attempts: {tries}): " + c["error"].replace("\n", " "))
    if notes:
        lines += ["", "## Failed and waiting cells", "", *notes]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write `report.json` and `report.md` into `folder` (atomically); returns both paths."""
    return write_json(folder / "report.json", report), write_bytes(folder / "report.md", markdown(report).encode())
