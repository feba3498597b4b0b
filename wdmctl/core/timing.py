"""Timing on CPU and GPU: median wall time (CUDA events on a GPU), peak memory, GPU time per kernel and per
kernel category. What every benchmark measures with."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


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


class PeakMemory:
    """Peak CUDA memory of everything run inside `with PeakMemory() as memory:`, in GiB (None on CPU):
    `allocated` (live tensors) and `reserved` (what the process holds from the GPU: the caching allocator's
    segments, a CUDA graph's private pool among them).

    The peak counters are reset once, on entry, never after: a CUDA-graph replay allocates nothing (its
    tensors live in the pool its capture filled), so a peak read over replays alone, after a reset that
    follows the capture, sees only what stays alive between steps: WDM-B/2's weights, gradients and AdamW
    state, ~2 GiB against the 11-15 GiB of its eager step (issue 16). Put the capture inside."""

    allocated: float | None = None
    reserved: float | None = None

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available() and exc[0] is None:
            torch.cuda.synchronize()
            self.allocated = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            self.reserved = round(torch.cuda.max_memory_reserved() / 2**30, 2)

    def as_dict(self) -> dict[str, float | None]:
        return {"peak_memory_gib": self.allocated, "peak_reserved_gib": self.reserved}


def profile_kernels(fn: Callable[[], Any], iters: int = 5) -> list[dict[str, Any]]:
    """GPU time per kernel name, largest first, via torch.profiler: `gpu_us` is the kernel's time per call of fn
    (a training step, a denoiser call) summed over its launches in that call, `launches` their number."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if cuda_us > 0 and evt.count > 0:
            rows.append({"kernel": evt.key[:80], "gpu_us": round(cuda_us / iters, 1),
                         "launches": evt.count // iters})
    return sorted(rows, key=lambda row: -row["gpu_us"])


# Kernel-name fragments per category, checked in this order (first match wins).
KERNEL_CATEGORIES = (
    # ours (the segmented scan's passes are _seg_*), mamba-ssm's, and ONNX Runtime's LinearAttention, which the
    # linear-attention export runs the scan as
    ("selective scan", ("_scan_", "_seg_", "selective_scan", "_pack_bc", "linearattention", "linear_attention")),
    # before the convs: cuDNN's fused attention is named cudnn_generated_..._sdpa_... (on the H200 it was filed
    # under "2-D conv" while that came first)
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    # the mixer's 2-D conv: ours, and PyTorch's depthwise kernels (cuDNN's for channels-last inputs); before conv1d,
    # whose fragments are in our kernels' names
    ("2-D conv", ("_grid_conv_", "depthwise", "cudnn", "conv2d")),
    ("causal conv1d", ("conv1d", "_conv_fwd_kernel", "_conv_bwd_kernel")),   # causal-conv1d's and ours
    ("matmul (GEMM)", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_", "ampere_", "splitk")),
    ("optimizer", ("multi_tensor", "adam", "fused_adam")),
    ("reductions", ("reduce_kernel", "norm", "reduction")),
)


def kernel_category(name: str) -> str:
    lower = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(f in lower for f in fragments):
            return category
    return "elementwise, copies, other"


def step_profile(rows: list[dict[str, Any]], wall_ms: float) -> dict[str, Any]:
    """Group `profile_kernels` rows by category: GPU ms per step in each, kernel launches, and how much of the
    wall time the GPU was busy (well under 1 means the host's launches are the limit)."""
    categories: dict[str, dict[str, float]] = {}
    for row in rows:
        c = categories.setdefault(kernel_category(row["kernel"]), {"gpu_ms": 0.0, "launches": 0})
        c["gpu_ms"] += row["gpu_us"] / 1e3
        c["launches"] += row["launches"]
    gpu_ms = sum(c["gpu_ms"] for c in categories.values())
    ordered = dict(sorted(((k, {"gpu_ms": round(v["gpu_ms"], 3), "share": round(v["gpu_ms"] / gpu_ms, 3) if gpu_ms else 0.0,
                                "launches": int(v["launches"])}) for k, v in categories.items()),
                          key=lambda kv: -kv[1]["gpu_ms"]))
    return {"wall_ms": round(wall_ms, 3), "gpu_ms": round(gpu_ms, 3),
            "gpu_busy": round(gpu_ms / wall_ms, 3) if wall_ms else None,
            "launches": sum(v["launches"] for v in ordered.values()), "categories": ordered, "top_kernels": rows[:10]}


def peak_memory_gib(fn: Callable[[], Any]) -> float | None:
    """Peak CUDA memory allocated while running fn() once, in GiB (None on CPU)."""
    with PeakMemory() as memory:
        fn()
    return memory.allocated
