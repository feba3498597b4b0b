"""The EMA sample grids written during training (samples/grid-NNNNNNN.png), from fixed seeds and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wdmctl import config as cfg
from wdmctl.core.images import save_grid
from wdmctl.diffusion.sampler import Decoder, sample_images


def grid_labels(n: int, num_classes: int) -> list[int] | None:
    """Fixed labels of the sample grid: 0, 1, 2, ... cycling (each column one class when the grid is as wide
    as a multiple of the classes), or spread evenly over the classes when there are more classes than images."""
    if num_classes <= 0:
        return None
    if num_classes <= n:
        return [i % num_classes for i in range(n)]
    return [i * num_classes // n for i in range(n)]


class GridWriter:
    """EMA sample grids from fixed seeds and labels (samples/grid-NNNNNNN.png), on the main process."""

    def __init__(self, recipe: cfg.Recipe, manifest, run_dir: Path, device, precision: str, accelerator):
        s = recipe.sample
        self.recipe, self.manifest, self.run_dir, self.device, self.accelerator = recipe, manifest, run_dir, device, accelerator
        self.seeds = [s.seed + i for i in range(s.grid_n)]
        self.labels = grid_labels(s.grid_n, recipe.model.num_classes)
        self.precision = precision
        self.decoder = None

    def write(self, ema_model, scheduler_config: dict, step: int) -> Path:
        if self.decoder is None:  # loads the autoencoder once, on first use
            self.decoder = Decoder(self.manifest["autoencoder"], self.device)
        s = self.recipe.sample
        images = sample_images(ema_model, scheduler_config, self.manifest["autoencoder"], self.seeds, self.labels,
                               steps=s.steps, cfg=s.cfg, solver=s.solver,
                               batch_size=min(len(self.seeds), 64), device=self.device, precision=self.precision,
                               decoder=self.decoder)
        path = self.run_dir / "samples" / f"grid-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path)
        if self.accelerator.trackers:
            from PIL import Image  # here: only TensorBoard runs read the grid back

            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("samples/ema", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        return path
