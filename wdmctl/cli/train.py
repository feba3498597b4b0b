"""`wdmctl train RECIPE`: parse and validate, then hand over to `wdmctl.train.trainer.train`.
Library imports are inside the command: they pull in torch."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from wdmctl.cli.app import app


@app.command("train")
def train_command(
    recipe: Path = typer.Argument(..., help="TOML recipe, e.g. recipes/quickstart.toml."),
    sets: Optional[List[str]] = typer.Option(
        None, "--set", "-s", metavar="SECTION.KEY=VALUE",
        help="Override a recipe key (repeatable); the value is read as TOML: 2e-4, true, [0.9, 0.99], \"WDM-B/2\"."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Print the resolved recipe and run folder, then exit."),
    resume: str = typer.Option("latest", help="latest (the newest run of this recipe and model), none, or a run "
                                              "or checkpoint folder."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run folders live."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1,
                                            help="Total steps to train to (same as --set train.max_steps=N)."),
    verify: bool = typer.Option(False, "--verify", help="Hash every cache shard against the cache manifest before "
                                                        "training (sizes and framing are always checked)."),
) -> None:
    """Train a WD-Mamba diffusion model from a recipe; rerun the same command to resume.

    Examples:

      wdmctl train recipes/quickstart.toml

      wdmctl train recipes/cifar10.toml --set optim.lr=1e-4 --set train.batch_size=256

      accelerate launch --num_processes 8 -m wdmctl train recipes/imagenet256.toml
    """
    from wdmctl import config
    from wdmctl.train.plan import plan_run
    from wdmctl.train.trainer import train

    overrides = list(sets or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    loaded = config.load_recipe(recipe, overrides)
    name = recipe.stem
    if dry_run:
        plan = plan_run(loaded, name, runs_dir, resume, need_cache=False)
        typer.echo(config.to_toml(plan.recipe).rstrip())
        typer.echo("")
        typer.echo(plan.describe())
        typer.echo(_model_line(plan.recipe))
        return
    run_dir = train(loaded, name, runs_dir=runs_dir, resume=resume, verify=verify)
    from accelerate import PartialState

    if PartialState().is_main_process:
        typer.echo(f"done: {run_dir}")


def _model_line(recipe) -> str:
    """Parameter count of the resolved model, built on the meta device (no memory, no time)."""
    import torch

    from wdmctl.config import model_kwargs
    from wdmctl.models.presets import build_model

    with torch.device("meta"):
        model = build_model(recipe.model.preset, **model_kwargs(recipe))
    params = sum(p.numel() for p in model.parameters())
    m = recipe.model
    return (f"model: {m.preset} ({model.config.arch}, width {m.width}, depth {m.depth}, patch {m.patch_size}) "
            f"{params / 1e6:.2f}M parameters on {m.in_channels}x{m.sample_size}x{m.sample_size}, "
            f"{m.num_classes or 'no'} classes")
