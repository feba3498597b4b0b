"""`wdmctl bench inception`: FID Inception throughput, uint8 batch to features and the network alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from wdmctl.core.timing import time_fn
from wdmctl.fid.inception import PREPROCESSING, InceptionExtractor, ieee_fp32, preprocess


def benchmark_throughput(extractor: InceptionExtractor, resolution: int = 256, batch_size: int = 200,
                         iters: int = 10) -> dict[str, Any]:
    """Images/s of the whole path (uint8 host batch -> features on host) and of the network alone."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, resolution, resolution, 3), dtype=np.uint8)
    extractor.batch_size = batch_size
    end_to_end_ms = time_fn(lambda: extractor(images), warmup=2, iters=iters)
    prepared = preprocess(torch.from_numpy(images).to(extractor.device).permute(0, 3, 1, 2))

    def network_only():
        with ieee_fp32(), torch.inference_mode():
            extractor.network(prepared)

    network_ms = time_fn(network_only, warmup=2, iters=iters)
    return {
        "benchmark": "inception",
        "inception": extractor.info,
        "preprocessing": PREPROCESSING,
        "batch_size": batch_size,
        "resolution": resolution,
        "iters": iters,
        "end_to_end_ms_per_batch": round(end_to_end_ms, 3),
        "end_to_end_images_per_s": round(batch_size / end_to_end_ms * 1e3, 1),
        "network_only_ms_per_batch": round(network_ms, 3),
        "network_only_images_per_s": round(batch_size / network_ms * 1e3, 1),
    }
