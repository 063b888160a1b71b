"""What the benchmarks record about the machine they ran on, and how they report repeated timings."""

from __future__ import annotations

import platform
import statistics
import subprocess


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` reports it (``platform.processor()`` is often empty on Linux)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def median_and_range(values: list[float], spec: str) -> str:
    """``median (min–max)`` of repeated measurements: a headline is the typical round, with its spread, never the
    best one."""
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.median(values), spec)} ({format(min(values), spec)}–{format(max(values), spec)})"
