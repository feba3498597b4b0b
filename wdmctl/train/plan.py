"""Planning a `train` command before anything is written: resolve the recipe against the cache, and decide
the run folder and the checkpoint to resume from (also what --dry-run prints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wdmctl import config as cfg
from wdmctl.data.cache import load_manifest
from wdmctl.errors import WdmError
from wdmctl.runs import newest_run, resolve_checkpoint_arg, run_suffix
from wdmctl.train.checkpoint import newest_intact_checkpoint, require_resumable, resume_point


@dataclass
class RunPlan:
    """What `train` will do, decided before anything is written (also what --dry-run prints)."""

    recipe: cfg.Recipe                  # resolved
    recipe_name: str
    runs_dir: Path
    manifest: dict[str, Any] | None
    run_dir: Path | None = None         # None: a new run folder will be created
    resume_from: Path | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # something is wrong but training goes on (a damaged checkpoint skipped)

    @property
    def suffix(self) -> str:
        return run_suffix(self.recipe_name, self.recipe.model.preset)

    def describe(self) -> str:
        where = str(self.run_dir) if self.run_dir else f"{self.runs_dir}/<next>-{self.suffix} (new)"
        lines = [f"run: {where}"]
        if self.resume_from is not None:
            lines.append(f"resume: {self.resume_from}")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings] + [f"note: {n}" for n in self.notes])


def load_cache_manifest(recipe: cfg.Recipe, required: bool = True) -> dict[str, Any] | None:
    """The cache manifest, or None (with `required` False) when the cache does not exist yet."""
    path = Path(recipe.data.cache)
    if not path.exists():
        if not required:
            return None
        raise WdmError(f"data.cache {path} does not exist; build it with `wdmctl cache` (the recipe's header "
                       f"comment has the command)")
    return load_manifest(path)


def plan_run(recipe: cfg.Recipe, recipe_name: str, runs_dir: str | Path = "runs", resume: str = "latest",
             manifest: dict[str, Any] | None = None, need_cache: bool = True) -> RunPlan:
    """Resolve the recipe against the cache and decide the run folder:

    - `resume="none"`: a new run.
    - `"latest"`: the newest run of the same recipe and model, resumed from its newest intact checkpoint (a
      warning for each newer one that is damaged or incomplete), unless its recipe differs in a key that
      changes the optimisation (then a new run, with a note saying why).
    - a path: a run folder resumes from its newest intact checkpoint, as above; a checkpoint folder must be
      intact (else a one-line error). The model must be the same. A checkpoint that is not its run's newest
      intact one continues in a new run folder, so no later checkpoint is ever overwritten.
    """
    if manifest is None:
        manifest = load_cache_manifest(recipe, required=need_cache)
    resolved = cfg.resolve(recipe, manifest)
    plan = RunPlan(resolved, recipe_name, Path(runs_dir), manifest)
    if manifest is None:
        plan.notes.append(f"cache {recipe.data.cache} not found: model fields shown from the preset; build the "
                          f"cache before training")
    if resume == "none":
        return plan
    if resume == "latest":
        run = newest_run(runs_dir, plan.suffix)
        if run is None:
            return plan
        changed = _recipe_changes(run, resolved)
        if changed is None or changed[0]:
            why = "its recipe.toml is missing" if changed is None else _describe_changes(changed[0])
            plan.notes.append(f"not resuming {run}: {why}; starting a new run (--resume {run} forces it)")
            return plan
        plan.run_dir = run
        plan.resume_from, plan.warnings = resume_point(run)  # past damaged or incomplete checkpoints, each warned of
        if changed[1]:
            plan.notes.append(f"resuming with changed settings: {_describe_changes(changed[1])}")
        return plan
    checkpoint = resolve_checkpoint_arg(resume)
    run = checkpoint.parent.parent
    if checkpoint.resolve() == Path(resume).resolve():  # a checkpoint named: it must be intact, no fallback
        require_resumable(checkpoint, resume)
        newest = newest_intact_checkpoint(run)
    else:  # a run folder: its newest intact checkpoint, past damaged ones
        checkpoint, plan.warnings = resume_point(run)
        newest = checkpoint
    changed = _recipe_changes(run, resolved)
    if changed is not None:
        model_changes = [c for c in changed[0] if c[0].startswith("model.")]
        if model_changes:
            raise WdmError(f"--resume {resume}: the checkpoint's model differs from the recipe's "
                           f"({_describe_changes(model_changes)})")
        if changed[0] or changed[1]:
            plan.notes.append(f"resuming with changed settings: {_describe_changes(changed[0] + changed[1])}")
    plan.resume_from = checkpoint
    if checkpoint == newest:
        plan.run_dir = run
    else:
        plan.notes.append(f"{checkpoint.name} is not the latest checkpoint of {run}; continuing in a new run")
    return plan


def _recipe_changes(run: Path, recipe: cfg.Recipe):
    """(changes that make it a different experiment, harmless changes) against run/recipe.toml, or None."""
    path = run / "recipe.toml"
    if not path.exists():
        return None
    old = cfg.with_model_defaults(cfg.read_recipe_file(path))   # keys added since the run: their defaults
    everything = cfg.differences(old, recipe)
    hard = cfg.differences(old, recipe, ignore=cfg.RESUMABLE_KEYS)
    return hard, [c for c in everything if c not in hard]


def _describe_changes(changes) -> str:
    shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes[:4])
    return shown + (f" (+{len(changes) - 4} more)" if len(changes) > 4 else "")
