"""The saved-model folder: everything `sample`, `fid` and `export` need, loadable without pickle.

    <folder>/
      model_index.json                     diffusers pipeline index (WDMambaPipeline)
      denoiser/                            EMA weights: config.json + diffusion_pytorch_model.safetensors
      denoiser_online/                     the raw (non-EMA) weights, for --no-ema (optional)
      scheduler/scheduler_config.json      the DDPM training schedule
      wdmctl.json                          autoencoder reference (from the cache manifest), classes,
                                           latent shape, the recipe's sampling defaults, step, provenance
      integrity.json                       size + sha256 of every file above, written last (wdmctl.core.integrity)

The trainer writes one per checkpoint (`checkpoints/step-NNNNNNN/pipeline/`); `WDMambaPipeline`
reads and writes the same layout.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wdmctl.core.disk_full import note_failed_file
from wdmctl.core.integrity import require_intact, write_integrity
from wdmctl.core.io import write_json_atomic
from wdmctl.diffusion.sampler import sample_images
from wdmctl.diffusion.settings import labels_for, resolve_classes, sampling_defaults
from wdmctl.errors import WdmError, first_line
from wdmctl.models.loading import load_model

META_FILE = "wdmctl.json"
EMA_DIR = "denoiser"                                  # the EMA weights: what sampling uses by default
ONLINE_DIR = "denoiser_online"                        # the raw weights (--no-ema; training resumes from them)
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' file name for a ModelMixin's weights
LOAD_HINT = "this model folder is damaged: use another checkpoint (--checkpoint STEP) or a good copy"


@dataclass
class SavedPipeline:
    """A loaded folder: the denoiser (EMA unless asked otherwise), the training scheduler and the metadata."""

    path: Path
    model: Any
    scheduler: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def autoencoder(self) -> dict[str, Any]:
        """The cache manifest's autoencoder entry (`{"spec": "none"}` for pixel models)."""
        return dict(self.meta.get("autoencoder") or {"spec": "none"})


def save_pipeline(folder: str | Path, model, scheduler, meta: dict[str, Any], online_model=None,
                  overwrite: bool = False) -> Path:
    """Write the folder atomically (into a temporary sibling, then rename)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise WdmError(f"{folder} exists; pass --overwrite to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp / EMA_DIR, safe_serialization=True)
        if online_model is not None:
            online_model.save_pretrained(tmp / ONLINE_DIR, safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        write_json_atomic(tmp / "model_index.json", {
            "_class_name": "WDMambaPipeline",
            "_diffusers_version": _diffusers_version(),
            "denoiser": ["wdmctl", "WDMamba"],
            "scheduler": ["diffusers", type(scheduler).__name__],
        })
        write_json_atomic(tmp / META_FILE, meta)
        write_integrity(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException as err:
        note_failed_file(err, tmp)  # a full disk's one-line error names the file after tmp is gone
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def require_intact_pipeline(folder: str | Path, full: bool = True) -> None:
    """A one-line error naming the first damaged file of a saved folder. `full` hashes too (loading reads those
    bytes anyway). A folder from before integrity.json, or from diffusers alone, is checked on each file's
    framing, which still catches a cut-short weights file."""
    require_intact(folder, full=full, required=False, hint=LOAD_HINT)


def load_pipeline(folder: str | Path, ema: bool = True, device="cpu", dtype=None) -> SavedPipeline:
    """Load a folder written by `save_pipeline` (safetensors only: no pickle on this path)."""
    from diffusers import DDPMScheduler  # here: diffusers' import is slow and not every caller loads a folder

    folder = Path(folder)
    if not (folder / EMA_DIR / "config.json").exists():
        raise WdmError(f"{folder} is not a wdmctl model folder (no {EMA_DIR}/config.json)")
    sub = EMA_DIR
    if not ema:
        if not (folder / ONLINE_DIR).exists():
            raise WdmError(f"{folder} holds only EMA weights; drop --no-ema")
        sub = ONLINE_DIR
    require_intact_pipeline(folder)
    try:
        model = load_model(folder / sub, device=device, dtype=dtype or torch.float32)
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).exists() else {}
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # what the checks above cannot foresee
        raise WdmError(f"cannot load {folder / sub}: {first_line(err, 200)}; {LOAD_HINT}") from None
    return SavedPipeline(folder, model, scheduler, meta)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _pipeline_class():
    """Defined lazily: importing diffusers' pipeline machinery is slow and the CLI must start fast."""
    from diffusers import DiffusionPipeline

    class WDMambaPipeline(DiffusionPipeline):
        """A thin diffusers pipeline around the denoiser and its DDPM training schedule.

        `pipe(num_images=8, class_labels=[207], seed=0)` returns uint8 NHWC images sampled exactly as
        `wdmctl sample` does. `save_pretrained`/`from_pretrained` use the folder layout of this module, so a
        pipeline and a training checkpoint's `pipeline/` folder are interchangeable.
        """

        model_cpu_offload_seq = "denoiser"

        def __init__(self, denoiser, scheduler):
            super().__init__()
            self.register_modules(denoiser=denoiser, scheduler=scheduler)
            self.wdmctl_meta: dict[str, Any] = {}

        def save_pretrained(self, save_directory, **kwargs):
            super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
            write_json_atomic(Path(save_directory) / META_FILE, self.wdmctl_meta)
            write_integrity(save_directory)

        @classmethod
        def from_pretrained(cls, folder, **kwargs):
            folder = Path(folder)
            require_intact_pipeline(folder)
            pipe = super().from_pretrained(folder, use_safetensors=True, **kwargs)
            meta_path = folder / META_FILE
            pipe.wdmctl_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            return pipe

        def __call__(self, num_images: int = 1, class_labels=None, num_inference_steps: int | None = None,
                     guidance_scale: float | None = None, seed: int = 0, solver: str | None = None,
                     batch_size: int = 16, precision: str = "fp32"):
            num_classes = int(self.denoiser.config.num_classes)
            defaults = sampling_defaults(self.wdmctl_meta)
            classes = resolve_classes([str(c) for c in class_labels] if class_labels is not None else None,
                                      num_classes, self.wdmctl_meta.get("class_names") or [])
            seeds = list(range(seed, seed + num_images))
            cfg = defaults["cfg"] if guidance_scale is None else guidance_scale
            return sample_images(
                self.denoiser, dict(self.scheduler.config), self.wdmctl_meta.get("autoencoder"), seeds,
                labels_for(seeds, classes, num_classes), num_inference_steps or defaults["steps"],
                cfg if num_classes else 1.0, solver or defaults["solver"], batch_size, self.device, precision,
            )

    return WDMambaPipeline


def pipeline_from_saved(saved: SavedPipeline):
    """A WDMambaPipeline around a loaded folder."""
    pipe = _pipeline_class()(saved.model, saved.scheduler)
    pipe.wdmctl_meta = dict(saved.meta)
    return pipe


def __getattr__(name: str):
    if name == "WDMambaPipeline":
        return _pipeline_class()
    raise AttributeError(name)
