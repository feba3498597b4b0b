"""`wdmctl bench cache`: encoding throughput of the autoencoders `wdmctl cache` uses."""

from __future__ import annotations

from typing import Any

import torch

from wdmctl.core.timing import peak_memory_gib, time_fn
from wdmctl.models.autoencoders import load_autoencoder, random_taef2, sd_vae_sized_autoencoder


def benchmark_encode(taef2_dir: str | None = None, resolution: int = 256, batch_size: int = 64,
                     dtype: torch.dtype = torch.bfloat16, warmup: int = 3, iters: int = 10) -> dict[str, Any]:
    """Encoding throughput (images/s) of an SD-VAE-sized AutoencoderKL and of TAEF2 at one batch size."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    images = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    candidates = {"sd-vae (AutoencoderKL, SD config, random weights)": lambda: sd_vae_sized_autoencoder(device, dtype)}
    if taef2_dir:
        candidates["taef2 (weights)"] = lambda: load_autoencoder(f"taef2:{taef2_dir}", device, dtype)
    else:
        candidates["taef2 (random weights)"] = lambda: random_taef2(device, dtype)
    results = {}
    for name, build in candidates.items():
        autoencoder = build()
        ms = time_fn(lambda: autoencoder.encode_moments(images), warmup=warmup, iters=iters)
        results[name] = {
            "ms_per_batch": round(ms, 3),
            "images_per_s": round(batch_size / (ms / 1e3), 2),
            "peak_memory_gib": peak_memory_gib(lambda: autoencoder.encode_moments(images)),
            "latent_shape": autoencoder.latent_shape(resolution),
        }
        del autoencoder
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"benchmark": "cache-encode", "resolution": resolution, "batch_size": batch_size,
            "dtype": str(dtype).removeprefix("torch."), "results": results}
