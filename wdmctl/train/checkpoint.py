"""Training checkpoints: every tensor once, as safetensors; nothing pickled, written or read.

    checkpoints/step-NNNNNNN/
      pipeline/                                    the saved-model folder that sample, fid and export read
        denoiser/                                  EMA weights (fp32) + config.json
        denoiser_online/                           the online weights, which training resumes from
        scheduler/  model_index.json  wdmctl.json  (see wdmctl.pipeline)
      optimizer.safetensors                        AdamW state per parameter: step, exp_avg, exp_avg_sq
      trainer_state.json                           counters, EMA update count, loss-scaler state, recipe hash

Resume reads the weights back from pipeline/, so that folder is the checkpoint's only copy of them. A
checkpoint is written by the main process under `checkpoints/.step-N.tmp` and renamed to `step-N` when
complete: a kill during a save leaves the previous checkpoint as the latest. `write_contents` is the one
place that writes files into a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from wdmctl import config as cfg
from wdmctl.core.io import write_json_atomic
from wdmctl.errors import WdmError
from wdmctl.pipeline import EMA_DIR, ONLINE_DIR, WEIGHTS_FILE, save_pipeline
from wdmctl.runs import checkpoint_dir, list_checkpoints, remove_tree

FORMAT = "wdmctl-checkpoint/2"
PIPELINE_DIR = "pipeline"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
# what Accelerate's save_state wrote (format 1): model.safetensors, optimizer.bin, pickles for the rest
OLD_LAYOUT_FILES = ("custom_checkpoint_0.pkl", "optimizer.bin", "model.safetensors", "meta.json")


@dataclass
class TrainState:
    """Counters saved with every checkpoint."""

    step: int = 0               # optimizer steps taken, skipped ones included (their batch is consumed)
    images_seen: int = 0        # images of the steps that updated the weights
    skipped_steps: int = 0      # non-finite steps, in total
    nonfinite_in_a_row: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def pipeline_meta(recipe: cfg.Recipe, manifest: dict[str, Any], state: TrainState, run_dir: Path) -> dict[str, Any]:
    """wdmctl.json of a checkpoint's pipeline folder: what sample/fid/export need besides the weights."""
    sample, fid = recipe.sample, recipe.fid
    return {
        "autoencoder": manifest["autoencoder"],
        "class_names": list(manifest.get("class_names") or []),
        "num_classes": recipe.model.num_classes,
        "latent_shape": list(manifest["latent_shape"]),
        "resolution": manifest.get("resolution"),
        "sample": {"steps": sample.steps, "cfg": sample.cfg, "solver": sample.solver},
        "fid": {"num": fid.num, "ref": fid.ref, "resolution": fid.resolution or manifest.get("resolution"),
                "steps": fid.steps, "cfg": fid.cfg},
        "step": state.step,
        "images_seen": state.images_seen,
        "recipe": cfg.to_dict(recipe),
        "recipe_hash": cfg.recipe_hash(recipe),
        "cache": str(Path(recipe.data.cache).resolve()),
        "run": run_dir.name,
    }


# ----------------------------------------------------------------------------------------------------
# Optimizer state as named tensors
# ----------------------------------------------------------------------------------------------------

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """`{"<parameter index>.<slot>": tensor}` of the optimizer's per-parameter state (AdamW: step, exp_avg,
    exp_avg_sq). The hyperparameters are not saved: the recipe rebuilds them and may not change on resume."""
    tensors = {}
    for index, slots in optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            tensors[f"{index}.{slot}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)


# ----------------------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------------------

def write_contents(folder: Path, *, net, ema, optimizer, noise_scheduler, progress: TrainState, meta: dict[str, Any],
                   scaler=None) -> None:
    """Every file of a checkpoint, written into `folder` (the temporary folder of `save_checkpoint`)."""
    save_pipeline(folder / PIPELINE_DIR, ema.model, noise_scheduler, meta, online_model=net)
    save_file(optimizer_tensors(optimizer), str(folder / OPTIMIZER_FILE))
    write_json_atomic(folder / STATE_FILE, {
        "format": FORMAT,
        "progress": progress.state_dict(),
        "ema_updates": ema.num_updates,
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "recipe_hash": meta["recipe_hash"],
    })


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, **contents: Any) -> Path:
    """Write checkpoint `step` of the run (`write_contents(**contents)` by the main process, into a temporary
    folder renamed when complete), then prune to the newest `keep`. Any failure leaves the previous
    checkpoints untouched; a leftover temporary folder is ignored by readers and removed by the next save."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_tree(tmp)
            tmp.mkdir()
            write_contents(tmp, **contents)
            remove_tree(final)  # only when re-saving a step this run already saved (same state)
            os.replace(tmp, final)
            for _, old in list_checkpoints(run_dir)[:-keep]:
                remove_tree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()
    return final


def check_resumable(folder: Path) -> Path:
    """`folder` if training can resume from it, else a one-line error saying what to do."""
    if (folder / STATE_FILE).exists():
        return folder
    if any((folder / name).exists() for name in OLD_LAYOUT_FILES):
        raise WdmError(f"{folder} was written by an older wdmctl (Accelerate's pickled state), which this one does "
                       f"not resume; start a new run with --resume none (its pipeline/ folder still works with "
                       f"sample, fid and export)")
    raise WdmError(f"{folder} is not a complete checkpoint (no {STATE_FILE})")


def load_checkpoint(folder: Path, *, net, ema, optimizer, progress: TrainState, scaler=None) -> None:
    """Restore what `write_contents` wrote, in place; safetensors and JSON only."""
    state = json.loads((check_resumable(folder) / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise WdmError(f"{folder / STATE_FILE} is format {state.get('format')!r}, this wdmctl reads {FORMAT}")
    pipeline = folder / PIPELINE_DIR
    net.load_state_dict(load_file(str(pipeline / ONLINE_DIR / WEIGHTS_FILE)))
    ema.model.load_state_dict(load_file(str(pipeline / EMA_DIR / WEIGHTS_FILE)))
    ema.num_updates = int(state["ema_updates"])
    load_optimizer_tensors(optimizer, load_file(str(folder / OPTIMIZER_FILE)))
    progress.load_state_dict(state["progress"])
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
