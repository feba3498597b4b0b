"""`wdmctl bench train`: one full training step of a preset with random weights and data: images/s, peak
memory, optionally replayed as one CUDA graph and profiled by kernel category."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from wdmctl.core.precision import torch_dtype
from wdmctl.core.timing import PeakMemory, profile_kernels, step_profile, time_fn
from wdmctl.diffusion.schedule import make_noise_scheduler
from wdmctl.errors import WdmError
from wdmctl.models.presets import build_model
from wdmctl.models.summary import patch_tokens
from wdmctl.train.graphed import capture_train_step
from wdmctl.train.objective import alphas_cumprod, diffusion_loss, param_groups


def benchmark_train_step(preset: str, backend: str = "auto", batch_size: int = 32, resolution: int = 32,
                         precision: str = "bf16", iters: int = 10, warmup: int = 3,
                         gradient_checkpointing: bool = False, compile: bool = False, device: str | None = None,
                         profile: bool = False, cuda_graph: bool = False, **model_overrides: Any) -> dict[str, Any]:
    """Throughput (images/s) and peak memory of one full training step of `preset` with random weights and
    data: the loop's loss (`diffusion_loss`), backward, clipping and fused AdamW, under autocast as
    Accelerate runs it. `resolution` is the latent side (32 = 256 px with the SD VAE). `profile` (CUDA) adds
    where a step's GPU time goes, by kernel category (`wdmctl.core.timing.step_profile`). `cuda_graph` (CUDA)
    replays the whole step (loss, backward, clipping, AdamW) as one CUDA graph, which shows the step's speed
    without the host's ~2,700 kernel launches (`capture_train_step`)."""
    dtype = torch_dtype(precision)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cuda_graph and device.type != "cuda":
        raise WdmError("CUDA graphs need a CUDA device")
    torch.manual_seed(0)
    model = build_model(preset, sample_size=resolution, **model_overrides).to(device).train()
    if model.is_mamba:
        model.set_scan_backend(backend)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if compile:
        torch._dynamo.reset()   # a fresh compile per row: recompiles of earlier rows' models would hit Dynamo's
        model.compile()         # recompile limit and silently run eager
    optimizer = torch.optim.AdamW(param_groups(model, 0.03), lr=2e-4, betas=(0.99, 0.99), fused=device.type == "cuda",
                                  capturable=cuda_graph)
    c, n_classes = model.config.in_channels, model.config.num_classes
    x = torch.randn(batch_size, c, resolution, resolution, device=device)
    y = torch.randint(0, n_classes, (batch_size,), device=device) if n_classes else None
    abar = alphas_cumprod(make_noise_scheduler(), device)
    # a graph replays the default generator's RNG (offsets advance per replay); a private one would need registering
    generator = None if cuda_graph else torch.Generator(device).manual_seed(0)

    def update() -> None:
        # weight-cast cache off while capturing, as PyTorch asks of graphed autocast regions (make_graphed_callables
        # refuses it); an autocast region that opens and closes inside the capture, as train.cuda_graph's does
        # through Accelerate, clears its cache on exit and records the casts anyway
        autocast = (torch.autocast(device.type, dtype=dtype, cache_enabled=not cuda_graph) if dtype != torch.float32
                    else nullcontext())
        with autocast:
            loss = diffusion_loss(model, x, y, abar, generator, 0.1, n_classes or None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def step() -> None:
        update()
        optimizer.zero_grad(set_to_none=True)

    with PeakMemory() as memory:   # the capture inside: its graph's memory is the step's (PeakMemory)
        if cuda_graph:
            step = capture_train_step(update, optimizer)
        ms = time_fn(step, warmup=warmup, iters=iters)
    extra = {"profile": step_profile(profile_kernels(step), ms)} if profile and device.type == "cuda" else {}
    return {
        "preset": preset, "arch": model.config.arch, "backend": backend if model.is_mamba else "n/a (attention)",
        "scan": model.config.scan if model.is_mamba else None,
        "mixer_conv": model.config.mixer_conv if model.is_mamba else None,
        "batch_size": batch_size, "resolution": resolution, "tokens": patch_tokens(model, resolution),
        "latent": [c, resolution, resolution], "precision": precision,
        "gradient_checkpointing": gradient_checkpointing, "compile": compile, "cuda_graph": cuda_graph,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "ms_per_step": round(ms, 2), "images_per_s": round(batch_size / ms * 1e3, 1), **memory.as_dict(),
        **extra,
    }
