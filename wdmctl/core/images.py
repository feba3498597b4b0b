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


def save_grid(images: np.ndarray, path: str | Path, columns: int | None = None, padding: int = 2) -> Path:
    """Tile uint8 NHWC images into one PNG (about square), written atomically."""
    from PIL import Image  # here: importing PIL costs the CLI's start-up and most callers never draw

    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = img
    png = io.BytesIO()
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(png, format="PNG")
    return write_bytes_atomic(path, png.getbuffer())
