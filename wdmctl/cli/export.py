"""`wdmctl export` (ONNX / TensorRT). Library imports are inside the command: they pull in torch."""

from __future__ import annotations

from typing import Optional

import typer

from wdmctl.cli import options
from wdmctl.cli.app import app
from wdmctl.core.precision import PRECISIONS

SCAN_FORM_HELP = ("linear-attention (the default): each scan as one LinearAttention node (fast; ONNX Runtime "
                  "only). unrolled (the default with --trt): standard ops only, chunks of --chunk-size tokens (any "
                  "runtime; what --trt builds from). sequential: standard ops, one step per token.")
LINEAR_ATTENTION_HELP = ("auto | standard | contrib: ONNX's opset-27 LinearAttention, or onnxruntime's "
                         "com.microsoft.LinearAttention; auto takes the standard op where the installed "
                         "onnxruntime runs it, else the contrib one.")
QUERY_KEY_HELP = ("auto | shared | per-channel: LinearAttention's query and key (the scan's C and B) as one head "
                  "that every channel reads (contrib op only: 2 of its 3 large inputs gone), or a copy per channel; "
                  "auto shares where the installed onnxruntime's contrib kernel takes it on the provider.")


@app.command("export")
def export(
    run: Optional[str] = options.RUN,
    model: Optional[str] = options.MODEL,
    checkpoint: str = options.CHECKPOINT,
    out: Optional[str] = typer.Option(None, help="Export folder (default: <checkpoint>/export, where `wdmctl sample --backend onnx|trt` looks)."),
    onnx: bool = typer.Option(False, "--onnx", help="Export the ONNX graph (what happens when neither --onnx nor --trt is given)."),
    trt: bool = typer.Option(False, "--trt", help="Build a TensorRT engine for this GPU from the unrolled graph; exports it first when --out has none of these weights and settings. Written to TensorRT's documented Python API, never run."),
    batch_size: int = typer.Option(16, help="Images per denoiser batch; a conditional model's graph takes the guidance batch, 2x this."),
    resolution: Optional[int] = typer.Option(None, help="Input side: the latent side for latent models, 32 for 256 px (default: the trained size)."),
    dtype: str = typer.Option("fp32", help=f"{' | '.join(PRECISIONS)}: the graph's precision (scan, softplus and norms stay fp32)."),
    scan_form: Optional[str] = typer.Option(None, help=SCAN_FORM_HELP),
    linear_attention: str = typer.Option("auto", help=LINEAR_ATTENTION_HELP),
    query_key: str = typer.Option("auto", help=QUERY_KEY_HELP),
    chunk_size: Optional[int] = typer.Option(None, help="Tokens per chunk of --scan-form unrolled (default: the torch scan's own)."),
    scan_dtype: str = typer.Option("fp32", help="fp32, or the --dtype: the precision of LinearAttention's inputs (the scan's fp32 island, or half the memory traffic)."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset: 18 or newer (bf16: 22 or newer; the standard LinearAttention: 27 or newer). Default: 27 with the standard LinearAttention, else 20."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Accept any batch from 1 up to the graph's batch."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare ONNX Runtime with PyTorch after exporting; fail above the tolerance."),
    overwrite: bool = options.OVERWRITE,
    no_ema: bool = options.NO_EMA,
    optimization_level: int = typer.Option(3, min=0, max=5, help="TensorRT builder optimisation level (--trt)."),
) -> None:
    """Export the denoiser to ONNX and/or build a TensorRT engine.

    Never run (TensorRT cannot be installed on the machines this was written and measured on): the TensorRT
    engine build and runtime (--trt, --backend trt). ONNX Runtime CUDA with I/O binding, CUDA graphs and the
    contrib LinearAttention (shared and per-channel query and key) ran on an H200, at 3.3x eager PyTorch's
    latency for WDM-B/2 (docs/export.md); the ONNX export, its verification and sampling run on ONNX Runtime's
    CPU provider in the tests."""
    from rich.console import Console

    from wdmctl.apps.export import ExportRequest, run_export
    from wdmctl.export.onnx_export import ExportSettings

    console = Console(stderr=True)
    # TensorRT has no LinearAttention: --trt builds from (and by default exports) the unrolled form
    scan_form = scan_form or ("unrolled" if trt else "linear-attention")
    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}  # None: ExportSettings' default, the scan's
    settings = ExportSettings(batch_size=batch_size, resolution=resolution, dtype=dtype, scan_form=scan_form,
                              linear_attention=linear_attention, query_key=query_key, scan_dtype=scan_dtype,
                              opset=opset, dynamic_batch=dynamic_batch, **chunk)
    out_dir, manifest = run_export(ExportRequest(run=run, model=model, checkpoint=checkpoint, out=out, onnx=onnx, trt=trt,
                                        settings=settings, verify=verify, overwrite=overwrite, ema=not no_ema,
                                        optimization_level=optimization_level),
                          log=lambda line: console.print(line, highlight=False))
    engines = manifest["tensorrt"]["engines"]
    typer.echo(f"export ok: {out_dir / manifest['onnx']['file']} ({manifest['onnx']['node_count']} nodes), "
               f"{len(engines)} TensorRT engine(s), {out_dir / 'manifest.json'}")
