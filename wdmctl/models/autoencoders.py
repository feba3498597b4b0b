"""Autoencoders between pixels and the space the denoiser works in: `wdmctl cache` encodes with them and
sampling decodes with them, so both sides share one definition of "latent".

Three kinds, chosen by a spec string (the `--vae` option):

    stabilityai/sd-vae-ft-ema      a diffusers AutoencoderKL on the Hugging Face Hub (the default)
    /path/to/folder                a local diffusers AutoencoderKL folder (config.json + weights, or a
                                   pipeline folder with a vae/ sub-folder)
    taef2:DIR                      TAEF2, the tiny FLUX.2-latent autoencoder (32 channels, 8x down)
    none                           no autoencoder: the denoiser works on pixels

Conventions (the same for every kind):
- images are float in [-1, 1], shape (B, 3, H, W);
- `encode_moments` returns the *unscaled* posterior (mean, std), std None for deterministic encoders;
- `scale(z) = (z - shift_factor) * scaling_factor` is what the denoiser sees; `decode` takes scaled latents.

Scaling and shift factors come from the autoencoder's config. TAEF2's checkpoints carry no config: it
is distilled to reproduce FLUX.2's *normalised* latents (FLUX.2 normalises its VAE latents with a batch
norm, and the published TAEF2 diffusers wrapper uses an untrained, i.e. identity, batch norm around it),
so its latents are already unit-scale and the factors are 1.0 and 0.0 -- the defaults of diffusers'
AutoencoderTiny config. A `config.json` in the TAEF2 folder with `scaling_factor` / `shift_factor`
overrides them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wdmctl.core.hashing import sha256_json, state_dict_sha256
from wdmctl.errors import WdmError, first_line

DEFAULT_AUTOENCODER = "stabilityai/sd-vae-ft-ema"
ALTERNATIVES = "a local diffusers AutoencoderKL folder, `taef2:DIR` (weights in ../shared/assets/taef2) or `none`"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# The Stable Diffusion VAE (stabilityai/sd-vae-ft-ema and -mse share it): used by `wdmctl bench cache`
# to time an SD-VAE-sized encoder with random weights, which is the same compute as the trained one.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


# Manifests record 16 hex digits of each hash: enough to tell configs and weights apart (sd-vae-ft-ema and
# sd-vae-ft-mse have identical configs; their weights differ).
HASH_DIGITS = 16


class Autoencoder(ABC):
    """Pixels <-> the denoiser's space. Subclasses set the attributes and implement the two networks."""

    spec: str
    kind: str
    latent_channels: int
    downsample_factor: int
    scaling_factor: float
    shift_factor: float
    config: dict[str, Any]
    weights_hash: str | None

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def config_hash(self) -> str:
        """Hash of the architecture config and the scaling/shift factors."""
        return sha256_json({"kind": self.kind, "config": self.config,
                        "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor})[:HASH_DIGITS]

    def latent_shape(self, resolution: int) -> list[int]:
        """[C, H, W] of the latent of a `resolution`-pixel square image."""
        if resolution % self.downsample_factor:
            raise WdmError(f"resolution {resolution} is not divisible by the autoencoder's downsampling "
                           f"factor {self.downsample_factor} ({self.spec})")
        side = resolution // self.downsample_factor
        return [self.latent_channels, side, side]

    def manifest_entry(self) -> dict[str, Any]:
        """What a cache manifest (and a saved model) records to rebuild and verify this autoencoder."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "config_hash": self.config_hash,
            "weights_hash": self.weights_hash,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "config": self.config,
        }

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> what the denoiser sees."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """What the denoiser sees -> the autoencoder's own latent."""
        return z_scaled / self.scaling_factor + self.shift_factor

    @torch.inference_mode()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [-1, 1] (B, 3, H, W) -> unscaled posterior (mean, std), float32; std None when the
        encoder is deterministic."""
        mean, std = self._encode(images.to(self.device, self.dtype))
        return mean.float(), (None if std is None else std.float())

    @torch.inference_mode()
    def decode(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1], float32."""
        z = self.unscale(z_scaled.to(self.device, torch.float32)).to(self.dtype)
        return self._decode(z).float().clamp(-1, 1)

    @abstractmethod
    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [-1, 1] on the device, in the model dtype -> unscaled (mean, std or None)."""

    @abstractmethod
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents in the model dtype -> images roughly in [-1, 1]."""


class KLAutoencoder(Autoencoder):
    """A diffusers AutoencoderKL (SD-VAE and relatives): Gaussian posterior, factors from its config."""

    kind = "kl"

    def __init__(self, vae: nn.Module, spec: str, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.spec = spec
        # hash before any dtype change, so the hash names the checkpoint and not the precision used
        self.weights_hash = state_dict_sha256(vae.state_dict())[:HASH_DIGITS]
        with _quiet_libraries():  # diffusers warns about any cast done with .to(); this one is intended
            self.vae = vae.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        cfg = vae.config
        self.config = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
        self.latent_channels = int(cfg.latent_channels)
        self.downsample_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        # SD-1/2 VAEs have no shift (None in the config); FLUX.1/SD3-style VAEs carry one
        self.shift_factor = float(cfg.get("shift_factor") or 0.0)

    def _encode(self, images):
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.std

    def _decode(self, z):
        return self.vae.decode(z).sample


# ---- TAEF2 --------------------------------------------------------------------------------------------
# The taesd architecture (madebyollin/taesd, MIT), numbered as in its nn.Sequential checkpoints so the
# state dicts load strictly. TAEF2 adds a "pool" branch to the three lowest-resolution blocks of each
# side (encoder 11-13, decoder 3-5) that diffusers' AutoencoderTiny lacks: x + pool(x) before the block.

def _conv3x3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _TanhClamp(nn.Module):
    """Soft clamp of the decoder's input latents to (-3, 3), as taesd does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _TaeBlock(nn.Module):
    """Residual block of three 3x3 convs; with `pool`, TAEF2's GroupNorm branch is added first."""

    def __init__(self, channels: int = 64, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(channels, channels), nn.ReLU(), _conv3x3(channels, channels), nn.ReLU(),
                                  _conv3x3(channels, channels))
        self.pool = None
        if pool:
            wide = 4 * channels
            self.pool = nn.Sequential(nn.Conv2d(channels, wide, 1, bias=False), nn.GroupNorm(4, wide), nn.ReLU(),
                                      nn.Conv2d(wide, channels, 1, bias=False))
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def taef2_encoder(latent_channels: int = 32) -> nn.Sequential:
    """[0, 1] images -> latents, 8x down."""
    def down():
        return _conv3x3(64, 64, stride=2, bias=False)

    def blocks(pool=False):
        return [_TaeBlock(64, pool) for _ in range(3)]

    return nn.Sequential(_conv3x3(3, 64), _TaeBlock(64), down(), *blocks(), down(), *blocks(), down(),
                         *blocks(pool=True), _conv3x3(64, latent_channels))


def taef2_decoder(latent_channels: int = 32) -> nn.Sequential:
    """Latents -> [0, 1] images (unclamped), 8x up."""
    def up():
        return [nn.Upsample(scale_factor=2), _conv3x3(64, 64, bias=False)]

    def blocks(pool=False):
        return [_TaeBlock(64, pool) for _ in range(3)]

    return nn.Sequential(_TanhClamp(), _conv3x3(latent_channels, 64), nn.ReLU(), *blocks(pool=True), *up(),
                         *blocks(), *up(), *blocks(), *up(), _TaeBlock(64), _conv3x3(64, 3))


def _load_taef2_state(folder: Path) -> tuple[dict, dict]:
    """Encoder and decoder state dicts from taesd's `taef2_{encoder,decoder}.pth` or the Hub's
    `taef2.safetensors` (keys `encoder.layers.N...`, decoder indices one lower: no clamp layer)."""
    enc_pth, dec_pth = folder / "taef2_encoder.pth", folder / "taef2_decoder.pth"
    if enc_pth.exists() and dec_pth.exists():
        # weights_only: plain tensors, no pickled code is run
        return (torch.load(enc_pth, map_location="cpu", weights_only=True),
                torch.load(dec_pth, map_location="cpu", weights_only=True))
    single = [p for p in (folder / "taef2.safetensors", folder / "diffusion_pytorch_model.safetensors") if p.exists()]
    if single:
        from safetensors.torch import load_file

        encoder, decoder = {}, {}
        for key, value in load_file(single[0]).items():
            side, _layers, index, *rest = key.split(".")
            offset = 1 if side == "decoder" else 0
            (decoder if side == "decoder" else encoder)[".".join([str(int(index) + offset), *rest])] = value
        return encoder, decoder
    raise WdmError(f"taef2:{folder}: no TAEF2 weights there (expected taef2_encoder.pth + taef2_decoder.pth "
                   f"or taef2.safetensors)")


class TAEF2Autoencoder(Autoencoder):
    """TAEF2: deterministic encoder, 32 latent channels, 8x down; the networks take [0, 1] images."""

    kind = "taef2"
    latent_channels = 32
    downsample_factor = 8

    def __init__(self, encoder: nn.Module, decoder: nn.Module, spec: str, weights_hash: str | None,
                 config_overrides: dict[str, Any] | None = None, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.spec = spec
        self.weights_hash = weights_hash
        overrides = config_overrides or {}
        # see the module docstring: TAEF2 latents are already in FLUX.2's normalised space
        self.scaling_factor = float(overrides.get("scaling_factor", 1.0))
        self.shift_factor = float(overrides.get("shift_factor") or 0.0)
        self.config = {"architecture": "taesd/flux_2", "latent_channels": self.latent_channels,
                       "downsample_factor": self.downsample_factor, "input_range": [0, 1]}
        self.encoder = encoder.to(self.device, dtype).eval().requires_grad_(False)
        self.decoder = decoder.to(self.device, dtype).eval().requires_grad_(False)

    @classmethod
    def from_folder(cls, folder: str | Path, spec: str, device="cpu", dtype=torch.float32) -> "TAEF2Autoencoder":
        folder = Path(folder)
        if not folder.is_dir():
            raise WdmError(f"{spec}: {folder} is not a folder (give the folder holding the TAEF2 weights)")
        enc_state, dec_state = _load_taef2_state(folder)
        encoder, decoder = taef2_encoder(), taef2_decoder()
        try:
            encoder.load_state_dict(enc_state, strict=True)
            decoder.load_state_dict(dec_state, strict=True)
        except RuntimeError as err:
            raise WdmError(f"{spec}: the weights are not TAEF2's ({first_line(err)})") from None
        overrides = {}
        if (folder / "config.json").exists():
            overrides = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                         if k in ("scaling_factor", "shift_factor")}
        weights = state_dict_sha256({**{f"encoder.{k}": v for k, v in enc_state.items()},
                                     **{f"decoder.{k}": v for k, v in dec_state.items()}})[:HASH_DIGITS]
        return cls(encoder, decoder, spec, weights, overrides, device, dtype)

    def _encode(self, images):
        return self.encoder(images * 0.5 + 0.5), None

    def _decode(self, z):
        return self.decoder(z).clamp(0, 1) * 2 - 1


class PixelSpace(Autoencoder):
    """`none`: no autoencoder; the "latent" is the [-1, 1] image itself."""

    kind = "none"
    spec = "none"
    latent_channels = 3
    downsample_factor = 1
    scaling_factor = 1.0
    shift_factor = 0.0
    weights_hash = None

    def __init__(self, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.config = {}

    def _encode(self, images):
        return images, None

    def _decode(self, z):
        return z


# ---- loading ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_libraries():
    """Keep hub retries and diffusers' chatter off the console: failures become one WdmError line."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "diffusers")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load_kl(spec: str, device, dtype) -> KLAutoencoder:
    from diffusers import AutoencoderKL

    path = Path(spec)
    if path.is_dir():
        subfolder = None
        if not (path / "config.json").exists():
            if not (path / "vae" / "config.json").exists():
                raise WdmError(f"--vae {spec}: the folder holds no config.json (nor vae/config.json); expected a "
                               f"diffusers AutoencoderKL folder, or use {ALTERNATIVES}")
            subfolder = "vae"
        try:
            with _quiet_libraries():
                vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise WdmError(f"--vae {spec}: cannot load an AutoencoderKL from it ({first_line(err, 200)})") from None
        return KLAutoencoder(vae, str(path.resolve()), device, dtype)
    if not _HUB_ID.match(spec):
        raise WdmError(f"--vae {spec!r} is not a folder, a Hub id (owner/name), `taef2:DIR` or `none`")
    vae = None
    with _quiet_libraries():
        # the local Hub cache first: works offline and skips the network round trip
        for local_only in (True, False):
            try:
                vae = AutoencoderKL.from_pretrained(spec, local_files_only=local_only)
                break
            except Exception as err:  # hub errors come as OSError, HTTP, connection or validation errors
                reason = err
    if vae is None:
        raise WdmError(f"cannot load autoencoder {spec!r} from the Hugging Face Hub (offline or unknown id: "
                       f"{first_line(reason, 200)}); use {ALTERNATIVES}")
    return KLAutoencoder(vae, spec, device, dtype)


def load_autoencoder(spec: str = DEFAULT_AUTOENCODER, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> Autoencoder:
    """Build the autoencoder a spec names (see the module docstring); WdmError with the alternatives
    when it cannot be found or downloaded."""
    spec = (spec or "").strip()
    if spec.lower() == "none":
        return PixelSpace(device, dtype)
    if spec.lower().startswith("taef2:"):
        folder = spec.split(":", 1)[1]
        if not folder:
            raise WdmError("--vae taef2: needs the weights folder, e.g. taef2:../shared/assets/taef2")
        resolved = Path(folder).expanduser().resolve()
        return TAEF2Autoencoder.from_folder(resolved, f"taef2:{resolved}", device, dtype)
    if not spec:
        raise WdmError(f"--vae is empty; give a Hub id such as {DEFAULT_AUTOENCODER}, or {ALTERNATIVES}")
    return _load_kl(spec, device, dtype)


def autoencoder_from_manifest(entry: dict[str, Any], device: str | torch.device = "cpu",
                              dtype: torch.dtype = torch.float32, spec: str | None = None) -> Autoencoder:
    """Rebuild the autoencoder a cache manifest (or a saved model's wdmctl.json) names, and check it is the
    same one (config and weights hashes). `spec` points at a moved copy of the same weights."""
    entry = dict(entry or {"spec": "none"})
    autoencoder = load_autoencoder(spec or entry.get("spec", "none"), device, dtype)
    for field in ("kind", "config_hash", "weights_hash"):
        recorded = entry.get(field)
        if recorded is not None and recorded != getattr(autoencoder, field):
            raise WdmError(f"autoencoder {autoencoder.spec} differs from the one recorded ({field} "
                           f"{getattr(autoencoder, field)} != {recorded}); point to the original weights")
    return autoencoder


def sd_vae_sized_autoencoder(device="cpu", dtype=torch.float32) -> KLAutoencoder:
    """An AutoencoderKL with the Stable Diffusion VAE's config and random weights (benchmarks: same compute)."""
    from diffusers import AutoencoderKL

    return KLAutoencoder(AutoencoderKL(**SD_VAE_CONFIG), "random:sd-vae-config", device, dtype)


def random_taef2(device="cpu", dtype=torch.float32) -> TAEF2Autoencoder:
    """TAEF2's architecture with random weights (benchmarks without the checkpoint)."""
    return TAEF2Autoencoder(taef2_encoder(), taef2_decoder(), "random:taef2", None, None, device, dtype)
