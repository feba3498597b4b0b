"""Scoring generated images against reference statistics: the one function behind `fid calc`, `fid` on a run
and any in-training evaluation."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from wdmctl.core.version import __version__
from wdmctl.errors import WdmError
from wdmctl.fid.inception import as_uint8_nhwc, load_inception
from wdmctl.fid.reference import PR_FEATURES, ProgressFn, check_reference, load_reference
from wdmctl.fid.samples import FidWarning, SampleSet, load_samples
from wdmctl.fid.stats import FeatureStats, frechet_distance, precision_recall

DEFAULT_NUM = 50_000  # the convention (ADM, DiT, EDM): FID is biased upwards with fewer images
PR_K = 3


def _too_few(found: int, wanted: int) -> WdmError:
    return WdmError(f"only {found} images, fewer than --num {wanted}: FID is biased upwards with fewer images; "
                    f"generate more or pass --allow-small")


def score_images(images: Iterable[np.ndarray] | str | Path, ref: str | Path, num_expected: int | None = DEFAULT_NUM,
                 allow_small: bool = False, *, pr: bool = False, k: int = PR_K, inception: str | Path | None = None,
                 device: str | None = None, batch_size: int = 100, extractor=None,
                 on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """FID of `images` against the reference statistics `ref`.

    `images` is an iterable of uint8 NHWC batches (e.g. a sampler's output) or a path (folder of PNGs or ADM
    npz, see `load_samples`). The first `num_expected` images are scored (None: all); fewer is an error
    unless `allow_small`. Statistics made with other Inception weights or preprocessing are refused, and so
    are samples at another resolution than the reference's. With `pr`, improved precision/recall (k-NN,
    `k`) on up to 10,000 features per side; the reference must store features (`fid ref --pr`).
    """
    reference = load_reference(ref)
    found_warnings: list[str] = []
    samples_info: dict[str, Any] | None = None
    if isinstance(images, (str, Path)):
        images, _ = load_samples(images)  # warns about JPEG samples
    if isinstance(images, SampleSet):
        found_warnings += images.warnings
        samples_info = {"path": str(images.path), "format": images.kind, "found": images.count,
                        "resolution": [images.height, images.width]}
        if num_expected is not None and images.count < num_expected and not allow_small:
            raise _too_few(images.count, num_expected)
        _check_resolution(reference, (images.height, images.width))
    extractor = extractor or load_inception(inception, device, batch_size)
    for message in check_reference(reference, extractor):
        warnings.warn(message, FidWarning, stacklevel=2)
        found_warnings.append(message)
    if pr and (reference.features is None or len(reference.features) <= k):
        raise WdmError(f"precision/recall needs reference features: rebuild {reference.path} with "
                       f"`wdmctl fid ref ... --pr`")

    stats = FeatureStats(extractor.dims, keep=PR_FEATURES if pr else 0)
    total = num_expected or 0
    if isinstance(images, SampleSet):
        total = min(total or images.count, images.count)
    for batch in images:
        batch = as_uint8_nhwc(batch)
        if stats.count == 0:
            _check_resolution(reference, batch.shape[1:3])
        if num_expected is not None:
            batch = batch[:num_expected - stats.count]
        stats.add(extractor(batch))
        if on_progress:
            on_progress(stats.count, total)
        if num_expected is not None and stats.count >= num_expected:
            break
    if num_expected is not None and stats.count < num_expected and not allow_small:
        raise _too_few(stats.count, num_expected)
    mu, sigma = stats.mean_cov()

    result: dict[str, Any] = {
        "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma),
        "num": stats.count,
        "num_expected": num_expected,
        "allow_small": allow_small,
        "small": num_expected is not None and stats.count < num_expected,
        "samples": samples_info,
        "ref": {"path": str(reference.path), "sha256": reference.sha256(),
                "count": (reference.provenance or {}).get("count"),
                "source": (reference.provenance or {}).get("source"), "resolution": reference.resolution,
                "provenance": reference.provenance is not None},
        "inception": extractor.info,
        "preprocessing": extractor.preprocessing,
        "tool": f"wdmctl {__version__}",
        "warnings": found_warnings,
    }
    if pr:
        precision, recall = precision_recall(reference.features, stats.kept, k)
        result.update(precision=precision, recall=recall, pr_k=k,
                      pr_num={"real": len(reference.features), "generated": len(stats.kept)})
    return result


def _check_resolution(reference, hw: tuple[int, int]) -> None:
    """Samples must be scored at the reference's resolution: both are upsampled to 299, and a 256 px sample
    against 64 px statistics measures the resize, not the model."""
    if reference.resolution is not None and tuple(hw) != (reference.resolution, reference.resolution):
        raise WdmError(f"samples are {hw[1]}x{hw[0]} but {reference.path} was computed at "
                       f"{reference.resolution}x{reference.resolution}; build a reference at the samples' "
                       f"resolution (`wdmctl fid ref SRC --resolution {hw[0]}`)")
