"""Sampling: DPM-Solver++ (and friends) over the saved DDPM schedule, classifier-free guidance, per-image seeds.

Reusable from Python: `sample_images` runs any denoiser (a WDMamba in memory, or an exported ONNX/TensorRT
one behind the same call signature) and returns uint8 images; `generate_images` streams batches from a
saved model folder (FID uses it); `run_sample` is what `wdmctl sample` calls.

Seeds: image i of a request gets seed + i. Its starting noise (and the noise of stochastic solvers) comes
from its own generator, and its random class label too, so the images do not depend on the batch size or
on how many GPUs share the work.

Guidance follows DiT/diffusers: eps = eps_uncond + w * (eps_cond - eps_uncond); w = 1 is off and costs no
extra forward pass.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from wdmctl.cuda_graphs import capture, run_on_side_stream
from wdmctl.diffusion import SOLVERS, default_clip_x0, default_solver, make_sampler
from wdmctl.errors import WdmError, first_line

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------
# Labels, seeds, noise
# ----------------------------------------------------------------------------------------------------

def resolve_classes(classes: Sequence[str] | None, num_classes: int, class_names: Sequence[str]) -> list[int] | str | None:
    """`--class` values -> ids. Accepts ids, class names, comma lists, or `random`. None for unconditional."""
    if not classes:
        return "random" if num_classes > 0 else None
    if num_classes == 0:
        raise WdmError("--class was given but the model is unconditional (num_classes = 0)")
    items = [c.strip() for value in classes for c in str(value).split(",") if c.strip()]
    if items == ["random"]:
        return "random"
    ids = []
    for item in items:
        if item.lstrip("-").isdigit():
            cid = int(item)
        elif item in class_names:
            cid = list(class_names).index(item)
        else:
            hint = f"; names: {', '.join(class_names[:10])}{'...' if len(class_names) > 10 else ''}" if class_names else ""
            raise WdmError(f"unknown class {item!r}: give an id in 0..{num_classes - 1}, a class name or 'random'{hint}")
        if not 0 <= cid < num_classes:
            raise WdmError(f"class id {cid} is out of range 0..{num_classes - 1}")
        ids.append(cid)
    return ids


def labels_for(seeds: Sequence[int], classes: list[int] | str | None, num_classes: int) -> list[int] | None:
    """One label per image: cycle through the given ids, or draw from the image's own seed for `random`."""
    if classes is None:
        return None
    if classes == "random":
        return [int(np.random.default_rng([s, 1]).integers(num_classes)) for s in seeds]
    return [classes[i % len(classes)] for i in range(len(seeds))]


def image_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Starting noise, one CPU generator per image (identical on every device and batch size)."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# ----------------------------------------------------------------------------------------------------
# The sampling loop
# ----------------------------------------------------------------------------------------------------

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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC, rounded to nearest (127.5 x + 128, floored, clamped)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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
            from wdmctl.autoencoders import autoencoder_from_manifest

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
    dtype = PRECISIONS[precision]
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
    if precision not in PRECISIONS:
        raise WdmError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    conditional = bool(num_classes)
    guided = conditional and labels is not None and cfg != 1.0
    solver = solver or default_solver(guided)
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


def save_grid(images: np.ndarray, path: str | Path, columns: int | None = None, padding: int = 2) -> Path:
    """Tile uint8 NHWC images into one PNG (about square), written atomically."""
    from PIL import Image

    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = img
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(tmp, format="PNG")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------
# From a saved model folder (what `wdmctl sample` and `wdmctl fid` use)
# ----------------------------------------------------------------------------------------------------

def resolve_pipeline_dir(run: str | None = None, model: str | None = None, checkpoint: str = "latest") -> Path:
    """--model DIR wins; otherwise the checkpoint of --run (default: the newest run under ./runs)."""
    if run and model:
        raise WdmError("give --run or --model, not both")
    if model:
        path = Path(model)
        if not (path / "denoiser" / "config.json").exists():
            raise WdmError(f"--model {model}: not a wdmctl model folder (no denoiser/config.json)")
        return path
    from wdmctl.runs import checkpoint_pipeline, find_run

    return checkpoint_pipeline(find_run(run), checkpoint)


def sampling_defaults(meta: dict[str, Any], conditional: bool) -> dict[str, Any]:
    """The recipe's sampling settings saved with the model, with the toolkit's defaults beneath them."""
    saved = dict(meta.get("sample") or {})
    return {"steps": int(saved.get("steps", 50)), "cfg": float(saved.get("cfg", 1.5 if conditional else 1.0)),
            "solver": saved.get("solver")}


def resolve_settings(pipe, steps: int | None, cfg: float | None, solver: str | None,
                     clip_x0: bool | None) -> dict[str, Any]:
    """The sampler settings a request gets from a loaded pipeline: arguments left None take the saved recipe's
    values, then the toolkit's defaults (DPM-Solver++ 2M guided, 3M unguided; x0 clipped for pixel models).
    Unconditional models always get cfg 1."""
    conditional = pipe.num_classes > 0
    defaults = sampling_defaults(pipe.meta, conditional)
    cfg = (defaults["cfg"] if cfg is None else cfg) if conditional else 1.0
    solver = solver or defaults["solver"] or default_solver(conditional and cfg != 1.0)
    clip_x0 = default_clip_x0(pipe.autoencoder, solver) if clip_x0 is None else clip_x0
    return {"steps": steps or defaults["steps"], "cfg": cfg, "solver": solver, "clip_x0": clip_x0}


def generate_images(pipeline_dir: Path, n: int, classes: list[int] | str | None, steps: int | None, cfg: float | None,
                    solver: str | None, seed: int, batch_size: int, device: str, precision: str,
                    ema: bool = True, seeds: Sequence[int] | None = None, clip_x0: bool | None = None,
                    resolved: dict[str, Any] | None = None, cuda_graph: bool = False,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (uint8 NHWC images, labels) batches for seeds seed .. seed + n - 1 (or `seeds`). Arguments left
    None take the saved recipe's values; `resolved`, if given, receives the settings actually used."""
    from wdmctl.pipeline import load_pipeline

    pipe = load_pipeline(pipeline_dir, ema=ema, device=device)
    conditional = pipe.num_classes > 0
    used = resolve_settings(pipe, steps, cfg, solver, clip_x0)
    if resolved is not None:
        resolved.update(used)
    if classes is None and conditional:
        classes = "random"
    seeds = list(seeds) if seeds is not None else list(range(seed, seed + n))
    labels = labels_for(seeds, classes if conditional else None, pipe.num_classes)
    batches = iter_sample_batches(pipe.model, dict(pipe.scheduler.config), pipe.autoencoder, seeds, labels,
                                  used["steps"], used["cfg"], used["solver"], batch_size, device, precision,
                                  clip_x0=used["clip_x0"], cuda_graph=cuda_graph)
    for start, images in zip(range(0, len(seeds), batch_size), batches):
        lab = np.asarray(labels[start:start + len(images)] if labels else [-1] * len(images), dtype=np.int64)
        yield images, lab


@dataclass
class SampleRequest:
    """Everything `wdmctl sample` asks for (validated in `run_sample`)."""

    run: str | None = None
    model: str | None = None
    checkpoint: str = "latest"
    n: int = 64
    classes: list[str] | None = None
    steps: int | None = None
    cfg: float | None = None
    solver: str | None = None
    seed: int = 0
    batch_size: int = 16
    out: str | None = None
    grid: bool = True
    npz: bool = False
    ema: bool = True
    precision: str = "fp32"
    backend: str = "torch"
    scan_backend: str = "auto"
    export_dir: str | None = None
    device: str | None = None
    overwrite: bool = False
    clip_x0: bool | None = None  # None: on for pixel models, off for latent models
    cuda_graph: bool = False     # replay the denoiser from CUDA graphs (--backend torch on CUDA)


def _default_out(pipeline_dir: Path, req: SampleRequest, step: Any, cfg: float) -> Path:
    # runs/<run>/checkpoints/step-N/pipeline -> runs/<run>/samples/step-N-seed0-n64
    run_dir = pipeline_dir.parent.parent.parent if pipeline_dir.parent.parent.name == "checkpoints" else None
    base = run_dir / "samples" if run_dir else Path("samples")
    return base / f"step-{step}-seed{req.seed}-n{req.n}-cfg{cfg}-{req.backend}"


def run_sample(req: SampleRequest) -> dict[str, Any]:
    """`wdmctl sample`: validate everything, sample (split across Accelerate processes), write PNGs, grid,
    optional npz and metadata.json into a temporary folder, and rename it into place at the end."""
    import shutil

    from accelerate import PartialState
    from PIL import Image

    from wdmctl.pipeline import load_pipeline, write_json_atomic

    if req.n < 1:
        raise WdmError(f"--n must be >= 1, not {req.n}")
    if req.batch_size < 1:
        raise WdmError(f"--batch-size must be >= 1, not {req.batch_size}")
    if req.backend not in ("torch", "onnx", "trt"):
        raise WdmError(f"--backend must be torch, onnx or trt, not {req.backend!r}")
    if req.cuda_graph and req.backend != "torch":
        raise WdmError(f"--cuda-graph is for --backend torch; {req.backend} runs its own runtime")
    state = PartialState(cpu=req.device == "cpu")
    device = torch.device(req.device) if req.device else state.device
    if req.cuda_graph and device.type != "cuda":
        raise WdmError(f"--cuda-graph needs a CUDA device, not {device.type}")
    pipeline_dir = resolve_pipeline_dir(req.run, req.model, req.checkpoint)
    pipe = load_pipeline(pipeline_dir, ema=req.ema, device=device)
    pipe.model.set_scan_backend(req.scan_backend)
    classes = resolve_classes(req.classes, pipe.num_classes, pipe.class_names)
    settings = resolve_settings(pipe, req.steps, req.cfg, req.solver, req.clip_x0)
    steps, cfg, solver, clip_x0 = settings["steps"], settings["cfg"], settings["solver"], settings["clip_x0"]
    if cfg < 0:
        raise WdmError(f"--cfg must be >= 0, not {cfg}")
    make_sampler(dict(pipe.scheduler.config), solver, clip_x0=clip_x0)  # refuse bad combinations before writing
    decoder = Decoder(pipe.autoencoder, device)
    decoder.load()
    denoiser = None
    if req.backend != "torch":
        from wdmctl.export import load_exported_denoiser

        export_dir = Path(req.export_dir) if req.export_dir else pipeline_dir.parent / "export"
        denoiser = load_exported_denoiser(export_dir, req.backend, device)

    step = pipe.meta.get("step", "model")
    out = Path(req.out) if req.out else _default_out(pipeline_dir, req, step, cfg)
    if out.exists() and any(out.iterdir()) and not req.overwrite:
        raise WdmError(f"{out} exists and is not empty; pass --overwrite or choose --out")
    tmp = out.with_name(f".{out.name}.partial")
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    state.wait_for_everyone()

    seeds = list(range(req.seed, req.seed + req.n))
    labels = labels_for(seeds, classes, pipe.num_classes)
    my_idx = list(range(state.process_index, req.n, state.num_processes))
    my_seeds = [seeds[i] for i in my_idx]
    my_labels = [labels[i] for i in my_idx] if labels else None
    t0 = time.perf_counter()
    images = sample_images(pipe.model, dict(pipe.scheduler.config), pipe.autoencoder, my_seeds, my_labels, steps, cfg,
                           solver, req.batch_size, device, req.precision, denoiser=denoiser, decoder=decoder,
                           clip_x0=clip_x0, cuda_graph=req.cuda_graph)
    seconds = time.perf_counter() - t0
    for i, img in zip(my_idx, images):
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(tmp / f"{seeds[i]:06d}.png")
    state.wait_for_everyone()

    summary = {
        "model": str(pipeline_dir), "checkpoint_step": step, "ema": req.ema, "solver": solver, "steps": steps,
        "cfg": cfg, "clip_x0": clip_x0, "classes": labels, "class_names": [pipe.class_names[c] for c in labels] if labels and pipe.class_names else None,
        "seeds": [req.seed, req.seed + req.n - 1], "n": req.n, "precision": req.precision, "backend": req.backend,
        "scan_backend": req.scan_backend, "cuda_graph": req.cuda_graph, "device": str(device), "processes": state.num_processes,
        "autoencoder": pipe.autoencoder.get("spec", "none"),
        "timings": {"seconds": round(seconds, 3), "images_per_second": round(len(my_seeds) / max(seconds, 1e-9), 3),
                    "per_process": True},
        "out": str(out),
    }
    if state.is_main_process:
        files = sorted(tmp.glob("*.png"))
        all_images = np.stack([np.asarray(Image.open(f)) for f in files])
        if all_images.ndim == 3:
            all_images = all_images[..., None]
        if req.grid:
            save_grid(all_images, tmp / "grid.png")
        if req.npz:
            arrays = {"arr_0": all_images if all_images.shape[-1] == 3 else np.repeat(all_images, 3, -1)}
            if labels:
                arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
            np.savez(tmp / "samples.npz", **arrays)
        write_json_atomic(tmp / "metadata.json", summary)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(out)
    state.wait_for_everyone()
    return summary

