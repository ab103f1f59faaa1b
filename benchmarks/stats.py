"""Numbers a benchmark reports: latency summaries, peak memory, the machine it ran on.

Latency summaries use the median and nearest-rank percentiles (no interpolation: with
5 runs, p99 is the slowest run, not a number nobody measured). Memory is sampled by a
background thread while the measured calls run, because the process-wide peak
(``ru_maxrss``) cannot be reset between the two pipelines that share the process.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of ``values``."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """p50/p90/p99, mean, spread (std, min, max) in milliseconds, plus the raw runs."""
    vals = [float(s) for s in seconds]
    return {
        "n": len(vals),
        "p50_ms": statistics.median(vals) * 1e3,
        "p90_ms": percentile(vals, 90) * 1e3,
        "p99_ms": percentile(vals, 99) * 1e3,
        "mean_ms": statistics.fmean(vals) * 1e3,
        "std_ms": (statistics.stdev(vals) if len(vals) > 1 else 0.0) * 1e3,
        "min_ms": min(vals) * 1e3,
        "max_ms": max(vals) * 1e3,
        "runs_ms": [v * 1e3 for v in vals],
    }


def ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator > 0 else None


class MemorySampler:
    """Peak resident memory (and used GPU memory where torch sees a GPU) while active.

    ``with sampler.window(): ...`` samples every ``interval`` seconds in a thread and
    keeps the maximum seen over all windows. RSS counts the whole process, so in a
    benchmark that holds our pipeline and the baseline in one process, each side's
    figure includes the other's resident weights; the JSON says so.
    """

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.rss_peak = 0
        self.gpu_peak: int | None = None
        self._stop = threading.Event()
        self._gpu = _gpu_used_bytes() is not None

    def _sample(self) -> None:
        self.rss_peak = max(self.rss_peak, int(self._proc.memory_info().rss))
        if self._gpu:
            used = _gpu_used_bytes()
            if used is not None:
                self.gpu_peak = max(self.gpu_peak or 0, used)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def window(self) -> _Window:
        return _Window(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rss_peak_mb": round(self.rss_peak / 2**20, 1),
            "gpu_used_peak_mb": round(self.gpu_peak / 2**20, 1) if self.gpu_peak is not None else None,
        }


class _Window:
    def __init__(self, sampler: MemorySampler):
        self.s = sampler
        self._thread: threading.Thread | None = None

    def __enter__(self) -> None:
        self.s._stop.clear()
        self.s._sample()
        self._thread = threading.Thread(target=self.s._loop, name="bench-memory", daemon=True)
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self.s._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.s._sample()


def _gpu_used_bytes() -> int | None:
    """Device-wide used memory of the current CUDA device (covers torch, ORT and TensorRT)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return int(total - free)
    except (RuntimeError, AssertionError, OSError):  # a broken CUDA install: no GPU figure, no failure
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: /proc/cpuinfo flags that decide which CPU kernels (and precisions) can run natively.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8")


def cpu_isa() -> dict[str, Any]:
    """The CPU's instruction sets that matter to the benchmark's sides, from /proc/cpuinfo.

    ``native_bf16``: AVX512_BF16 or AMX-BF16. Without it torch *emulates* bf16 on the CPU (seen:
    diffusers' bf16 pipeline 27x slower than fp32 on an AVX2-only EPYC) and OpenVINO builds fp32
    engines for a bf16 request, so the bench skips those sides there and says why.
    """
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "flags": [f for f in ISA_FLAGS if f in flags],
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": bool({"amx_tile", "amx_bf16", "amx_int8"} & flags),
        "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "source": "/proc/cpuinfo" if flags else "unknown (no /proc/cpuinfo flags)",
    }


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    import psutil

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_isa": cpu_isa(),
        "gpu": None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except (RuntimeError, AssertionError, OSError) as exc:
        logging.getLogger(__name__).debug("no GPU name: %s", exc)
    return info
