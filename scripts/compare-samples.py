#!/usr/bin/env python
"""Compare two folders of samples image by image (the same file names, e.g. `wdmctl sample` with the same seeds
through two backends): PSNR over all of them, the largest per-pixel difference in uint8 levels, and the share
of pixel values that differ by more than one level. One JSON object on stdout (psnr_db null when identical).

    python scripts/compare-samples.py samples/torch samples/onnx
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def load(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
            for p in sorted(folder.glob("*.png")) if p.name != "grid.png"}


def compare(a: Path, b: Path) -> dict:
    first, second = load(a), load(b)
    if not first:
        raise ValueError(f"{a} holds no sample PNGs")
    if set(first) != set(second):
        only = sorted(set(first) ^ set(second))[:3]
        raise ValueError(f"{a} and {b} hold different images (e.g. {', '.join(only)})")
    diff = np.stack([first[name] - second[name] for name in first])   # shapes must match per image
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    # identical images have no finite PSNR: null, with "identical" saying why (JSON has no infinity)
    return {"images": len(first), "identical": mse == 0,
            "psnr_db": None if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 2),
            "max_abs_levels": int(np.abs(diff).max()), "share_over_one_level": float(np.mean(np.abs(diff) > 1)),
            "a": str(a), "b": str(b)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    try:
        print(json.dumps(compare(args.a, args.b)))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
