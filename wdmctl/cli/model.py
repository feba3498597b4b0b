"""`wdmctl model ...`: inspect presets and saved models. Library imports are inside the commands: they pull in
torch."""

from __future__ import annotations

import json

import typer

from wdmctl.cli.app import app

model_app = typer.Typer(help="Inspect model presets and saved models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("info")
def info(
    name: str = typer.Argument(..., help="A preset (e.g. WDM-XL/2; see `wdmctl model list`) or a saved model folder."),
    resolution: int = typer.Option(None, min=2, help="Latent/pixel side to count tokens and GFLOPs at (default: trained size)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Architecture summary: parameters per stage, tokens, GFLOPs per forward."""
    from wdmctl.models.loading import load_model_meta
    from wdmctl.models.summary import summarize
    from wdmctl.errors import WdmError

    model = load_model_meta(name)
    if resolution is not None and resolution % model.config.patch_size:
        raise WdmError(f"--resolution {resolution} is not divisible by the patch size {model.config.patch_size}")
    summary = summarize(model, resolution)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    cfg = summary["config"]
    table = Table(title=f"{name}  ({cfg['arch']}, width {cfg['width']}, patch {cfg['patch_size']}, scan {cfg['scan']})")
    table.add_column("stage")
    table.add_column("parameters", justify="right")
    for stage, count in summary["parameters_by_stage"].items():
        table.add_row(stage, f"{count / 1e6:.2f}M")
    table.add_row("[bold]total", f"[bold]{summary['parameters'] / 1e6:.2f}M")
    console = Console()
    console.print(table)
    c, h, w = summary["input"]
    console.print(f"input {c}x{h}x{w}, {summary['tokens']} tokens ({summary['patch_tokens']} patches), "
                  f"{summary['gflops_per_forward']:.1f} GFLOPs per forward (batch 1)")


@model_app.command("list")
def list_presets() -> None:
    """List the model presets."""
    from wdmctl.models.presets import PRESETS

    for name, cfg in PRESETS.items():
        typer.echo(f"{name:12s} arch={cfg['arch']:8s} width={cfg['width']}")
