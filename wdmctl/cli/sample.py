"""`wdmctl sample`: images from a trained model."""

from __future__ import annotations

from typing import List, Optional

import typer

from wdmctl.cli.app import app
from wdmctl.cli.bench import PRESETS_HELP, SCAN_HELP, UVIT_HELP, bench_app, preset_runs, scan_overrides

CUDA_GRAPH_HELP = ("Replay the denoiser from CUDA graphs (one launch per call instead of hundreds; CUDA only; "
                   "the images match eager sampling to one uint8 level).")
CLIP_X0_HELP = "Clip each predicted x0 to [-1, 1] (default: on for pixel models, off for latent models)."


@app.command("sample")
def sample(
    run: Optional[str] = typer.Option(None, help="Run folder (default: the newest under ./runs)."),
    model: Optional[str] = typer.Option(None, help="A saved model folder instead of a run."),
    checkpoint: str = typer.Option("latest", help="'latest' or a step number."),
    n: int = typer.Option(64, "--n", min=1, help="Number of images."),
    classes: Optional[List[str]] = typer.Option(None, "--class", help="Class id or name (repeat or comma-separate), or 'random'."),
    steps: Optional[int] = typer.Option(None, min=1, max=1000, help="Solver steps (default: the recipe's, else 50)."),
    cfg: Optional[float] = typer.Option(None, min=0.0, help="Guidance weight w: uncond + w (cond - uncond); 1 = off."),
    solver: Optional[str] = typer.Option(None, help="dpm++2m | dpm++3m | dpm++2m-sde | ddim | unipc | euler (default: 2M guided, 3M unguided)."),
    seed: int = typer.Option(0, min=0, help="Image i gets seed + i, whatever the batch size or GPU count."),
    batch_size: int = typer.Option(16, min=1, help="Images per denoiser batch (per process)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: <run>/samples/step-...)."),
    grid: bool = typer.Option(True, "--grid/--no-grid", help="Also write grid.png."),
    npz: bool = typer.Option(False, "--npz", help="Also write samples.npz in the ADM evaluator's format."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the raw weights instead of the EMA."),
    precision: str = typer.Option("fp32", help="fp32 | bf16 | fp16 (the denoiser's autocast dtype)."),
    backend: str = typer.Option("torch", help="torch | onnx | trt (the last two need `wdmctl export` first)."),
    scan_backend: str = typer.Option("auto", help="Selective-scan backend for --backend torch."),
    export_dir: Optional[str] = typer.Option(None, help="Exported artifacts for --backend onnx|trt (default: <checkpoint>/export)."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: what Accelerate picks)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing, non-empty output folder."),
    clip_x0: Optional[bool] = typer.Option(None, "--clip-x0/--no-clip-x0", help=CLIP_X0_HELP),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help=CUDA_GRAPH_HELP),
) -> None:
    """Sample images with DPM-Solver++ (classifier-free guidance, per-image seeds, PNGs + grid + metadata)."""
    from rich.console import Console

    from wdmctl.sampling import SampleRequest, run_sample

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


@bench_app.command("sample")
def bench_sample(
    presets: str = typer.Option("WDM-B/2,WDM-XL/2", help=PRESETS_HELP),
    uvit: bool = typer.Option(True, "--uvit/--no-uvit", help=UVIT_HELP),
    backends: str = typer.Option("mamba_ssm,triton", help="Scan backends (unavailable ones are skipped)."),
    scan: Optional[str] = typer.Option(None, help=SCAN_HELP),
    batch: int = typer.Option(64, min=1, help="Images per batch."),
    resolution: int = typer.Option(32, min=2, help="Latent side (32 = 256 px images through the SD VAE)."),
    steps: int = typer.Option(50, min=1, help="Solver steps."),
    cfgs: str = typer.Option("1.0,1.5", help="Guidance weights to time (1 = unguided, one pass per step)."),
    precisions: str = typer.Option("bf16,fp32", help="Denoiser precisions to time."),
    iters: int = typer.Option(2, min=1, help="Timed sampling runs per configuration (median reported; one untimed first)."),
    cuda_graphs: str = typer.Option("off", help="off, on, or off,on: time eager launches, CUDA-graph replay, or both."),
    out: Optional[str] = typer.Option(None, help="Also write the JSON here."),
) -> None:
    """Sampling throughput (images/s over --steps solver steps) per preset, scan backend, guidance and precision."""
    import torch

    from wdmctl.bench import benchmark_sampling, parse_cuda_graphs, write_json
    from wdmctl.scan import available_backends

    runs, skipped = preset_runs(presets, uvit, backends, available_backends("cuda" if torch.cuda.is_available() else "cpu"),
                                attention=None)
    overrides = scan_overrides(scan, runs)
    graph_modes = parse_cuda_graphs(cuda_graphs)
    rows = [benchmark_sampling(preset, backend, batch, steps, float(cfg), precision, iters, resolution, graph,
                               **overrides[preset])
            for preset, backend in runs for cfg in cfgs.split(",") if cfg for precision in precisions.split(",") if precision
            for graph in graph_modes]
    typer.echo(write_json(out, {"benchmark": "sample", "results": rows,
                                "skipped_backends": skipped}))
