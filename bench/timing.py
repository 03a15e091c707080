"""Per-call wall times for the benchmarks: CUDA events on a GPU, ``time.perf_counter`` on the CPU."""

from __future__ import annotations

import time

import torch


def call_times_ms(fn, iters: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn()`` (one sample per call; on a GPU each sample waits
    for the call's kernels)."""
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t))
    return out
