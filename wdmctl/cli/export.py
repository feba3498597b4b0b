"""`wdmctl export` (ONNX / TensorRT). Library imports are inside the command: they pull in torch."""

from __future__ import annotations

from typing import Optional

import typer

from wdmctl.cli import options
from wdmctl.cli.app import app


@app.command("export")
def export(
    run: Optional[str] = options.RUN,
    model: Optional[str] = options.MODEL,
    checkpoint: str = options.CHECKPOINT,
    out: Optional[str] = typer.Option(None, help="Export folder (default: <checkpoint>/export, where `wdmctl sample --backend onnx|trt` looks)."),
    onnx: bool = typer.Option(False, "--onnx", help="Export the ONNX graph (what happens when neither --onnx nor --trt is given)."),
    trt: bool = typer.Option(False, "--trt", help="Build a TensorRT engine for this GPU; exports the ONNX graph first when --out has none of these weights and settings."),
    batch_size: int = typer.Option(16, help="Images per denoiser batch; a conditional model's graph takes the guidance batch, 2x this."),
    resolution: Optional[int] = typer.Option(None, help="Input side: the latent side for latent models, 32 for 256 px (default: the trained size)."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16: the graph's precision (scan, softplus and norms stay fp32)."),
    scan: str = typer.Option("chunked", help="chunked | sequential: the unrolled form of the selective scan."),
    chunk_size: Optional[int] = typer.Option(None, help="Tokens per chunk of the chunked scan (default: the scan's own)."),
    opset: int = typer.Option(20, help="ONNX opset: 18 or newer (bf16: 22 or newer)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Accept any batch from 1 up to the graph's batch."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare ONNX Runtime with PyTorch after exporting; fail above the tolerance."),
    overwrite: bool = options.OVERWRITE,
    no_ema: bool = options.NO_EMA,
    optimization_level: int = typer.Option(3, min=0, max=5, help="TensorRT builder optimisation level (--trt)."),
) -> None:
    """Export the denoiser to ONNX (scan unrolled, standard ops only) and/or build a TensorRT engine."""
    from rich.console import Console

    from wdmctl.apps.export import ExportRequest, run_export
    from wdmctl.export.onnx_export import ExportSettings

    console = Console(stderr=True)
    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}  # None: ExportSettings' default, the scan's
    settings = ExportSettings(batch_size=batch_size, resolution=resolution, dtype=dtype, scan=scan, opset=opset,
                              dynamic_batch=dynamic_batch, **chunk)
    out_dir, manifest = run_export(ExportRequest(run=run, model=model, checkpoint=checkpoint, out=out, onnx=onnx, trt=trt,
                                        settings=settings, verify=verify, overwrite=overwrite, ema=not no_ema,
                                        optimization_level=optimization_level),
                          log=lambda line: console.print(line, highlight=False))
    engines = manifest["tensorrt"]["engines"]
    typer.echo(f"export ok: {out_dir / manifest['onnx']['file']} ({manifest['onnx']['node_count']} nodes), "
               f"{len(engines)} TensorRT engine(s), {out_dir / 'manifest.json'}")
