"""Small helpers the project-side benchmarks share (the peer's script, in its own venv, uses none).

The scripts are run as `python bench/<name>.py`, so `bench/` is on sys.path
and they import this as `common`.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from pathlib import Path

# CPU features that decide which GEMM kernels the libraries pick.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


def spread(values, digits: int = 3) -> dict:
    """min/median/max, the form every figure of these benchmarks takes."""
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}


def cpu_threads() -> int:
    """The cores this process may run on: the thread count the runtime gives onnxruntime."""
    from ptbundle.runtime.onnx_backend import default_threads

    return default_threads()


def machine_info() -> dict:
    """CPU model, cores, memory, SIMD flags and load, read from /proc where there is one."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cores": cpu_threads()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = {}
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's values
        info["cpu_model"] = fields.get("model name")
        flags = set(fields.get("flags", "").split())
        info["simd"] = [f for f in SIMD_FLAGS if f in flags]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total = next((l for l in meminfo.read_text().splitlines() if l.startswith("MemTotal:")), None)
        if total:
            info["memory_gb"] = round(int(total.split()[1]) / 2**20, 1)
    if hasattr(os, "getloadavg"):
        # Other work on the machine slows every figure: the load before the run says whether there was any.
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return info


def every_kth(items, k: int) -> list:
    """An evenly spaced subset: MR test lists all negative reviews, then all positive,
    so a prefix would be one label only; every k-th item keeps both and all lengths."""
    return list(items[::k]) if k > 1 else list(items)


def subset_name(total: int, k: int) -> str:
    return f"all {total}" if k <= 1 else f"every {k}th of {total} ({math.ceil(total / k)})"
