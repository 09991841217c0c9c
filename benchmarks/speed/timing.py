"""The timing loop of one benchmark cell, as NVIDIA's `trtexec` does it, and the machine's facts.

trtexec (TensorRT's `samples/common/sampleOptions.cpp`, `sampleInference.cpp`) warms up for a
set time (`--warmUp`, 200 ms), then runs iterations until both a duration (`--duration`, 3 s)
and a count (`--iterations`, 10) are reached, and reports percentiles of the per-iteration
latency. Here the first iteration (untimed, part of the warm-up) also estimates the cell's
cost: a cell whose estimate passes its budget is not timed and says why.

Peak RSS is the process's high-water mark (VmHWM) during the cell, reset before it through
`/proc/self/clear_refs` (Linux 4.0+; elsewhere the peak since the process began). It holds the
whole process: the Python interpreter, the one backend loaded, its weights and activations.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class TimingPolicy:
    """How long one cell is timed.

    Attributes:
        warmup_s: warm-up time (s) before timing; at least the first iteration runs.
        duration_s: the least timed time (s).
        min_iterations: the least timed iterations.
        max_iterations: the most timed iterations (a tiny model's cells stop here).
        budget_s: the most a cell may cost (s); estimated as first iteration x
            (min_iterations + 1) + warmup_s before anything is timed.
    """

    warmup_s: float = 0.2
    duration_s: float = 1.0
    min_iterations: int = 5
    max_iterations: int = 1000
    budget_s: float = 60.0


@dataclass
class CellTiming:
    """What the loop measured (status "ok") or why it stopped (status "skipped")."""

    status: str
    reason: str = ""
    times_ms: list[float] | None = None
    first_ms: float = 0.0
    peak_rss_mib: float | None = None
    gpu_memory_mib: float | None = None


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (write "5" to /proc/self/clear_refs); False where
    the kernel does not allow it (the peak then runs from the process start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    """VmHWM of this process, MiB (None where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def time_cell(run: Callable[[], Any], policy: TimingPolicy,
              gpu_memory: Callable[[], float | None] = lambda: None) -> CellTiming:
    """Warm up, estimate, then time `run` (one inference, synchronized) by `policy`.

    Args:
        run: one iteration; it must return only when the result is ready (a GPU backend
            synchronizes inside it).
        policy: warm-up, duration, iteration counts and the cell's budget.
        gpu_memory: the backend's peak GPU memory (MiB) after the cell, or None.

    Returns:
        CellTiming with per-iteration latencies (ms) in `times_ms`, or status "skipped" and the
        reason when the first iteration says the cell would pass `policy.budget_s`.
    """
    reset_peak_rss()
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    estimate = first * (policy.min_iterations + 1) + policy.warmup_s
    if estimate > policy.budget_s:
        return CellTiming("skipped", f"over budget: first iteration {first:.2f} s, estimate {estimate:.1f} s "
                          f"> cell budget {policy.budget_s:g} s", first_ms=first * 1e3,
                          peak_rss_mib=peak_rss_mib())
    while time.perf_counter() - start < policy.warmup_s:
        run()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < policy.max_iterations:
        t0 = time.perf_counter()
        run()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        if len(times) >= policy.min_iterations and t1 - began >= policy.duration_s:
            break
    return CellTiming("ok", times_ms=times, first_ms=first * 1e3, peak_rss_mib=peak_rss_mib(),
                      gpu_memory_mib=gpu_memory())


def latency_stats(times_ms: list[float], batch: int, sequence: int) -> dict[str, float]:
    """p50/p90/p99/mean latency (ms, 3 decimals) and throughput at the mean latency (sequences/s,
    tokens/s = sequences/s x sequence) of one cell's timed iterations."""
    t = np.asarray(times_ms, np.float64)
    ms = lambda v: round(float(v), 3)  # noqa: E731
    mean = float(t.mean())
    return {"p50_ms": ms(np.percentile(t, 50)), "p90_ms": ms(np.percentile(t, 90)),
            "p99_ms": ms(np.percentile(t, 99)), "mean_ms": ms(mean),
            "throughput_seq_s": round(batch / mean * 1e3, 2),
            "throughput_tok_s": round(batch * sequence / mean * 1e3, 1)}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# the CPU features that change what a CPU run costs here: wide vectors, INT8 and BF16 dot products
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_features(cpuinfo: str | None = None) -> list[str]:
    """Which of `CPU_FEATURES` the CPU has (the `flags` line of /proc/cpuinfo, or `cpuinfo` when
    given; [] where it cannot be read): two machines with the same model name ("AMD EPYC") may
    differ, e.g. AVX2 only against AVX512-BF16, and PyTorch's BF16 training and ONNX Runtime's
    kernels with them."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
                  if line.lower().startswith("flags")), set())
    return [f for f in CPU_FEATURES if f in flags]


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other jobs on a shared machine show here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries a backend may use (None: not installed); imports nothing new
    except to read a version."""
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt",
                 "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def gpu_info() -> dict[str, Any]:
    """The first CUDA GPU (`compiler.build.device.find_gpu`, no PyTorch needed) or the reason there is none."""
    from compiler.build.device import find_gpu

    found = find_gpu()
    if isinstance(found, str):
        return {"name": None, "reason": found}
    return {"name": found.name, "compute_capability": found.compute_capability,
            "driver_cuda": found.driver_version}


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, cores, the fixed thread count, GPU, platform, library versions and the load
    average at the start (the run adds the one at the end)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable_cores(), "threads": threads,
            "gpu": gpu_info(), "platform": platform.platform(), "versions": library_versions(),
            "load_average_start": load_average()}
