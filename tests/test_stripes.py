"""The stripe score (wdmctl/fid/stripes.py): it finds a planted periodic pattern with its period and
direction, leaves natural-looking images low, and gives the same answer batch by batch as all at once."""

from __future__ import annotations

import numpy as np
import pytest

from wdmctl.fid.stripes import StripeMeter, normalised_spectra


def smooth_images(n: int, seed: int = 0) -> np.ndarray:
    """Blurry blobs: natural images' spectra fall with frequency."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 4, 4, 3))
    return np.clip(coarse.repeat(8, 1).repeat(8, 2) + rng.normal(0, 4, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


def score(images: np.ndarray, max_period: float = 4) -> dict:
    meter = StripeMeter(max_period)
    meter.add(images)
    return meter.result()


@pytest.mark.parametrize("rows,cols,frequency,direction,period", [
    (slice(1, None, 2), slice(None), (16, 0), "horizontal", 2.0),     # every other row: horizontal stripes
    (slice(None), slice(1, None, 4), (0, 8), "vertical", 4.0),        # every fourth column, two patches wide
])
def test_a_planted_pattern_is_found_with_its_period_and_direction(rows, cols, frequency, direction, period):
    images = smooth_images(20)
    striped = images.astype(float)
    striped[:, rows, cols] += 60
    striped = np.clip(striped, 0, 255).astype(np.uint8)
    found, clean = score(striped), score(images)
    assert tuple(abs(f) for f in found["frequency"]) == frequency
    assert found["stripes"] == direction and found["period_px"] == period
    assert found["share"] > 10 * clean["share"] and clean["share"] < 0.02
    assert found["images"] == 20 and found["max_period_px"] == 4


def test_wider_stripes_are_found_only_with_a_longer_period_window():
    images = smooth_images(10).astype(float)
    images[:, :, (np.arange(32) // 3) % 2 == 1] += 60      # vertical stripes 6 px apart
    images = np.clip(images, 0, 255).astype(np.uint8)
    assert score(images, 4)["period_px"] <= 4
    wide = score(images, 8)
    assert wide["period_px"] == pytest.approx(6.4, abs=0.1) and wide["stripes"] == "vertical"
    assert wide["share"] > score(images, 4)["share"]


def test_batches_give_the_same_score_as_all_at_once_and_pass_through_unchanged():
    images = smooth_images(12, seed=3)
    batches = [images[:5], images[5:9], images[9:]]
    meter = StripeMeter()
    passed = list(meter.tap(iter(batches)))
    assert all(a is b for a, b in zip(passed, batches))
    batched, whole = meter.result(), score(images)
    assert batched["frequency"] == whole["frequency"] and batched["share"] == pytest.approx(whole["share"])
    assert meter.result()["images"] == 12


def test_edge_detail_finds_artefacts_along_one_edge():
    images = smooth_images(10, seed=4)
    clean = score(images)["edge_detail"]
    dripping = images.copy()
    dripping[:, 0, ::2] = 0                              # every other pixel of the top row black
    dripping[:, 0, 1::2] = 255
    edges = score(dripping)["edge_detail"]
    assert edges["top"] > 5 and edges["top"] > 5 * clean["top"]
    assert max(edges["bottom"], edges["left"], edges["right"]) < 1.5


def test_flat_and_grey_images_are_handled():
    flat = np.full((2, 8, 8, 3), 128, np.uint8)
    assert normalised_spectra(flat).sum() == 0                       # no energy: zeros, not NaN
    grey = smooth_images(3)[..., :1][..., 0]                         # (N, H, W) without a channel axis
    assert normalised_spectra(grey).shape == (3, 32, 32)
    meter = StripeMeter()
    with pytest.raises(ValueError, match="no images"):
        meter.result()
    meter.add(smooth_images(1))
    with pytest.raises(ValueError, match=r"images of \(16, 16\) px after images of \(32, 32\) px"):
        meter.add(smooth_images(1)[:, :16, :16])
