"""Benchmark: what compiling costs, per model and precision mode: each stage's wall time and peak
memory, from scratch.

    python -m benchmarks.compile_cost [--models minilm,bert-base,bert-large] \
        [--modes fp32,fp16,hybrid,auto,int8] [--cells minilm:fp32,bert-large:auto,...] \
        [--fresh] [--timeout-s 3600] [--output-dir engines/compile-cost] [--out engines/benchmarks] \
        [-- EXTRA COMPILE ARGS]
    make bench-compile [ARGS="--models minilm --modes hybrid,int8"]

Each cell (model x mode) runs `python -m compiler compile --no-build --model M --weights W
--precision P --output-dir <fresh folder>` as a subprocess: a new folder per cell (its export,
tokenization and calibration caches included), so nothing is reused. MiniLM uses its
pretrained weights, the other models `--weights random` (the published architecture, seeded).
The cell's wall time, the CPU seconds (user + system) of the child tree, and the peak RSS of
the child's whole process tree (sampled every 0.2 s, `benchmarks.peak_memory`) come from outside; each stage's wall time and the process's peak
RSS after it come from `report.json`'s `timings` (`compiler.results.PipelineRun`). The cell's
folder is removed afterwards unless `--keep`.

The default cells: MiniLM fp32, fp16, hybrid, auto, int8; BERT-base hybrid, auto, int8;
BERT-large hybrid, auto. `--models` / `--modes` select from those; `--cells` names any.
Writes `<out>/compile.json` (a rerun keeps the cells already measured, unless `--fresh`) and
prints a markdown table (also `<out>/compile.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import add_out_argument, markdown_table
from benchmarks.peak_memory import measure
from benchmarks.speed.timing import cpu_features, cpu_model, library_versions, load_average, usable_cores

DEFAULT_CELLS = (("minilm", "fp32"), ("minilm", "fp16"), ("minilm", "hybrid"), ("minilm", "auto"),
                 ("minilm", "int8"), ("bert-base", "hybrid"), ("bert-base", "auto"), ("bert-base", "int8"),
                 ("bert-large", "hybrid"), ("bert-large", "auto"))
PRETRAINED = ("minilm",)  # the others have no offline weights here: random, seeded


def weights_of(model: str) -> str:
    return "pretrained" if model in PRETRAINED else "random"


def parse_cells(spec: str) -> list[tuple[str, str]]:
    """`model:mode,...` -> [(model, mode)].

    Raises:
        argparse.ArgumentTypeError: an entry without `:`.
    """
    cells = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        model, sep, mode = part.rpartition(":")
        if not sep or not model or not mode:
            raise argparse.ArgumentTypeError(f"{part!r}: expected MODEL:MODE")
        cells.append((model, mode))
    return cells


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], default=None,
                    help="keep the default cells of these models")
    ap.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m], default=None,
                    help="keep the default cells of these precision modes")
    ap.add_argument("--cells", type=parse_cells, default=None, help="MODEL:MODE,... (instead of the defaults)")
    ap.add_argument("--fresh", action="store_true", help="redo cells already in compile.json")
    ap.add_argument("--keep", action="store_true", help="keep each cell's artifacts folder")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="kill a cell after this many seconds")
    ap.add_argument("--output-dir", type=Path, default=Path("engines/compile-cost"),
                    help="parent of the per-cell artifact folders")
    add_out_argument(ap)
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags passed to every compile")
    args = ap.parse_args(argv)
    args.extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    cells = args.cells or [c for c in DEFAULT_CELLS if (args.models is None or c[0] in args.models)
                           and (args.modes is None or c[1] in args.modes)]
    if not cells:
        ap.error("no cell selected: check --models / --modes / --cells")
    args.cell_list = cells
    return args


def stage_timings(report_path: Path) -> dict[str, dict[str, float]]:
    """{stage: {"seconds", "peak_rss_mib"}} from report.json's `timings` ({} when absent)."""
    try:
        timings = json.loads(report_path.read_text()).get("timings", {})
    except (OSError, ValueError):
        return {}
    seconds, rss = timings.get("seconds", {}), timings.get("peak_rss_mib", {})
    return {s: {"seconds": seconds[s], "peak_rss_mib": rss.get(s)} for s in seconds}


def _children_cpu_s() -> float:
    """User + system CPU seconds of every waited-for child process tree so far (getrusage)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def find_report(folder: Path, mode: str) -> Path:
    """The variant's report.json in a cell's fresh folder (the one variant compiled there, its
    folder named after the mode; a bundle's copy is not it)."""
    found = sorted(p for p in folder.rglob("report.json") if "bundle" not in p.parts)
    named = [p for p in found if p.parent.name == mode]
    return (named or found or [folder / "report.json"])[0]


def run_cell(model: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Compile one cell from scratch in a subprocess; its row."""
    weights = weights_of(model)
    folder = args.output_dir / f"{model.replace('/', '--')}-{weights}-{mode}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cmd = [sys.executable, "-m", "compiler", "compile", "--no-build", "--model", model, "--weights", weights,
           "--precision", mode, "--output-dir", str(folder), *args.extra]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    load_start = load_average()
    log = args.out / "compile_logs" / f"{folder.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cpu_before = _children_cpu_s()
    measured = measure(cmd, 0.2, log=log, env=env, timeout_s=args.timeout_s)
    cpu_s = round(_children_cpu_s() - cpu_before, 1)
    stages = stage_timings(find_report(folder, mode))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    code = measured["returncode"]
    inside = sum(s["seconds"] for s in stages.values())
    return {"model": model, "weights": weights, "mode": mode, "status": "ok" if code == 0 else "failed",
            "exit_code": code, "wall_s": measured["wall_s"], "cpu_s": cpu_s,
            "outside_stages_s": round(measured["wall_s"] - inside, 1) if stages else None, "peak_tree_rss_mib": measured["peak_tree_rss_mib"],
            "peak_single_rss_mib": measured["peak_single_rss_mib"], "stages": stages,
            "load_average_start": load_start, "load_average_end": load_average(),
            "cpu": {"model": cpu_model(), "features": cpu_features()},  # rows of one file may come from several machines
            "command": " ".join(cmd),
            "log": str(log)}


def table(rows: list[dict[str, Any]]) -> str:
    """One line per cell: total wall time, peak tree RSS, each stage's seconds (peak RSS)."""
    from compiler.results import STAGES

    order = {s: i for i, s in enumerate(STAGES)}
    stages = sorted(dict.fromkeys(s for r in rows for s in r["stages"]), key=lambda s: order.get(s, len(order)))
    lines = []
    for r in rows:
        cells = [f"{r['stages'][s]['seconds']:.1f} s ({r['stages'][s]['peak_rss_mib']} MiB)" if s in r["stages"]
                 else "-" for s in stages]
        lines.append([r["model"], r["weights"], r["mode"], r["status"], f"{r['wall_s']:.1f} s",
                      f"{r['cpu_s']:.1f} s" if r.get("cpu_s") is not None else "-",
                      f"{r['peak_tree_rss_mib']:,} MiB", *cells, r["load_average_start"][0]
                      if r["load_average_start"] else "-"])
    return markdown_table(["model", "weights", "mode", "status", "wall", "CPU", "peak tree RSS",
                           *[f"{s} s (RSS)" for s in stages], "load avg"], lines, "llllrrr" + "r" * len(stages) + "r")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from compiler.artifacts import write_bytes, write_json

    path = args.out / "compile.json"
    old = [] if args.fresh or not path.is_file() else json.loads(path.read_text()).get("rows", [])
    rows = {(r["model"], r["mode"]): r for r in old}
    machine = {"cpu": cpu_model(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
               "usable_cores": usable_cores(), "versions": library_versions(),
               "note": "a shared machine: load averages per row"}
    for model, mode in args.cell_list:
        if (model, mode) in rows and rows[model, mode]["status"] == "ok" and rows[model, mode]["stages"]:
            print(f"{model} {mode}: kept from {path}")
            continue
        print(f"{model} {mode}: compiling from scratch ...", flush=True)
        rows[model, mode] = run_cell(model, mode, args)
        r = rows[model, mode]
        print(f"  {r['status']} (exit {r['exit_code']}), {r['wall_s']:.0f} s, peak {r['peak_tree_rss_mib']} MiB",
              flush=True)
        write_json(path, {"machine": machine, "rows": list(rows.values())})
    result = {"machine": machine, "rows": list(rows.values())}
    write_json(path, result)
    text = table(result["rows"])
    print("\n" + text + f"\n\nwrote {path}")
    write_bytes(args.out / "compile.md", (text + "\n").encode())
    return result


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
