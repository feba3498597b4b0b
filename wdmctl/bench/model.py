"""`wdmctl bench model`: forward and training-step throughput and peak memory of a preset."""

from __future__ import annotations

from typing import Any

import torch

from wdmctl.core.timing import peak_memory_gib, time_fn
from wdmctl.models.presets import build_model


def benchmark_model(preset: str, scan_backend: str | None, batch: int, resolution: int | None = None,
                    dtype: torch.dtype = torch.bfloat16, iters: int = 10, warmup: int = 3,
                    compile_model: bool = False) -> dict[str, Any]:
    """Forward and train-step throughput (images/s) and peak memory of one preset on the current device.

    Train step = forward + backward + AdamW step with fp32 weights under `dtype` autocast (what training
    does without Accelerate's bookkeeping). Out-of-memory is reported, not raised.
    """
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
