"""Shared benchmark helpers: CUDA-event timing, device description, JSON output."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch


def device_info() -> dict[str, Any]:
    """What ran the benchmark: GPU name and memory, torch/CUDA versions, host."""
    info: dict[str, Any] = {"torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine())
    return info


def time_fn(fn: Callable[[], Any], warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of fn() in milliseconds (CUDA-synchronised on GPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_memory_gib(fn: Callable[[], Any]) -> float | None:
    """Peak CUDA memory allocated while running fn() once, in GiB (None on CPU)."""
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def write_json(path: str | Path | None, payload: dict[str, Any]) -> str:
    """Add the device description, print and optionally write the JSON; returns the text."""
    payload = {"device": device_info(), **payload}
    text = json.dumps(payload, indent=2)
    if path:
        from wdmctl.pipeline import write_json_atomic

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(path), payload)
    return text
