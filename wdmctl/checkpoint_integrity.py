"""Which checkpoints of a run are intact: what resume falls back to, what pruning counts, what a failed save
names as safe.

A checkpoint is intact when its integrity.json (written last, so a checkpoint without one is incomplete)
matches every file it lists, and its meta.json is a JSON object whose step is the folder's step. Resume
hashes the checkpoint it is about to load (once per session, and it reads those bytes anyway); pruning and
messages use the cheap check (sizes, safetensors framing, JSON). Damaged checkpoints are never deleted by
pruning: they are the user's to inspect or remove.
"""

from __future__ import annotations

import json
from pathlib import Path

from wdmctl.errors import WdmError
from wdmctl.integrity import CorruptFile, describe_problems, folder_problems
from wdmctl.runs import CHECKPOINT_NAME, list_checkpoints, remove_tree

META_FILE = "meta.json"


def checkpoint_problem(checkpoint: str | Path, full: bool = False) -> str | None:
    """What is wrong with a checkpoint folder, in one line naming the file, or None when it is intact."""
    checkpoint = Path(checkpoint)
    problems = folder_problems(checkpoint, full, required=True)
    if problems:
        return describe_problems(checkpoint, problems)
    meta = json.loads((checkpoint / META_FILE).read_text()) if (checkpoint / META_FILE).is_file() else None
    match = CHECKPOINT_NAME.match(checkpoint.name)
    step = meta.get("step") if isinstance(meta, dict) else None
    if not isinstance(step, int) or (match and step != int(match.group(1))):
        return f"{checkpoint / META_FILE}: no step matching the folder name (step {step!r})"
    return None


def newest_intact_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that passes the cheap check, or None."""
    for _, checkpoint in reversed(list_checkpoints(run_dir)):
        if checkpoint_problem(checkpoint) is None:
            return checkpoint
    return None


def describe_newest_intact(run_dir: str | Path) -> str:
    """What a failed save leaves safe, for its one-line error."""
    newest = newest_intact_checkpoint(run_dir)
    if newest is None:
        return "this run has no intact checkpoint yet; free some space and rerun the same command"
    return f"the newest intact checkpoint is {newest}; free some space and rerun the same command to resume from it"


def resume_point(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint of a run (hashed), and a one-line note for each newer one skipped as
    damaged or incomplete. (None, []) for a run without checkpoints; a one-line error when it has some but
    none is intact (starting it over would bury them under new ones)."""
    skipped: list[tuple[Path, str]] = []
    for _, checkpoint in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint, full=True)
        if problem is None:
            notes = [f"skipped damaged checkpoint {bad.name} ({why}); resuming from {checkpoint.name}"
                     for bad, why in skipped]
            return checkpoint, notes
        skipped.append((checkpoint, problem))
    if skipped:
        bad, why = skipped[0]
        raise WdmError(f"{run_dir} has no intact checkpoint to resume from ({len(skipped)} damaged; newest: {why}); "
                       f"--resume none starts a new run")
    return None, []


def require_resumable(checkpoint: str | Path, asked: str) -> None:
    """`--resume PATH` names this very checkpoint: it must be intact (hashed), or a one-line error."""
    problem = checkpoint_problem(checkpoint, full=True)
    if problem is not None:
        raise CorruptFile(f"--resume {asked}: the checkpoint is damaged ({problem}); resume from another "
                          f"checkpoint of {Path(checkpoint).parent.parent}")


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Remove intact checkpoints older than the newest `keep` intact ones (call it only once the new one is in
    place); damaged ones neither count nor go. Returns what was removed."""
    intact = [path for _, path in list_checkpoints(run_dir) if checkpoint_problem(path) is None]
    doomed = intact[:-keep] if keep > 0 else []
    for path in doomed:
        remove_tree(path)
    return doomed
