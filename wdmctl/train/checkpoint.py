"""Training checkpoints: every tensor once, as safetensors; nothing pickled, written or read.

    checkpoints/step-NNNNNNN/
      pipeline/                                    the saved-model folder that sample, fid and export read
        denoiser/                                  EMA weights (fp32) + config.json
        denoiser_online/                           the online weights, which training resumes from
        scheduler/  model_index.json  wdmctl.json  (see wdmctl.pipeline)
      optimizer.safetensors                        AdamW state per parameter: step, exp_avg, exp_avg_sq
      trainer_state.json                           counters, EMA update count, loss-scaler state, recipe hash
      integrity.json                               size + sha256 of every file above, written last

Resume reads the weights back from pipeline/, so that folder is the checkpoint's only copy of them. A
checkpoint is written by the main process under `checkpoints/.step-N.tmp` and renamed to `step-N` when
complete: a kill during a save leaves the previous checkpoint as the latest. `write_contents` is the one
place that writes files into a checkpoint.

A checkpoint is intact when its integrity.json (written last, so a checkpoint without one is incomplete)
matches every file it lists and its trainer_state.json names the folder's step. Resume hashes the checkpoint
it is about to load (it reads those bytes anyway) and falls back past damaged ones with a warning; pruning
and messages use the cheap check (sizes, safetensors framing, JSON). Pruning never deletes a damaged
checkpoint: it is the user's to inspect or remove.
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
from wdmctl.core.disk_full import write_failure
from wdmctl.core.integrity import CorruptFile, describe_problems, folder_problems, write_integrity
from wdmctl.core.io import write_json_atomic
from wdmctl.errors import WdmError
from wdmctl.pipeline import EMA_DIR, ONLINE_DIR, WEIGHTS_FILE, save_pipeline
from wdmctl.runs import CHECKPOINT_NAME, checkpoint_dir, list_checkpoints, remove_tree

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
    write_integrity(folder)  # last: a checkpoint without it is incomplete


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, **contents: Any) -> Path:
    """Write checkpoint `step` of the run (`write_contents(**contents)` by the main process, into a temporary
    folder renamed when complete), then prune to the newest `keep` intact ones. Any failure leaves the previous
    checkpoints untouched; a leftover temporary folder is ignored by readers and removed by the next save. A
    full disk (or another OS error) ends in a one-line error naming the file, the free space and the newest
    intact checkpoint."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_tree(tmp)
            tmp.mkdir()
            write_contents(tmp, **contents)
            remove_tree(final)  # only when re-saving a step this run already saved (same state), or a damaged one
            os.replace(tmp, final)
            prune_checkpoints(run_dir, keep)  # only now that the new one is in place
        except BaseException as err:
            # named before the partial folder (and the file it was writing) is removed
            failure = write_failure(err, tmp, f"saving checkpoint {final.name}", describe_newest_intact(run_dir),
                                    any_os_error=True)
            shutil.rmtree(tmp, ignore_errors=True)
            if failure is not None:
                raise failure from None
            raise
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------------
# Which checkpoints are intact: what resume falls back to, what pruning counts, what a failed save names
# ----------------------------------------------------------------------------------------------------

def refuse_old_layout(folder: Path) -> None:
    """A one-line error saying what to do with a checkpoint of Accelerate's pickled layout (format 1)."""
    if not (folder / STATE_FILE).exists() and any((folder / name).exists() for name in OLD_LAYOUT_FILES):
        raise WdmError(f"{folder} was written by an older wdmctl (Accelerate's pickled state), which this one does "
                       f"not resume; start a new run with --resume none (its pipeline/ folder still works with "
                       f"sample, fid and export)")


def checkpoint_problem(folder: str | Path, full: bool = False) -> str | None:
    """What is wrong with a checkpoint folder, in one line naming the file, or None when it is intact. `full`
    hashes every file too."""
    folder = Path(folder)
    problems = folder_problems(folder, full, required=True)
    if problems:
        return describe_problems(folder, problems)
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # not listed in integrity.json, so not checked above
        return f"{path}: missing or unreadable ({type(err).__name__})"
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        return f"{path}: format {found!r}, this wdmctl reads {FORMAT}"
    step = (state.get("progress") or {}).get("step")
    match = CHECKPOINT_NAME.match(folder.name)
    if not isinstance(step, int) or (match and step != int(match.group(1))):
        return f"{path}: no step matching the folder name (step {step!r})"
    return None


def newest_intact_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that passes the cheap check, or None."""
    for _, folder in reversed(list_checkpoints(run_dir)):
        if checkpoint_problem(folder) is None:
            return folder
    return None


def describe_newest_intact(run_dir: str | Path) -> str:
    """What a failed save leaves safe, for its one-line error."""
    newest = newest_intact_checkpoint(run_dir)
    if newest is None:
        return "this run has no intact checkpoint yet; free some space and rerun the same command"
    return f"the newest intact checkpoint is {newest}; free some space and rerun the same command to resume from it"


def resume_point(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint of a run (hashed), and a one-line warning for each newer one skipped as
    damaged or incomplete. (None, []) for a run without checkpoints; a one-line error when it has some but
    none is intact (starting it over would bury them under new ones), or when they are of the old layout."""
    skipped: list[tuple[Path, str]] = []
    for _, folder in reversed(list_checkpoints(run_dir)):
        refuse_old_layout(folder)
        problem = checkpoint_problem(folder, full=True)
        if problem is None:
            return folder, [f"skipped damaged checkpoint {bad.name} ({why}); resuming from {folder.name}"
                            for bad, why in skipped]
        skipped.append((folder, problem))
    if skipped:
        raise WdmError(f"{run_dir} has no intact checkpoint to resume from ({len(skipped)} damaged; newest: "
                       f"{skipped[0][1]}); --resume none starts a new run")
    return None, []


def require_resumable(folder: Path, asked: str) -> None:
    """`--resume PATH` names this very checkpoint: it must be intact (hashed), else a one-line error."""
    refuse_old_layout(folder)
    problem = checkpoint_problem(folder, full=True)
    if problem is not None:
        raise CorruptFile(f"--resume {asked}: the checkpoint is damaged ({problem}); resume from another "
                          f"checkpoint of {folder.parent.parent}")


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Remove intact checkpoints older than the newest `keep` intact ones (call it only once the new one is in
    place); damaged ones neither count nor go. Returns what was removed."""
    intact = [folder for _, folder in list_checkpoints(run_dir) if checkpoint_problem(folder) is None]
    doomed = intact[:-keep] if keep > 0 else []
    for folder in doomed:
        remove_tree(folder)
    return doomed


def load_checkpoint(folder: Path, *, net, ema, optimizer, progress: TrainState, scaler=None) -> None:
    """Restore what `write_contents` wrote, in place; safetensors and JSON only. `plan_run` chose (and hashed)
    the checkpoint; the cheap check here covers a process that loads without planning."""
    refuse_old_layout(folder)
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CorruptFile(f"cannot resume from {folder}: {problem}")
    state = json.loads((folder / STATE_FILE).read_text())
    pipeline = folder / PIPELINE_DIR
    net.load_state_dict(load_file(str(pipeline / ONLINE_DIR / WEIGHTS_FILE)))
    ema.model.load_state_dict(load_file(str(pipeline / EMA_DIR / WEIGHTS_FILE)))
    ema.num_updates = int(state["ema_updates"])
    load_optimizer_tensors(optimizer, load_file(str(folder / OPTIMIZER_FILE)))
    progress.load_state_dict(state["progress"])
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
