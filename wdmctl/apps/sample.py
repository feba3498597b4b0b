"""`wdmctl sample` and the image stream `wdmctl fid` scores: a saved model folder in, images out.

`generate_images` streams batches from a saved model folder; `run_sample` is what `wdmctl sample` calls
(validation, Accelerate processes, PNGs, grid, npz, metadata.json, all renamed into place at the end).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from wdmctl.core.images import save_grid
from wdmctl.core.io import write_json_atomic
from wdmctl.diffusion.sampler import Decoder, iter_sample_batches, sample_images
from wdmctl.diffusion.schedule import make_sampler
from wdmctl.diffusion.settings import labels_for, resolve_classes, resolve_settings
from wdmctl.errors import WdmError
from wdmctl.export.runtime import load_exported_denoiser
from wdmctl.pipeline import load_pipeline
from wdmctl.runs import resolve_pipeline_dir


def generate_images(pipeline_dir: Path, n: int, classes: list[int] | str | None, steps: int | None, cfg: float | None,
                    solver: str | None, seed: int, batch_size: int, device: str, precision: str,
                    ema: bool = True, seeds: Sequence[int] | None = None, clip_x0: bool | None = None,
                    resolved: dict[str, Any] | None = None, cuda_graph: bool = False,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (uint8 NHWC images, labels) batches for seeds seed .. seed + n - 1 (or `seeds`). Arguments left
    None take the saved recipe's values; `resolved`, if given, receives the settings actually used."""
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
    from accelerate import PartialState  # here: Accelerate's import is slow and only this command needs it
    from PIL import Image

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
        "exported_runtime": denoiser.describe() if denoiser is not None else None,
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
