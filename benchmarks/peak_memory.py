"""Run a command and measure its wall time and the peak resident memory of its whole process tree.

`/usr/bin/time -v` reports the largest single process; when a stage runs in a child process
(activation statistics do), the memory that counts is parent + children at the same moment.
This samples /proc every 0.2 s and sums RSS over the tree (Linux only).

    python -m benchmarks.peak_memory --json engines/benchmarks/auto_bert_large.json -- \
        make onnx MODEL=bert-large WEIGHTS=random PRECISION=auto ARGS="--calib-samples 256"

Prints one table row and writes JSON (`--json FILE`, default `<out>/peak_memory.json`): command,
exit status, wall_s, peak_tree_rss_mib, peak_single_rss_mib.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import add_out_argument, markdown_table
from compiler.artifacts import write_json


def tree_rss_kib(root: int) -> tuple[int, int]:
    """(sum of VmRSS over `root` and all its descendants, largest single VmRSS), KiB, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/status") as f:
                kib = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = kib
    total, largest, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        largest = max(largest, rss.get(pid, 0))
        todo.extend(children.get(pid, []))
    return total, largest


def measure(cmd: list[str], interval: float, log: Path | None = None, env: dict[str, str] | None = None,
            timeout_s: float | None = None) -> dict[str, object]:
    """Run `cmd`, sampling the process tree's RSS every `interval` s until it exits.

    Args:
        cmd: the command and its arguments.
        interval: sampling interval, s.
        log: a file for the command's stdout and stderr (default: this process's).
        env: the command's environment (default: this process's).
        timeout_s: kill the command (and record return code -9) after this many seconds.
    """
    start = time.perf_counter()
    out = open(log, "w") if log else None
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env)
        peak_tree = peak_single = 0
        while proc.poll() is None:
            tree, single = tree_rss_kib(proc.pid)
            peak_tree, peak_single = max(peak_tree, tree), max(peak_single, single)
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                proc.kill()
                proc.wait()
                break
            time.sleep(interval)
    finally:
        if out:
            out.close()
    return {"command": cmd, "returncode": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_tree_rss_mib": peak_tree // 1024, "peak_single_rss_mib": peak_single // 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the result here (default <out>/peak_memory.json)")
    add_out_argument(ap)
    ap.add_argument("--interval", type=float, default=0.2, help="sampling interval, s")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    r = measure(cmd, args.interval)
    print(markdown_table(["command", "exit", "wall", "peak tree RSS", "largest process"],
                         [[" ".join(cmd), r["returncode"], f"{r['wall_s'] / 60:.1f} min",
                           f"{r['peak_tree_rss_mib']} MiB", f"{r['peak_single_rss_mib']} MiB"]]))
    print(f"wrote {write_json(args.json or args.out / 'peak_memory.json', r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
