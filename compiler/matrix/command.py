"""`python -m compiler matrix SPEC.yaml`: the subcommand's arguments and what it prints.

Exit status: 0 every cell done; 2 none failed but some wait for a GPU target no worker offers
(their bundles are prepared); 1 a cell failed (the report names it and why) or the spec is
invalid.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from compiler.errors import EXIT_BAD_INPUT, EXIT_NO_TENSORRT, EXIT_OK


def add_matrix_arguments(p: argparse.ArgumentParser) -> None:
    """The `matrix` subcommand's arguments."""
    p.add_argument("spec", type=Path, help="the matrix spec (YAML; docs/matrix.md)")
    p.add_argument("--address", default=None,
                   help="a Ray cluster, e.g. ray://head:10001 (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--retries", type=int, default=None,
                   help="tries after the first for a failing task (default: the spec's, else 1); bad input "
                        "is never retried")
    p.add_argument("--fresh", action="store_true",
                   help="run every cell again instead of reusing the last report's finished cells")
    p.add_argument("--out", default=None, help="artifact root (default: the spec's output_dir, else engines)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: the spec's, else all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: counts, each failed or waiting cell's reason, the outputs."""
    c = report["counts"]
    lines = [f"matrix {report['name']}: {len(report['cells'])} cells, {c['done']} done ({c['reused']} reused), "
             f"{c['waiting']} waiting, {c['failed']} failed in {report['wall_seconds']:.1f} s"]
    for cell in report["cells"]:
        if cell["status"] != "done":
            lines.append(f"  {cell['status']}: {cell['id']}: {cell.get('error')}")
    repo = report.get("repository") or {}
    if repo.get("path"):
        lines.append(f"Triton model repository: {repo['path']}")
    return "\n".join(lines)


def matrix_command(args: argparse.Namespace) -> int:
    """Run the matrix of `args.spec`; print the summary and where the report is; return the exit status.

    Raises:
        compiler.errors.CompilerError: an invalid spec, Ray missing or unreachable (exit 1).
    """
    from compiler.errors import CompilerError
    from compiler.matrix.runner import run_matrix
    from compiler.matrix.spec import load_spec

    if args.retries is not None and args.retries < 0:
        raise CompilerError(f"--retries {args.retries}: expected 0 or more")
    spec = load_spec(args.spec)
    run = run_matrix(spec, spec_path=str(args.spec), address=args.address, retries=args.retries, fresh=args.fresh,
                     out=args.out, num_cpus=args.num_cpus, progress=not args.no_progress)
    print(summary(run.report))
    print(f"report: {run.json_path}\ntable: {run.markdown_path}")
    counts = run.report["counts"]
    if counts["failed"]:
        return EXIT_BAD_INPUT
    return EXIT_NO_TENSORRT if counts["waiting"] else EXIT_OK
