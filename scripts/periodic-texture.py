#!/usr/bin/env python3
"""Stripes, measured: how much of a set of images' detail sits in one periodic pattern.

Each image's spectrum (per channel, mean removed, summed over channels) is normalised to unit energy and the
normalised spectra are averaged over the images. Stripes or a lattice that a model draws into every image put
a large share of that energy into one high frequency; natural images spread theirs. The score is the largest
share held by one high frequency (a +-k pair), where "high" means a period of at most 2P pixels for patch
size P (a lattice left by the patchify grid, or a stripe two patches wide). The period and direction of that
frequency are printed beside it.

    python scripts/periodic-texture.py --patch 2 SAMPLES_DIR... GRID.png... [--size 32] [--max-period 8] [--json]

A folder is read as one image per file (grid.png skipped); a PNG as a grid that wdmctl drew
(wdmctl/core/images.save_grid: 10 columns, 2 px padding, enlarged by a whole factor) of SIZE-px images.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

GRID_PADDING = 2  # wdmctl/core/images.save_grid's default


def grid_cells(path: Path, size: int) -> list[np.ndarray]:
    grid = np.asarray(Image.open(path).convert("RGB"))
    columns = 10
    native = columns * (size + GRID_PADDING) + GRID_PADDING
    factor = grid.shape[1] // native
    if factor < 1 or grid.shape[1] != factor * native:
        sys.exit(f"error: {path} is not a 10-column grid of {size}-px images ({grid.shape[1]} px wide)")
    grid = grid[::factor, ::factor]
    rows = (grid.shape[0] - GRID_PADDING) // (size + GRID_PADDING)
    step = size + GRID_PADDING
    return [grid[GRID_PADDING + r * step:GRID_PADDING + r * step + size,
                 GRID_PADDING + c * step:GRID_PADDING + c * step + size] for r in range(rows) for c in range(columns)]


def images_of(path: Path, size: int) -> list[np.ndarray]:
    if path.is_file():
        return grid_cells(path, size)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"} and p.name != "grid.png")
    if not files:
        sys.exit(f"error: {path} holds no .png or .jpg images")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def mean_spectrum(images: list[np.ndarray]) -> np.ndarray:
    total = 0.0
    for image in images:
        x = image.astype(np.float64)
        x -= x.mean(axis=(0, 1), keepdims=True)
        power = (np.abs(np.fft.fft2(x, axes=(0, 1))) ** 2).sum(axis=2)
        total = total + power / max(power.sum(), 1e-12)
    return total / len(images)


def strongest_high_frequency(spectrum: np.ndarray, max_period: float) -> dict:
    h, w = spectrum.shape
    ky, kx = np.fft.fftfreq(h) * h, np.fft.fftfreq(w) * w
    # period 1 / |f| <= max_period pixels, |f| in cycles per pixel
    high = np.hypot(ky[:, None] / h, kx[None, :] / w) >= 1 / max_period - 1e-9
    masked = np.where(high, spectrum, 0.0)
    i, j = np.unravel_index(np.argmax(masked), masked.shape)
    pair = masked[i, j] + (masked[-i % h, -j % w] if (-i % h, -j % w) != (i, j) else 0.0)
    fy, fx = ky[i] / h, kx[j] / w
    period = 1 / math.hypot(fy, fx)
    angle = (math.degrees(math.atan2(fy, fx)) + 180) % 180   # direction of the wave vector: 0 = varies along x
    return {"share": float(pair), "frequency": [int(ky[i]), int(kx[j])], "period_px": round(period, 2),
            "stripes": "vertical" if angle in (0.0, 180.0) else "horizontal" if angle == 90.0 else "diagonal",
            "high_share": float(masked.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--patch", type=int, default=2, help="patch size: high frequencies have periods <= 2P px")
    parser.add_argument("--max-period", type=float, default=0, help="count periods up to this many px instead "
                                                                      "of 2P (wider stripes)")
    parser.add_argument("--size", type=int, default=32, help="image side of a grid PNG's cells")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for path in args.paths:
        if not path.exists():
            sys.exit(f"error: {path} does not exist")
        images = images_of(path, args.size)
        max_period = args.max_period or 2 * args.patch
        result = {"path": str(path), "images": len(images), "max_period_px": max_period,
                  **strongest_high_frequency(mean_spectrum(images), max_period)}
        print(json.dumps(result) if args.json else
              f"{path}: {100 * result['share']:.2f}% of the energy in one frequency {tuple(result['frequency'])} "
              f"({result['stripes']} stripes, period {result['period_px']} px); all periods <= {max_period:g} px: "
              f"{100 * result['high_share']:.1f}% ({len(images)} images)")


if __name__ == "__main__":
    main()
