"""Run a command and measure its wall time and the peak resident memory of its whole process tree.

`/usr/bin/time -v` reports the largest single process; when a stage runs in a child process
(activation statistics do), the memory that counts is parent + children at the same moment.
This samples /proc every 0.2 s and sums RSS over the tree (Linux only).

    python benchmarks/peak_memory.py --json engines/benchmarks/auto_bert_large.json -- \
        make onnx MODEL=bert-large WEIGHTS=random PRECISION=auto ARGS="--calib-samples 256"

Prints one table row and writes JSON: command, exit status, wall_s, peak_tree_rss_mib,
peak_single_rss_mib.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _tree_rss_kib(root: int) -> tuple[int, int]:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--interval", type=float, default=0.2, help="sampling interval, s")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak_tree = peak_single = 0
    while proc.poll() is None:
        tree, single = _tree_rss_kib(proc.pid)
        peak_tree, peak_single = max(peak_tree, tree), max(peak_single, single)
        time.sleep(args.interval)
    wall = time.perf_counter() - start
    result = {"command": cmd, "returncode": proc.returncode, "wall_s": round(wall, 1),
              "peak_tree_rss_mib": peak_tree // 1024, "peak_single_rss_mib": peak_single // 1024}
    print(f"| {' '.join(cmd)} | exit {proc.returncode} | {wall / 60:.1f} min | "
          f"peak tree RSS {peak_tree / 1024:.0f} MiB | largest process {peak_single / 1024:.0f} MiB |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
