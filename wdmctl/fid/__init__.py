"""FID for wdmctl: the standard Inception, reference statistics with provenance, scoring, precision/recall.

The API the rest of the toolkit uses:

    compute_reference(src, resolution, out=None, ...) -> Path       statistics of an image source (cached)
    score_images(images | path, ref, num_expected, allow_small, ...) -> dict
    load_samples(path) -> (SampleSet, labels | None)               folder of PNGs or ADM npz

Scoring a training run (sampling, then this) is an application: wdmctl/apps/fid.py.
The protocol (weights, resize, float64, 50k default, cache key) is described in docs/fid.md.
"""

from wdmctl.fid.reference import compute_reference, load_reference, save_reference
from wdmctl.fid.samples import FidWarning, SampleSet, load_samples
from wdmctl.fid.score import DEFAULT_NUM, score_images
from wdmctl.fid.stats import FeatureStats, frechet_distance, precision_recall

__all__ = [
    "DEFAULT_NUM", "FeatureStats", "FidWarning", "SampleSet", "compute_reference",
    "frechet_distance", "load_reference", "load_samples", "precision_recall", "save_reference", "score_images",
]
