"""Shared benchmark helpers: CUDA-event timing, device description, JSON output."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from wdmctl.errors import WdmError


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


def profile_kernels(fn: Callable[[], Any], iters: int = 5) -> list[dict[str, Any]]:
    """GPU time per kernel name (microseconds per call of fn), largest first, via torch.profiler."""
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
            rows.append({"kernel": evt.key[:80], "us_per_call": round(cuda_us / iters, 1),
                         "launches": evt.count // iters})
    return sorted(rows, key=lambda row: -row["us_per_call"])


# Kernel-name fragments per category, checked in this order (first match wins).
KERNEL_CATEGORIES = (
    ("selective scan", ("_scan_", "selective_scan", "_pack_bc")),
    ("causal conv1d", ("conv1d", "_conv_fwd_kernel", "_conv_bwd_kernel")),   # causal-conv1d's and ours
    ("attention", ("flash", "fmha", "attention", "sdpa")),
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
        c["gpu_ms"] += row["us_per_call"] / 1e3
        c["launches"] += row["launches"]
    gpu_ms = sum(c["gpu_ms"] for c in categories.values())
    ordered = dict(sorted(((k, {"gpu_ms": round(v["gpu_ms"], 3), "share": round(v["gpu_ms"] / gpu_ms, 3) if gpu_ms else 0.0,
                                "launches": int(v["launches"])}) for k, v in categories.items()),
                          key=lambda kv: -kv[1]["gpu_ms"]))
    return {"wall_ms": round(wall_ms, 3), "gpu_ms": round(gpu_ms, 3),
            "gpu_busy": round(gpu_ms / wall_ms, 3) if wall_ms else None,
            "launches": sum(v["launches"] for v in ordered.values()), "categories": ordered, "top_kernels": rows[:10]}


def write_json(path: str | Path | None, payload: dict[str, Any]) -> str:
    """Add the device description, print and optionally write the JSON; returns the text."""
    payload = {"device": device_info(), **payload}
    text = json.dumps(payload, indent=2)
    if path:
        from wdmctl.pipeline import write_json_atomic

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(path), payload)
    return text


def benchmark_model(preset: str, scan_backend: str | None, batch: int, resolution: int | None = None,
                    dtype: torch.dtype = torch.bfloat16, iters: int = 10, warmup: int = 3,
                    compile_model: bool = False) -> dict[str, Any]:
    """Forward and train-step throughput (images/s) and peak memory of one preset on the current device.

    Train step = forward + backward + AdamW step with fp32 weights under `dtype` autocast (what training
    does without Accelerate's bookkeeping). Out-of-memory is reported, not raised.
    """
    from wdmctl.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(preset).to(device)
    if scan_backend and model.is_mamba:
        model.set_scan_backend(scan_backend)
    cfg = model.config
    side = resolution or cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, side, side, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=device) if cfg.num_classes else None
    net = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    result: dict[str, Any] = {"preset": preset, "arch": cfg.arch, "scan_backend": scan_backend if model.is_mamba else None,
                              "batch": batch, "input": [cfg.in_channels, side, side], "dtype": str(dtype).split(".")[-1],
                              "parameters": sum(p.numel() for p in model.parameters())}

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            net(x, t, y)

    def train_step():
        with torch.autocast(device.type, dtype=dtype):
            loss = (net(x, t, y).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name, fn in (("forward", forward), ("train_step", train_step)):
        try:
            model.train(name == "train_step")
            ms = time_fn(fn, warmup=warmup, iters=iters)
            result[name] = {"ms": round(ms, 3), "images_per_second": round(batch / ms * 1e3, 1),
                            "peak_memory_gib": peak_memory_gib(fn)}
        except torch.OutOfMemoryError:
            result[name] = {"error": "out of memory"}
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    del model, net, opt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def parse_cuda_graphs(text: str) -> list[bool]:
    """`--cuda-graphs off|on|off,on` -> [False], [True], [False, True]."""
    modes = {"off": False, "on": True}
    words = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in words if w not in modes]
    if bad or not words:
        raise WdmError(f"--cuda-graphs takes off, on or off,on, not {text!r}")
    return [modes[w] for w in words]


def benchmark_sampling(preset: str, scan_backend: str | None, batch: int, steps: int = 50, cfg: float = 1.0,
                       precision: str = "bf16", iters: int = 2, resolution: int = 32,
                       cuda_graph: bool = False, **model_overrides: Any) -> dict[str, Any]:
    """Images/s of a full `steps`-step DPM-Solver++ run (denoiser + solver, no autoencoder decode) for a
    randomly initialised preset; cfg != 1 doubles the denoiser batch, as guided sampling does. With
    `cuda_graph` the denoiser replays CUDA graphs (captured in the untimed first run)."""
    from wdmctl.diffusion import make_noise_scheduler
    from wdmctl.models import build_model
    from wdmctl.sampling import model_denoiser, sample_images

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(preset, sample_size=resolution, **model_overrides).to(device).eval()
    if scan_backend and model.is_mamba:
        model.set_scan_backend(scan_backend)
    cfg_m = model.config
    labels = list(range(batch)) if cfg_m.num_classes else None
    scheduler_config = dict(make_noise_scheduler().config)
    denoiser = model_denoiser(model, precision, cuda_graph)

    def run():
        sample_images(model, scheduler_config, None, list(range(batch)), labels, steps=steps, cfg=cfg,
                      batch_size=batch, device=device, precision=precision, denoiser=denoiser)

    ms = time_fn(run, warmup=1, iters=iters)
    del model, denoiser
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"preset": preset, "scan_backend": scan_backend if cfg_m.arch != "uvit" else None,
            "scan": cfg_m.scan if cfg_m.arch != "uvit" else None, "batch": batch,
            "resolution": resolution,
            "steps": steps, "cfg": cfg, "precision": precision, "cuda_graph": cuda_graph, "seconds_per_batch": round(ms / 1e3, 3),
            "images_per_second": round(batch / ms * 1e3, 2)}
