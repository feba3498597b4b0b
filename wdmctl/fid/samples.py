"""Generated samples to score: a folder of PNGs or an ADM-format `.npz` (`arr_0` uint8 NHWC, optional
`arr_1` labels), streamed in batches so 50k images at 256 px never sit in memory at once."""

from __future__ import annotations

import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from wdmctl.errors import WdmError

SAMPLE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}
JPEG_SUFFIXES = {".jpg", ".jpeg"}
LOAD_BATCH = 100


class FidWarning(UserWarning):
    """Something that biases or weakens a FID without making it wrong to compute (printed, and recorded
    in the score's `warnings`)."""


@dataclass
class SampleSet:
    """A known number of same-sized uint8 RGB images, iterated as NHWC batches of `batch_size`."""

    path: Path
    kind: str  # "folder" or "npz"
    count: int
    height: int
    width: int
    batch_size: int = LOAD_BATCH
    warnings: list[str] = field(default_factory=list)
    _files: list[Path] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.kind == "folder":
            return self._iter_folder()
        return _iter_npz_member(self.path, "arr_0.npy", self.batch_size)

    def _iter_folder(self) -> Iterator[np.ndarray]:
        # PNG decoding releases the GIL, so a few threads keep the Inception fed
        with ThreadPoolExecutor(max_workers=8) as pool:
            for start in range(0, self.count, self.batch_size):
                images = list(pool.map(_read_rgb, self._files[start:start + self.batch_size]))
                for path, image in zip(self._files[start:], images):
                    if image.shape[:2] != (self.height, self.width):
                        raise WdmError(f"{path} is {image.shape[1]}x{image.shape[0]} but {self._files[0].name} "
                                       f"is {self.width}x{self.height}; all samples must have one size")
                yield np.stack(images)


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise WdmError(f"cannot decode {path}: {err}") from None


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran_order) of the .npy stream `f`, leaving `f` at the first data byte."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(f)
    return shape, dtype, fortran_order


def _iter_npz_member(path: Path, member: str, batch_size: int) -> Iterator[np.ndarray]:
    """Read an array from an `.npz` in chunks of `batch_size` rows (works for stored and deflated members)."""
    with zipfile.ZipFile(path) as archive, archive.open(member) as f:
        shape, dtype, _ = _npy_header(f)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            rows = min(batch_size, shape[0] - start)
            buffer = f.read(rows * row_bytes)
            if len(buffer) != rows * row_bytes:
                raise WdmError(f"{path}: {member} is truncated")
            yield np.frombuffer(buffer, dtype=dtype).reshape((rows, *shape[1:]))


def _open_npz(path: Path) -> tuple[SampleSet, np.ndarray | None]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise WdmError(f"cannot read {path}: {err}") from None
    with archive:
        names = set(archive.namelist())
        if "arr_0.npy" not in names:
            raise WdmError(f"{path} has no arr_0 (the ADM sample format: uint8 NHWC images in arr_0)")
        with archive.open("arr_0.npy") as f:
            shape, dtype, fortran = _npy_header(f)
        labels = None
        if "arr_1.npy" in names:
            with archive.open("arr_1.npy") as f:
                labels = np.lib.format.read_array(f, allow_pickle=False)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise WdmError(f"{path}: arr_0 must be uint8 NHWC RGB (the ADM format), got {dtype} {shape}"
                       f"{' in Fortran order' if fortran else ''}")
    return SampleSet(path, "npz", shape[0], shape[1], shape[2]), labels


def _open_folder(path: Path) -> SampleSet:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SAMPLE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise WdmError(f"{path} holds no images ({', '.join(sorted(SAMPLE_SUFFIXES))})")
    height, width = _read_rgb(files[0]).shape[:2]
    samples = SampleSet(path, "folder", len(files), height, width, _files=files)
    jpegs = sum(p.suffix.lower() in JPEG_SUFFIXES for p in files)
    if jpegs:
        samples.warnings.append(f"{jpegs} of {len(files)} samples in {path} are JPEG: compression artefacts bias "
                                f"FID (clean-fid measured large shifts); save samples as PNG")
    return samples


def load_samples(path: str | Path) -> tuple[SampleSet, np.ndarray | None]:
    """Open a folder of images (recursively, sorted by path) or an ADM `.npz`; returns the streamable set and
    the labels (`arr_1` of an npz; None for folders). JPEG samples raise a `FidWarning`."""
    path = Path(path)
    if path.is_dir():
        samples, labels = _open_folder(path), None
    elif path.is_file() and path.suffix == ".npz":
        samples, labels = _open_npz(path)
    else:
        raise WdmError(f"samples {path} must be a folder of PNGs or an ADM .npz (arr_0 uint8 NHWC)")
    for message in samples.warnings:
        warnings.warn(message, FidWarning, stacklevel=2)
    return samples, labels
