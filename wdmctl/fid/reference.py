"""Reference statistics: computing them from an image source, the `.npz` format with provenance, the cache,
and the check that a reference was made the way samples are scored now.

A reference file holds `mu` (2048,) and `sigma` (2048, 2048) in float64, `provenance` (a JSON string) and,
when asked for precision/recall, `features` (a random subset of the real Inception features, float32).
Foreign statistics (pytorch-fid/EDM/ADM `mu`/`sigma`, lucidrains `m2`/`s2`) load too, without provenance.

References are cached under `<cache>/fid-refs/<key>.npz`, the key hashing the source fingerprint (file
names and sizes, so a changed dataset gets new statistics), resolution, crop, preprocessing, Inception
weights hash and the number of stored features.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from wdmctl.core.hashing import sha256_json
from wdmctl.core.io import replace_atomically
from wdmctl.core.version import __version__
from wdmctl.data.sources import center_crop_resize, open_source
from wdmctl.errors import WdmError
from wdmctl.fid.inception import file_sha256, load_inception, user_cache_dir
from wdmctl.fid.stats import FeatureStats

REFERENCE_FORMAT = "wdmctl-fid-ref/1"
CROP = "adm-center-crop: box-halve, bicubic short side, center crop (wdmctl.data.sources.center_crop_resize)"
PR_FEATURES = 10_000  # real features stored for precision/recall when asked (ADM keeps 10k reference images)
REF_BATCH = 100

ProgressFn = Callable[[int, int], None]  # (images done, total)


@dataclass
class ReferenceStats:
    """Loaded reference statistics; `provenance` is None for foreign files."""

    path: Path
    mu: np.ndarray
    sigma: np.ndarray
    provenance: dict[str, Any] | None
    features: np.ndarray | None

    @property
    def resolution(self) -> int | None:
        return (self.provenance or {}).get("resolution")

    def sha256(self) -> str:
        return file_sha256(self.path)


def reference_cache_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or user_cache_dir()) / "fid-refs"


def reference_key(fingerprint: str, resolution: int, preprocessing: str, inception_sha256: str,
                  pr_features: int) -> str:
    """Cache key: everything that changes the statistics."""
    parts = {"fingerprint": fingerprint, "resolution": resolution, "crop": CROP, "preprocessing": preprocessing,
             "inception_sha256": inception_sha256, "pr_features": pr_features}
    return sha256_json(parts)[:20]


def _refuse_existing(path: Path | None, overwrite: bool) -> None:
    if path is not None and path.exists() and not overwrite:
        raise WdmError(f"{path} exists; pass --overwrite to replace it")


def save_reference(path: str | Path, mu: np.ndarray, sigma: np.ndarray, provenance: dict[str, Any],
                   features: np.ndarray | None = None, overwrite: bool = False) -> Path:
    """Write a reference `.npz` atomically; refuses to replace an existing file unless `overwrite`."""
    path = Path(path)
    _refuse_existing(path, overwrite)
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
              "provenance": np.array(json.dumps(provenance, sort_keys=True))}
    if features is not None and len(features):
        arrays["features"] = np.asarray(features, np.float32)
    replace_atomically(path, lambda f: np.savez(f, **arrays))
    return path


def load_reference(path: str | Path) -> ReferenceStats:
    """Read reference statistics: ours with provenance, or foreign `mu`/`sigma` (`m2`/`s2`) files."""
    path = Path(path)
    if not path.is_file():
        raise WdmError(f"reference statistics {path} do not exist (make them with `wdmctl fid ref SRC --out {path}`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            mu_key, sigma_key = ("mu", "sigma") if {"mu", "sigma"} <= keys else ("m2", "s2")
            if not {mu_key, sigma_key} <= keys:
                raise WdmError(f"{path} holds no FID statistics (expected mu and sigma, found {sorted(keys)})")
            mu, sigma = data[mu_key].astype(np.float64), data[sigma_key].astype(np.float64)
            provenance = json.loads(str(data["provenance"])) if "provenance" in keys else None
            features = data["features"] if "features" in keys else None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise WdmError(f"cannot read reference statistics {path}: {err}") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise WdmError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    if provenance is not None and provenance.get("format") != REFERENCE_FORMAT:
        raise WdmError(f"{path} has format {provenance.get('format')!r}; this wdmctl reads {REFERENCE_FORMAT}")
    return ReferenceStats(path, mu, sigma, provenance, features)


def check_reference(ref: ReferenceStats, extractor) -> list[str]:
    """Refuse statistics made with other Inception weights or other preprocessing than `extractor`'s;
    return warnings (statistics of unknown origin)."""
    if len(ref.mu) != extractor.dims:
        raise WdmError(f"{ref.path} has {len(ref.mu)}-d statistics; the FID Inception gives {extractor.dims}-d")
    if ref.provenance is None:
        return [f"{ref.path} carries no wdmctl provenance (pytorch-fid/ADM/EDM-style statistics): the FID is "
                f"comparable only if they used the same Inception, resize and crop as `wdmctl fid` "
                f"(see docs/fid.md)"]
    made_with = ref.provenance.get("inception", {})
    if made_with.get("sha256") != extractor.info["sha256"]:
        raise WdmError(f"mismatched statistics: {ref.path} was computed with Inception weights "
                       f"{str(made_with.get('sha256'))[:12]}... ({made_with.get('source')}), now "
                       f"{extractor.info['sha256'][:12]}... ({extractor.info['source']}); recompute it with "
                       f"`wdmctl fid ref` or pass --inception {made_with.get('file', 'FILE')}")
    if ref.provenance.get("preprocessing") != extractor.preprocessing:
        raise WdmError(f"mismatched statistics: {ref.path} was computed with preprocessing "
                       f"{ref.provenance.get('preprocessing')!r}, this wdmctl uses {extractor.preprocessing!r}; "
                       f"recompute it with `wdmctl fid ref`")
    return []


def _source_batches(source, resolution: int, batch_size: int):
    """Yield uint8 NHWC batches of the source, preprocessed exactly as `wdmctl cache` does."""
    batch = []
    for index in range(len(source)):
        try:
            batch.append(center_crop_resize(source.open(index), resolution))
        except (OSError, ValueError) as err:
            raise WdmError(f"cannot decode {source.keys[index]}: {err}") from None
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def compute_reference(src: str, resolution: int, out: str | Path | None = None, *, inception: str | Path | None = None,
                      device: str | None = None, batch_size: int = REF_BATCH, overwrite: bool = False,
                      recompute: bool = False, pr_features: int = 0, cache_dir: Path | None = None,
                      extractor=None, on_progress: ProgressFn | None = None) -> Path:
    """Statistics of every image of SRC (folder, archive or `digits`) at `resolution`, center-cropped as
    `wdmctl cache` does. Served from the cache when the same source, resolution, preprocessing and weights
    were seen before; written to `out` too when given. Returns the path of the statistics."""
    out = Path(out) if out is not None else None
    _refuse_existing(out, overwrite)
    if resolution < 1:
        raise WdmError(f"--resolution must be positive, got {resolution}")
    source = open_source(src)
    if len(source) < 2:
        raise WdmError(f"{src} holds {len(source)} image(s); reference statistics need at least 2")
    extractor = extractor or load_inception(inception, device, batch_size)
    pr_features = min(pr_features, len(source))
    fingerprint = source.fingerprint()
    key = reference_key(fingerprint, resolution, extractor.preprocessing, extractor.info["sha256"], pr_features)
    cached = reference_cache_dir(cache_dir) / f"{key}.npz"
    if recompute or not _usable(cached):
        # a random (fixed-seed) subset: sources are sorted by class, so the first N would miss classes
        keep = set(np.random.default_rng(0).choice(len(source), pr_features, replace=False).tolist())
        stats = FeatureStats(extractor.dims, keep=keep)
        for batch in _source_batches(source, resolution, batch_size):
            stats.add(extractor(batch))
            if on_progress:
                on_progress(stats.count, len(source))
        mu, sigma = stats.mean_cov()
        provenance = {
            "format": REFERENCE_FORMAT, "source": src, "source_description": source.description,
            "source_fingerprint": fingerprint, "count": stats.count, "resolution": resolution, "crop": CROP,
            "preprocessing": extractor.preprocessing, "inception": extractor.info, "features_stored": len(keep),
            "tool": f"wdmctl {__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cache_key": key,
        }
        # the cache entry is ours and keyed by content, so replacing it is always safe
        save_reference(cached, mu, sigma, provenance, stats.kept, overwrite=True)
    if out is None:
        return cached
    with open(cached, "rb") as src_file:
        replace_atomically(out, lambda f: shutil.copyfileobj(src_file, f))
    return out


def _usable(path: Path) -> bool:
    """A cache entry that exists and loads (a truncated or foreign file is recomputed)."""
    if not path.is_file():
        return False
    try:
        load_reference(path)
    except WdmError:
        return False
    return True


def resolve_reference(spec: str | Path, resolution: int | None, **kwargs) -> Path:
    """A recipe's or user's `ref`: an existing `.npz` is used as is; anything else is an image source whose
    statistics are built (or taken from the cache) at `resolution`."""
    path = Path(spec).expanduser()
    if path.suffix == ".npz":
        if not path.is_file():
            raise WdmError(f"reference statistics {path} do not exist")
        return path
    if resolution is None:
        raise WdmError(f"building reference statistics from {spec!r} needs a resolution ([fid] resolution "
                       f"in the recipe)")
    return compute_reference(str(spec), resolution, **kwargs)
