"""The denoising loop: a diffusers solver over the saved DDPM schedule, classifier-free guidance, per-image
seeds, and the denoiser wrappers (autocast, CUDA-graph replay) and latent decoder around it.

`sample_images` runs any denoiser (a WDMamba in memory, or an exported ONNX/TensorRT one behind the same call
signature) and returns uint8 images.

Seeds: image i of a request gets seed + i. Its starting noise (and the noise of stochastic solvers) comes
from its own generator, and its random class label too, so the images do not depend on the batch size or
on how many GPUs share the work.

Guidance follows DiT/diffusers: eps = eps_uncond + w * (eps_cond - eps_uncond); w = 1 is off and costs no
extra forward pass.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from wdmctl.core.cuda_graphs import capture, run_on_side_stream
from wdmctl.core.images import to_uint8
from wdmctl.core.precision import check_precision, torch_dtype
from wdmctl.diffusion.schedule import SOLVERS, default_clip_x0, make_sampler
from wdmctl.diffusion.settings import pick_solver
from wdmctl.errors import WdmError, first_line
from wdmctl.models.autoencoders import autoencoder_from_manifest

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def image_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Starting noise, one CPU generator per image (identical on every device and batch size)."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def guided_eps(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
               null_class: int | None, cfg: float) -> torch.Tensor:
    """One denoiser call with classifier-free guidance (uncond + w * (cond - uncond)); w = 1 is one pass."""
    if labels is None or cfg == 1.0:
        return denoise(x, t, labels)
    both = denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_class)]))
    cond, uncond = both.chunk(2)
    return uncond + cfg * (cond - uncond)


def denoise_loop(denoise: Denoiser, sampler, noise: torch.Tensor, labels: torch.Tensor | None,
                 null_class: int | None, cfg: float, steps: int, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Run `sampler` (a diffusers scheduler) for `steps` from `noise`; returns x_0 (fp32)."""
    sampler.set_timesteps(steps, device=noise.device)
    x = noise * sampler.init_noise_sigma
    for t in sampler.timesteps:
        model_in = sampler.scale_model_input(x, t)
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        eps = guided_eps(denoise, model_in, tt, labels, null_class, cfg).float()
        extra = {"generator": generators} if generators is not None else {}
        x = sampler.step(eps, t, x, return_dict=False, **extra)[0]
    return x


@dataclass
class Decoder:
    """Latents -> [-1, 1] images, through the autoencoder named by the cache manifest (identity for pixels)."""

    entry: dict[str, Any]
    device: torch.device
    _ae: Any = None

    @property
    def is_identity(self) -> bool:
        return (self.entry or {}).get("spec", "none") == "none"

    def load(self):
        """Load the autoencoder now (so a missing one fails before anything is sampled or written)."""
        if self._ae is None and not self.is_identity:
            try:
                # KL VAEs decode in fp32: their decoder overflows in fp16 and loses detail in bf16
                self._ae = autoencoder_from_manifest(self.entry, device=self.device, dtype=torch.float32)
            except WdmError:
                raise
            except Exception as err:  # hub, network and file errors from diffusers
                raise WdmError(f"cannot load the autoencoder {self.entry.get('spec')!r}: {first_line(err)}") from None
        return self._ae

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return z
        with torch.no_grad():
            return self.load().decode(z.float())


def model_denoiser(model, precision: str, cuda_graph: bool = False) -> Denoiser:
    """Wrap a torch model as a Denoiser, with autocast for bf16/fp16, optionally replayed from CUDA graphs."""
    device_type = next(model.parameters()).device.type
    dtype = torch_dtype(precision)
    if cuda_graph and device_type != "cuda":
        raise WdmError(f"--cuda-graph needs the model on a CUDA device, not {device_type}")

    def denoise(x, t, y):
        # no autocast weight cache: a captured graph must not keep casts made outside it
        ctx = torch.autocast(device_type, dtype=dtype, cache_enabled=False) if dtype != torch.float32 else nullcontext()
        with torch.no_grad(), ctx:
            return model(x, t, y)

    return CudaGraphDenoiser(denoise) if cuda_graph else denoise


class CudaGraphDenoiser:
    """Replays one captured CUDA graph per input shape instead of launching the network's kernels one by one.

    A WD-Mamba call is hundreds of small kernels (26 blocks x conv, projections, scan, norms); at sampling
    batch sizes the GPU waits on the host's launches, so a call costs about the same at any width. A graph
    replays them all with one launch. Inputs are copied into the graph's own buffers; the output is cloned,
    because multistep solvers keep earlier outputs while the graph overwrites its buffer on the next call.
    """

    def __init__(self, denoise: Denoiser, warmup: int = 2):
        self.denoise, self.warmup = denoise, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, t.dtype, None if y is None else tuple(y.shape))
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t, y)
        graph, buffers, out = self.graphs[key]
        for buffer, value in zip(buffers, (x, t, y)):
            if buffer is not None:
                buffer.copy_(value)
        graph.replay()
        return out.clone()

    def _capture(self, x, t, y):
        buffers = [v.clone() if v is not None else None for v in (x, t, y)]
        run_on_side_stream(lambda: self.denoise(*buffers), times=self.warmup)
        graph, out = capture(lambda: self.denoise(*buffers))
        return graph, buffers, out


def sample_images(model, scheduler_config: dict, autoencoder_entry: dict | None, seeds: Sequence[int],
                  labels: Sequence[int] | None, steps: int = 50, cfg: float = 1.0, solver: str | None = None,
                  batch_size: int = 16, device="cpu", precision: str = "fp32",
                  denoiser: Denoiser | None = None, num_classes: int | None = None,
                  sample_shape: Sequence[int] | None = None, decoder: Decoder | None = None,
                  clip_x0: bool | None = None, cuda_graph: bool = False) -> np.ndarray:
    """Generate one uint8 NHWC image per seed (image i uses seeds[i] and labels[i]).

    `model` gives the shapes, classes and (unless `denoiser` is given, e.g. an ONNX session) the network.
    `clip_x0` None clips predicted x_0 to [-1, 1] for pixel models only (`diffusion.default_clip_x0`).
    `cuda_graph` replays the model from CUDA graphs (`CudaGraphDenoiser`); the images are the same.
    """
    batches = list(iter_sample_batches(model, scheduler_config, autoencoder_entry, seeds, labels, steps, cfg,
                                       solver, batch_size, device, precision, denoiser, num_classes, sample_shape,
                                       decoder, clip_x0, cuda_graph))
    return np.concatenate(batches) if batches else np.zeros((0, 0, 0, 3), np.uint8)


def iter_sample_batches(model, scheduler_config, autoencoder_entry, seeds, labels, steps=50, cfg=1.0, solver=None,
                        batch_size=16, device="cpu", precision="fp32", denoiser=None, num_classes=None,
                        sample_shape=None, decoder=None, clip_x0=None, cuda_graph=False) -> Iterator[np.ndarray]:
    """`sample_images`, one batch at a time."""
    device = torch.device(device)
    if model is not None:
        cfg_m = model.config
        num_classes = cfg_m.num_classes if num_classes is None else num_classes
        sample_shape = sample_shape or (cfg_m.in_channels, cfg_m.sample_size, cfg_m.sample_size)
    if steps < 1:
        raise WdmError(f"--steps must be >= 1, not {steps}")
    check_precision(precision)
    conditional = bool(num_classes)
    guided = conditional and labels is not None and cfg != 1.0
    solver = pick_solver(solver, guided)
    if solver not in SOLVERS:
        raise WdmError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    clip_x0 = default_clip_x0(autoencoder_entry, solver) if clip_x0 is None else clip_x0
    denoise = denoiser or model_denoiser(model, precision, cuda_graph)
    decode = decoder or Decoder(autoencoder_entry or {"spec": "none"}, device)
    stochastic = solver.endswith("sde")
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start:start + batch_size])
        noise = image_noise(chunk, sample_shape).to(device)
        y = None
        if conditional and labels is not None:
            y = torch.tensor(list(labels[start:start + batch_size]), device=device, dtype=torch.long)
        generators = [torch.Generator(device).manual_seed(int(s) + 1) for s in chunk] if stochastic else None
        sampler = make_sampler(dict(scheduler_config), solver, clip_x0=clip_x0)
        z = denoise_loop(denoise, sampler, noise, y, num_classes if conditional else None, cfg, steps, generators)
        yield to_uint8(decode(z))
