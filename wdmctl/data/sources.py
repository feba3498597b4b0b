"""Image sources shared by `wdmctl cache` and `wdmctl fid ref`: a folder, a .tar/.tar.gz/.zip of one,
or the built-in `digits`; and the one preprocessing both use (ADM/DiT center crop).

A source lists its images once (sorted, so the order and the fingerprint are stable) and opens them one
at a time. Class labels come from the first folder level below the root when every image sits in a
sub-folder (sorted names -> ids); a flat folder is unconditional.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from wdmctl.errors import WdmError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}
BUILTIN_SOURCES = ("digits",)


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM/DiT preprocessing: RGB; box-halve while at least 2x too large; bicubic so the short side is
    `resolution`; center crop. Returns uint8 (resolution, resolution, 3). Smaller images are upscaled."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(max(resolution, round(s * scale)) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top:top + resolution, left:left + resolution])


@dataclass
class ImageSource:
    """A sorted list of images with optional class labels; `open(i)` decodes image i."""

    description: str
    keys: list[str]
    labels: list[int] | None
    class_names: list[str]
    _reader: Callable[[str], Image.Image]
    _fingerprint_parts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def open(self, index: int) -> Image.Image:
        """Decode image `index`; raises OSError/ValueError (PIL's) for corrupt files."""
        image = self._reader(self.keys[index])
        image.load()
        return image

    def fingerprint(self) -> str:
        """sha256 over names, sizes and labels: changes when the dataset changes, cheap to compute."""
        h = hashlib.sha256(self.description.encode())
        for part in self._fingerprint_parts:
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]


def _labels_from_paths(paths: list[str]) -> tuple[list[int] | None, list[str]]:
    """Class per first-level folder when every image is inside one; otherwise unconditional."""
    parts = [p.split("/") for p in paths]
    if not paths or any(len(p) < 2 for p in parts):
        return None, []
    names = sorted({p[0] for p in parts})
    index = {n: i for i, n in enumerate(names)}
    return [index[p[0]] for p in parts], names


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not Path(name).name.startswith(".")


def _strip_common_root(names: list[str]) -> tuple[list[str], str]:
    """Archives often hold one top folder (`train/cls/x.jpg`): drop it so classes are found below it."""
    prefix = ""
    while names and all("/" in n for n in names):
        heads = {n.split("/", 1)[0] for n in names}
        if len(heads) != 1:
            break
        # stop when removing it would leave flat files that are the classes' images
        stripped = [n.split("/", 1)[1] for n in names]
        if all("/" not in s for s in stripped):
            break
        head = heads.pop()
        prefix += head + "/"
        names = stripped
    return names, prefix


def open_source(src: str) -> ImageSource:
    """Open SRC: a folder, an archive, or a built-in name. One-line errors for anything unusable."""
    if src in BUILTIN_SOURCES:
        return _digits_source()
    path = Path(src)
    if not path.exists():
        raise WdmError(f"image source {src!r} does not exist (a folder, a .tar/.tar.gz/.zip, or one of: "
                       f"{', '.join(BUILTIN_SOURCES)})")
    if path.is_dir():
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and _is_image(p.name))
        labels, names = _labels_from_paths(files)
        parts = [f"{f}:{(path / f).stat().st_size}" for f in files]
        return ImageSource(f"folder:{path.resolve()}", files, labels, names,
                           lambda key: Image.open(path / key), parts)
    lower = path.name.lower()
    if lower.endswith(".zip"):
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as err:
            raise WdmError(f"cannot read {src}: {err}") from None
        infos = {i.filename: i for i in archive.infolist() if not i.is_dir() and _is_image(i.filename)}
        return _archive_source(src, infos, lambda name: io.BytesIO(archive.read(name)),
                               lambda i: i.file_size)
    if lower.endswith((".tar", ".tar.gz", ".tgz")):
        try:
            archive = tarfile.open(path)
            members = {m.name: m for m in archive.getmembers() if m.isfile() and _is_image(m.name)}
        except (tarfile.TarError, OSError) as err:
            raise WdmError(f"cannot read {src}: {err}") from None
        return _archive_source(src, members, lambda name: io.BytesIO(archive.extractfile(members[name]).read()),
                               lambda m: m.size)
    raise WdmError(f"image source {src!r} is neither a folder nor a .tar/.tar.gz/.zip archive")


def _archive_source(src, entries: dict, read_bytes, size_of) -> ImageSource:
    full = sorted(entries)
    short, prefix = _strip_common_root(full)
    labels, names = _labels_from_paths(short)
    parts = [f"{n}:{size_of(entries[n])}" for n in full]
    keys = [prefix + s for s in short]
    # one archive handle serves every image: reading its bytes must not interleave between threads
    # (tarfile seeks a shared file object); decoding the bytes needs no lock
    lock = threading.Lock()

    def read(key: str) -> Image.Image:
        with lock:
            data = read_bytes(key)
        return Image.open(data)

    return ImageSource(f"archive:{Path(src).name}", keys, labels, names, read, parts)


def _digits_source() -> ImageSource:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): nothing to download."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images  # (n, 8, 8) float in 0..16

    def read(key: str) -> Image.Image:
        arr = images[int(key)]
        gray = np.clip(np.round(arr * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L")

    keys = [str(i) for i in range(len(images))]
    labels = [int(t) for t in digits.target]
    digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    return ImageSource("builtin:digits", keys, labels, [str(i) for i in range(10)], read, [digest])
