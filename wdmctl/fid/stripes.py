"""Stripes, measured: how much of a set of images' detail sits in one periodic pattern.

Each image's power spectrum (per channel, mean removed, summed over channels) is normalised to unit energy,
and the normalised spectra are averaged over the images. A model that draws the same stripes or lattice into
every image puts a large share of that average into one high frequency; natural images spread theirs. The
score is the largest share held by one high frequency (a +-k pair), "high" meaning a period of at most
`max_period` pixels: 2P for patch size P catches a lattice left by the patchify grid or stripes two patches
wide. On 400 CIFAR-10 training images it is 0.36%; docs/results.md has what the models score.

Beside it, edge detail: the detail (mean squared difference between neighbouring pixels) along each of the
four edge lines, relative to the image's average line: a model that draws artefacts where its scans start or
end (the first or last rows or columns) scores high there. Natural images score low at their edges (CIFAR-10:
0.5-0.6, the subject sits in the middle).

`StripeMeter` accumulates batches as they stream past (`tap`), so the FID of a run and FID during training
get the score of the very images they score, at the cost of one FFT per image.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np

STRIPE_PATCH = 2  # the presets' patch size: periods of at most 2P = 4 px


def as_float_images(images: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) uint8/float images as float64 (N, H, W, C), without a copy when they already are."""
    x = np.asarray(images, dtype=np.float64)
    return x[..., None] if x.ndim == 3 else x


def normalised_spectra(images: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) uint8/float images -> their (H, W) power spectra, each summed over channels and scaled to
    unit energy (a flat image contributes zeros)."""
    x = as_float_images(images)
    x = x - x.mean(axis=(1, 2), keepdims=True)   # not in place: x may be the caller's array
    power = (np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2).sum(axis=3)
    total = power.sum(axis=(1, 2), keepdims=True)
    return np.divide(power, total, out=np.zeros_like(power), where=total > 0)


def strongest_high_frequency(spectrum: np.ndarray, max_period: float) -> dict:
    """The high frequency (period <= max_period px) holding most of a mean normalised spectrum: its share (the
    +-k pair), frequency (cycles per image, y then x), period, the stripes' direction, and the share of all
    high frequencies together."""
    h, w = spectrum.shape
    ky, kx = np.fft.fftfreq(h) * h, np.fft.fftfreq(w) * w
    high = np.hypot(ky[:, None] / h, kx[None, :] / w) >= 1 / max_period - 1e-9
    masked = np.where(high, spectrum, 0.0)
    # each frequency with its mirror -k (a real image's spectrum is symmetric); a frequency that is its own
    # mirror (a Nyquist row or column) counts once
    mirrored = masked[(-np.arange(h)) % h][:, (-np.arange(w)) % w]
    self_mirror = (np.arange(h)[:, None] % (h / 2) == 0) & (np.arange(w)[None, :] % (w / 2) == 0)
    pairs = np.where(self_mirror, masked, masked + mirrored)
    i, j = np.unravel_index(np.argmax(pairs), pairs.shape)
    share = pairs[i, j]
    fy, fx = ky[i] / h, kx[j] / w
    angle = (math.degrees(math.atan2(fy, fx)) + 180) % 180   # the wave vector's direction: 0 = varies along x
    return {"share": float(share), "frequency": [int(ky[i]), int(kx[j])],
            "period_px": round(1 / math.hypot(fy, fx), 2),
            "stripes": "vertical" if angle in (0.0, 180.0) else "horizontal" if angle == 90.0 else "diagonal",
            "high_share": float(masked.sum()), "max_period_px": max_period}


class StripeMeter:
    """The stripe score of images seen one batch at a time."""

    def __init__(self, max_period: float = 2 * STRIPE_PATCH):
        self.max_period = max_period
        self.total: np.ndarray | None = None
        self.row_detail = self.column_detail = 0.0   # summed over images: detail along each row / column
        self.count = 0

    def add(self, images: np.ndarray) -> None:
        x = as_float_images(images)   # converted once, for the spectra and the edge detail
        spectra = normalised_spectra(x)
        if self.total is not None and spectra.shape[1:] != self.total.shape:
            raise ValueError(f"images of {spectra.shape[1:]} px after images of {self.total.shape} px")
        batch_sum = spectra.sum(axis=0)
        self.total = batch_sum if self.total is None else self.total + batch_sum
        self.row_detail = self.row_detail + (np.diff(x, axis=2) ** 2).mean(axis=(2, 3)).sum(axis=0)
        self.column_detail = self.column_detail + (np.diff(x, axis=1) ** 2).mean(axis=(1, 3)).sum(axis=0)
        self.count += len(spectra)

    def tap(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Pass `batches` through unchanged, measuring each."""
        for images in batches:
            self.add(images)
            yield images

    def result(self) -> dict:
        if not self.count:
            raise ValueError("no images were measured")
        rows = self.row_detail / max(self.row_detail.mean(), 1e-12)
        columns = self.column_detail / max(self.column_detail.mean(), 1e-12)
        edges = {"top": rows[0], "bottom": rows[-1], "left": columns[0], "right": columns[-1]}
        return {**strongest_high_frequency(self.total / self.count, self.max_period), "images": self.count,
                "edge_detail": {edge: round(float(value), 3) for edge, value in edges.items()}}
