"""`wdmctl export` (ONNX / TensorRT) and `wdmctl bench denoiser`."""

from __future__ import annotations

from typing import List, Optional

import typer

from wdmctl.cli.app import app
from wdmctl.cli.bench import bench_app

DEFAULT_BENCH_PRESETS = ["WDM-B/2", "WDM-XL/2"]


@app.command("export")
def export(
    run: Optional[str] = typer.Option(None, help="Run folder (default: the newest under ./runs)."),
    model: Optional[str] = typer.Option(None, help="A saved model folder instead of a run."),
    checkpoint: str = typer.Option("latest", help="'latest' or a step number."),
    out: Optional[str] = typer.Option(None, help="Export folder (default: <checkpoint>/export, where `wdmctl sample --backend onnx|trt` looks)."),
    onnx: bool = typer.Option(False, "--onnx", help="Export the ONNX graph (what happens when neither --onnx nor --trt is given)."),
    trt: bool = typer.Option(False, "--trt", help="Build a TensorRT engine for this GPU; exports the ONNX graph first when --out has none of these weights and settings."),
    batch_size: int = typer.Option(16, help="Images per denoiser batch; a conditional model's graph takes the guidance batch, 2x this."),
    resolution: Optional[int] = typer.Option(None, help="Input side: the latent side for latent models, 32 for 256 px (default: the trained size)."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16: the graph's precision (scan, softplus and norms stay fp32)."),
    scan: str = typer.Option("chunked", help="chunked | sequential: the unrolled form of the selective scan."),
    chunk_size: int = typer.Option(16, help="Tokens per chunk of the chunked scan."),
    opset: int = typer.Option(20, help="ONNX opset: 18 or newer (bf16: 22 or newer)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Accept any batch from 1 up to the graph's batch."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare ONNX Runtime with PyTorch after exporting; fail above the tolerance."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export in the folder."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Export the raw weights instead of the EMA."),
    optimization_level: int = typer.Option(3, min=0, max=5, help="TensorRT builder optimisation level (--trt)."),
) -> None:
    """Export the denoiser to ONNX (scan unrolled, standard ops only) and/or build a TensorRT engine."""
    from rich.console import Console

    from wdmctl.export.onnx_export import ExportSettings
    from wdmctl.export.workflow import ExportRequest, run_export

    console = Console(stderr=True)
    settings = ExportSettings(batch_size=batch_size, resolution=resolution, dtype=dtype, scan=scan,
                              chunk_size=chunk_size, opset=opset, dynamic_batch=dynamic_batch)
    out_dir, manifest = run_export(ExportRequest(run=run, model=model, checkpoint=checkpoint, out=out, onnx=onnx, trt=trt,
                                        settings=settings, verify=verify, overwrite=overwrite, ema=not no_ema,
                                        optimization_level=optimization_level),
                          log=lambda line: console.print(line, highlight=False))
    engines = manifest["tensorrt"]["engines"]
    typer.echo(f"export ok: {out_dir / manifest['onnx']['file']} ({manifest['onnx']['node_count']} nodes), "
               f"{len(engines)} TensorRT engine(s), {out_dir / 'manifest.json'}")


@bench_app.command("denoiser")
def bench_denoiser(
    presets: Optional[List[str]] = typer.Option(None, "--preset", help="Model preset with random weights (repeat; default: WDM-B/2 and WDM-XL/2)."),
    model: Optional[str] = typer.Option(None, help="A saved model folder instead of presets."),
    batch_size: int = typer.Option(8, min=1, help="Images per batch; conditional models run the guidance batch, 2x this."),
    resolution: Optional[int] = typer.Option(None, help="Input side (default: the model's trained size, 32 latents = 256 px)."),
    dtype: str = typer.Option("fp16", help="fp32 | fp16 | bf16, for every backend."),
    scan: str = typer.Option("chunked", help="chunked | sequential: the exported (and compiled) scan form."),
    chunk_size: int = typer.Option(16, help="Tokens per chunk of the chunked scan."),
    backends: str = typer.Option("eager,eager-torch-scan,compile,onnxruntime,tensorrt", help="Comma-separated subset of: eager, eager-torch-scan, compile, onnxruntime, tensorrt."),
    steps: int = typer.Option(50, min=1, help="Solver steps of the timed sampling run."),
    warmup: int = typer.Option(3, min=0, help="Untimed calls before timing."),
    iters: int = typer.Option(20, min=1, help="Timed denoiser calls (the median is reported)."),
    work_dir: Optional[str] = typer.Option(None, help="Where the ONNX exports go (reused when they match; default: a temporary folder)."),
    device: Optional[str] = typer.Option(None, help="cuda | cpu (default: cuda when available)."),
    out: Optional[str] = typer.Option(None, help="Also write the JSON here."),
) -> None:
    """Latency per denoiser call and N-step sampling time per backend, same shapes, same run (JSON)."""
    from wdmctl.export.benchmark import DenoiserBench, run_denoiser_bench

    bench = DenoiserBench(presets=presets or ([] if model else DEFAULT_BENCH_PRESETS), model=model,
                          batch_size=batch_size, resolution=resolution, dtype=dtype, scan=scan, chunk_size=chunk_size,
                          backends=[b.strip() for b in backends.split(",") if b.strip()], steps=steps, warmup=warmup,
                          iters=iters, work_dir=work_dir, device=device)
    typer.echo(run_denoiser_bench(bench, out))
