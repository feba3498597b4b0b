"""Images out: float [-1, 1] tensors to uint8, and uint8 batches to one PNG grid (written atomically)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from wdmctl.core.io import write_bytes_atomic


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC, rounded to nearest (127.5 x + 128, floored, clamped)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


GRID_MIN_WIDTH = 512  # small images (8 px digits, 32 px CIFAR) are enlarged to be seen without zooming
GRID_PADDING = 2  # white pixels between and around the images of a grid


def save_grid(images: np.ndarray, path: str | Path, columns: int | None = None, padding: int = GRID_PADDING,
              min_width: int = GRID_MIN_WIDTH) -> Path:
    """Tile uint8 NHWC images into one PNG (about square), written atomically. A grid narrower than
    `min_width` is enlarged by the smallest whole factor that reaches it, each pixel a solid square (no
    smoothing: what is drawn is exactly what was sampled)."""
    from PIL import Image  # here: importing PIL costs the CLI's start-up and most callers never draw

    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = img
    factor = math.ceil(min_width / grid.shape[1])
    if factor > 1:
        grid = grid.repeat(factor, axis=0).repeat(factor, axis=1)
    png = io.BytesIO()
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(png, format="PNG")
    return write_bytes_atomic(path, png.getbuffer())
