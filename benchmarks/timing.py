"""Shared by the benchmark scripts: time alternatives side by side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn within each repeat so that all see the same machine."""
    for function in functions.values():
        function()  # warm-up: imports, caches, allocator
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
