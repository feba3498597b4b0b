"""`wdmctl bench sample`: images/s of whole sampling runs (denoiser + solver) per preset and scan backend."""

from __future__ import annotations

from typing import Any

import torch

from wdmctl.core.timing import PeakMemory, time_fn
from wdmctl.diffusion.sampler import model_denoiser, sample_images
from wdmctl.diffusion.schedule import make_noise_scheduler
from wdmctl.models.presets import build_model
from wdmctl.models.summary import patch_tokens

WARMUP_STEPS = 2  # the untimed first run: compiles, tunes the Triton kernels and captures the graphs per shape


def benchmark_sampling(preset: str, scan_backend: str | None, batch: int, steps: int = 50, cfg: float = 1.0,
                       precision: str = "bf16", iters: int = 2, resolution: int = 32,
                       cuda_graph: bool = False, **model_overrides: Any) -> dict[str, Any]:
    """Images/s and peak memory of a full `steps`-step DPM-Solver++ run (denoiser + solver, no autoencoder
    decode) for a randomly initialised preset; cfg != 1 doubles the denoiser batch, as guided sampling does.
    An untimed WARMUP_STEPS-step run first (the same shapes, so everything a first call does happens there;
    with `cuda_graph` the denoiser's graphs are captured in it), then `iters` timed runs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(preset, sample_size=resolution, **model_overrides).to(device).eval()
    if scan_backend and model.is_mamba:
        model.set_scan_backend(scan_backend)
    cfg_m = model.config
    labels = list(range(batch)) if cfg_m.num_classes else None
    scheduler_config = dict(make_noise_scheduler().config)
    denoiser = model_denoiser(model, precision, cuda_graph)

    def run(n_steps=steps):
        sample_images(model, scheduler_config, None, list(range(batch)), labels, steps=n_steps, cfg=cfg,
                      batch_size=batch, device=device, precision=precision, denoiser=denoiser)

    with PeakMemory() as memory:   # the graphs' capture inside (PeakMemory)
        run(min(steps, WARMUP_STEPS))
        ms = time_fn(run, warmup=0, iters=iters)
    tokens = patch_tokens(model, resolution)
    del model, denoiser
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"preset": preset, "scan_backend": scan_backend if cfg_m.arch != "uvit" else None,
            "scan": cfg_m.scan if cfg_m.arch != "uvit" else None,
            "mixer_conv": cfg_m.mixer_conv if cfg_m.arch != "uvit" else None, "batch": batch,
            "resolution": resolution, "tokens": tokens,
            "steps": steps, "cfg": cfg, "precision": precision, "cuda_graph": cuda_graph, "seconds_per_batch": round(ms / 1e3, 3),
            "images_per_second": round(batch / ms * 1e3, 2), **memory.as_dict()}
