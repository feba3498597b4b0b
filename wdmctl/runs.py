"""Run directories: where `wdmctl train` writes, and how every other command finds a run and its checkpoints.

    runs/<NNNNN>-<recipe>-<model>/        e.g. runs/00003-cifar10-WDM-S2 (EDM/DiT numbering)
      recipe.toml                         the resolved recipe (overrides applied, model shape filled in)
      log.txt  stats.jsonl  loss.png      log lines, one JSON record per log interval, the loss curve
      tb/                                 TensorBoard events (when tensorboard is installed)
      samples/grid-NNNNNNN.png            EMA samples from fixed noise and labels
      checkpoints/step-NNNNNNN/           weights, EMA, optimizer state and counters (wdmctl.train.checkpoint),
        pipeline/                         the weights inside the from_pretrained folder that sample/fid/export read

A checkpoint folder is written under a temporary dot-name and renamed when complete, so every
`step-*` folder is whole; dot-folders are leftovers of an interrupted save and are ignored.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from wdmctl.errors import WdmError

RUN_NAME = re.compile(r"^(\d{5})-(.+)$")
CHECKPOINT_NAME = re.compile(r"^step-(\d{7,})$")
DEFAULT_ROOT = "runs"


def model_tag(preset: str) -> str:
    """A preset name fit for a folder name: "WDM-XL/2" -> "WDM-XL2"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "", preset) or "model"


def run_suffix(recipe_name: str, preset: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', recipe_name)}-{model_tag(preset)}"


def list_runs(root: str | Path = DEFAULT_ROOT) -> list[Path]:
    """Run folders under `root`, oldest (lowest number) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and RUN_NAME.match(p.name)]
    return sorted(runs, key=lambda p: int(RUN_NAME.match(p.name).group(1)))


def newest_run(root: str | Path = DEFAULT_ROOT, suffix: str | None = None) -> Path | None:
    """The highest-numbered run (whose name ends in `-suffix`... exactly `NNNNN-suffix` when given)."""
    runs = [p for p in list_runs(root) if suffix is None or RUN_NAME.match(p.name).group(2) == suffix]
    return runs[-1] if runs else None


def create_run_dir(root: str | Path, suffix: str) -> Path:
    """Make `root/<next number>-suffix` (exclusive create: two launches never share a folder)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        runs = list_runs(root)
        number = int(RUN_NAME.match(runs[-1].name).group(1)) + 1 if runs else 0
        path = root / f"{number:05d}-{suffix}"
        try:
            path.mkdir()
        except FileExistsError:  # another process took this number between listing and mkdir
            continue
        return path


def find_run(run: str | Path | None = None, root: str | Path = DEFAULT_ROOT) -> Path:
    """A run folder: `run` as a path, as a run number ("3", "00003") or name under `root`, or the newest
    run under `root` when None. One-line error when there is none."""
    root = Path(root)
    if run is None:
        newest = newest_run(root)
        if newest is None:
            raise WdmError(f"no runs under {root}/; train one with `wdmctl train RECIPE` or pass --run DIR")
        return newest
    path = Path(run)
    if path.is_dir():
        return path
    text = str(run)
    for candidate in list_runs(root):
        number, _ = RUN_NAME.match(candidate.name).groups()
        if text == candidate.name or (text.isdigit() and int(text) == int(number)):
            return candidate
    raise WdmError(f"run {text!r} not found (neither a folder nor a run under {root}/)")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's complete checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def checkpoint_pipeline(run_dir: str | Path, checkpoint: str | int = "latest") -> Path:
    """The `pipeline/` folder of checkpoint `checkpoint` ("latest" or a step) of a run."""
    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise WdmError(f"run {run_dir} has no checkpoints yet (train longer, or lower train.checkpoint_every)")
    if str(checkpoint) == "latest":
        path = checkpoints[-1][1]
    else:
        try:
            step = int(checkpoint)
        except ValueError:
            raise WdmError(f"--checkpoint must be latest or a step number, not {checkpoint!r}") from None
        by_step = dict(checkpoints)
        if step not in by_step:
            steps = ", ".join(str(s) for s, _ in checkpoints[-5:])
            raise WdmError(f"run {run_dir} has no checkpoint at step {step}; it has {steps}")
        path = by_step[step]
    pipeline = path / "pipeline"
    if not (pipeline / "denoiser" / "config.json").exists():
        raise WdmError(f"{path} has no pipeline/ folder (a checkpoint from an older wdmctl?)")
    return pipeline


def resolve_pipeline_dir(run: str | None = None, model: str | None = None, checkpoint: str = "latest") -> Path:
    """--model DIR wins; otherwise the checkpoint of --run (default: the newest run under ./runs)."""
    if run and model:
        raise WdmError("give --run or --model, not both")
    if model:
        path = Path(model)
        if not (path / "denoiser" / "config.json").exists():
            raise WdmError(f"--model {model}: not a wdmctl model folder (no denoiser/config.json)")
        return path
    return checkpoint_pipeline(find_run(run), checkpoint)


def resolve_checkpoint_arg(resume: str | Path) -> Path:
    """`--resume PATH`: a checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(resume)
    if CHECKPOINT_NAME.match(path.name) and path.is_dir():
        return path
    if path.is_dir() and (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise WdmError(f"--resume {resume}: the run has no checkpoints to resume from")
        return latest
    raise WdmError(f"--resume must be latest, none, a run folder or a checkpoint folder (step-NNNNNNN); "
                   f"{resume} is neither")


def remove_tree(path: Path) -> None:
    """rmtree that renames first, so a kill mid-delete never leaves a half folder under a valid name."""
    import shutil

    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


class RunLock:
    """`run/.lock` while a training process writes the run: a second `wdmctl train` of the same recipe
    (say, a job requeued while the first still runs) would otherwise resume and write the same checkpoints.
    A lock left by a process that no longer exists on this host is taken over."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and not _process_alive(other.get("pid")):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise WdmError(f"run {self.path.parent} is in use by process {other.get('pid', '?')} on "
                               f"{other.get('host', '?')} (since {other.get('since', '?')}); wait for it, or start "
                               f"a new run with --resume none (delete {self.path} if that process is gone)") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise WdmError(f"could not lock {self.path.parent}")  # pragma: no cover - lost a race twice

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _process_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
