#!/usr/bin/env python3
"""Stripes, measured, for images on disk: the stripe score of wdmctl/fid/stripes.py (the share of the images'
energy in their strongest high frequency, a period of at most 2P pixels for patch size P), with the period
and direction of that frequency, and the edge detail (detail along the four edge lines relative to the
average line). FID during training and `wdmctl fid` record the same numbers.

    python scripts/periodic-texture.py --patch 2 SAMPLES_DIR... GRID.png... [--size 32] [--max-period 8] [--json]

A folder is read as one image per file (grid.png skipped); a PNG as a grid that wdmctl drew
(wdmctl/core/images.save_grid: 10 columns, 2 px padding, enlarged by a whole factor) of SIZE-px images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from wdmctl.core.images import GRID_PADDING
from wdmctl.fid.stripes import StripeMeter


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


def stripe_score(images: list[np.ndarray], max_period: float) -> dict:
    meter = StripeMeter(max_period)
    for image in images:
        meter.add(image[None])
    return meter.result()


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
        result = {"path": str(path), **stripe_score(images, max_period)}
        print(json.dumps(result) if args.json else
              f"{path}: {100 * result['share']:.2f}% of the energy in one frequency {tuple(result['frequency'])} "
              f"({result['stripes']} stripes, period {result['period_px']} px); all periods <= {max_period:g} px: "
              f"{100 * result['high_share']:.1f}% ({len(images)} images); edge detail "
              + " ".join(f"{edge} {value:.2f}" for edge, value in result["edge_detail"].items()))


if __name__ == "__main__":
    main()
