"""`wdmctl model ...`: inspect presets and saved models."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wdmctl.cli.app import app
from wdmctl.cli.bench import bench_app

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


@bench_app.command("model")
def bench_model(
    presets: str = typer.Option("WDM-B/2,WDM-XL/2", help="Comma-separated presets; each gets its same-size U-ViT too."),
    backends: str = typer.Option("torch,mamba_ssm,triton", help="Scan backends to time (unavailable ones are skipped)."),
    batch: int = typer.Option(64, min=1, help="Batch size."),
    resolution: int = typer.Option(None, min=2, help="Latent side (default: the preset's, 32 = 256 px with SD-VAE)."),
    iters: int = typer.Option(10, min=1, help="Timed iterations (median reported)."),
    out: str = typer.Option(None, help="Also write the JSON here."),
) -> None:
    """Forward and train-step images/s and peak memory per preset and scan backend, U-ViT beside it."""
    from wdmctl.bench import benchmark_model, write_json
    from wdmctl.models.presets import SAME_SIZE_UVIT, preset_config
    from wdmctl.scan import available_backends

    device_type = "cuda" if _cuda() else "cpu"
    usable = available_backends(device_type)
    wanted = [b.strip() for b in backends.split(",") if b.strip()]
    rows, skipped = [], [b for b in wanted if b not in usable]
    for preset in [p.strip() for p in presets.split(",") if p.strip()]:
        preset_config(preset)  # validates the name
        for backend in [b for b in wanted if b in usable]:
            rows.append(benchmark_model(preset, backend, batch, resolution, iters=iters))
        if preset in SAME_SIZE_UVIT:
            rows.append(benchmark_model(SAME_SIZE_UVIT[preset], None, batch, resolution, iters=iters))
    typer.echo(write_json(out, {"benchmark": "model", "results": rows, "skipped_backends": skipped}))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
