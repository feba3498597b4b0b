"""`wdmctl sample`: images from a trained model. Library imports are inside the command: they pull in torch."""

from __future__ import annotations

from typing import List, Optional

import typer

from wdmctl.cli import options
from wdmctl.cli.app import app


@app.command("sample")
def sample(
    run: Optional[str] = options.RUN,
    model: Optional[str] = options.MODEL,
    checkpoint: str = options.CHECKPOINT,
    n: int = typer.Option(64, "--n", min=1, help="Number of images."),
    classes: Optional[List[str]] = typer.Option(None, "--class", help="Class id or name (repeat or comma-separate), or 'random'."),
    steps: Optional[int] = typer.Option(None, min=1, max=1000, help="Solver steps (default: the recipe's, else 50)."),
    cfg: Optional[float] = typer.Option(None, min=0.0, help="Guidance weight w: uncond + w (cond - uncond); 1 = off."),
    solver: Optional[str] = options.SOLVER,
    seed: int = typer.Option(0, min=0, help="Image i gets seed + i, whatever the batch size or GPU count."),
    batch_size: int = typer.Option(16, min=1, help="Images per denoiser batch (per process)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: <run>/samples/step-...)."),
    grid: bool = typer.Option(True, "--grid/--no-grid", help="Also write grid.png."),
    npz: bool = typer.Option(False, "--npz", help="Also write samples.npz in the ADM evaluator's format."),
    no_ema: bool = options.NO_EMA,
    precision: str = options.PRECISION,
    backend: str = typer.Option("torch", help="torch | onnx | trt (the last two need `wdmctl export` first)."),
    scan_backend: str = typer.Option("auto", help="Selective-scan backend for --backend torch."),
    export_dir: Optional[str] = typer.Option(None, help="Exported artifacts for --backend onnx|trt (default: <checkpoint>/export)."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: what Accelerate picks)."),
    overwrite: bool = options.OVERWRITE,
    clip_x0: Optional[bool] = options.CLIP_X0,
    cuda_graph: bool = options.CUDA_GRAPH,
) -> None:
    """Sample images with DPM-Solver++ (classifier-free guidance, per-image seeds, PNGs + grid + metadata)."""
    from rich.console import Console

    from wdmctl.apps.sample import SampleRequest, run_sample

    summary = run_sample(SampleRequest(
        run=run, model=model, checkpoint=checkpoint, n=n, classes=classes, steps=steps, cfg=cfg, solver=solver,
        seed=seed, batch_size=batch_size, out=out, grid=grid, npz=npz, ema=not no_ema, precision=precision,
        backend=backend, scan_backend=scan_backend, export_dir=export_dir, device=device, overwrite=overwrite,
        clip_x0=clip_x0, cuda_graph=cuda_graph,
    ))
    t = summary["timings"]
    Console().print(f"[green]wrote[/] {summary['n']} images to {summary['out']} "
                    f"({summary['solver']}, {summary['steps']} steps, cfg {summary['cfg']}, "
                    f"{t['images_per_second']:.2f} img/s)")
