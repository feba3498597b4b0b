"""`wdmctl export` (ONNX / TensorRT) and `wdmctl bench denoiser`."""

from __future__ import annotations

from typing import List, Optional

import typer

from wdmctl.cli.app import app
from wdmctl.cli.bench import bench_app

DEFAULT_BENCH_PRESETS = ["WDM-B/2", "WDM-XL/2"]
SCAN_FORM_HELP = ("linear-attention (the default): each scan as one LinearAttention node (fast; ONNX Runtime "
                  "only). unrolled (the default with --trt): standard ops only, chunks of --chunk-size tokens (any "
                  "runtime; what --trt builds from). sequential: standard ops, one step per token.")
LINEAR_ATTENTION_HELP = ("auto | standard | contrib: ONNX's opset-27 LinearAttention, or onnxruntime's "
                         "com.microsoft.LinearAttention; auto takes the standard op where the installed "
                         "onnxruntime runs it, else the contrib one.")


@app.command("export")
def export(
    run: Optional[str] = typer.Option(None, help="Run folder (default: the newest under ./runs)."),
    model: Optional[str] = typer.Option(None, help="A saved model folder instead of a run."),
    checkpoint: str = typer.Option("latest", help="'latest' or a step number."),
    out: Optional[str] = typer.Option(None, help="Export folder (default: <checkpoint>/export, where `wdmctl sample --backend onnx|trt` looks)."),
    onnx: bool = typer.Option(False, "--onnx", help="Export the ONNX graph (what happens when neither --onnx nor --trt is given)."),
    trt: bool = typer.Option(False, "--trt", help="Build a TensorRT engine for this GPU from the unrolled graph; exports it first when --out has none of these weights and settings. Written to TensorRT's documented Python API, never run."),
    batch_size: int = typer.Option(16, help="Images per denoiser batch; a conditional model's graph takes the guidance batch, 2x this."),
    resolution: Optional[int] = typer.Option(None, help="Input side: the latent side for latent models, 32 for 256 px (default: the trained size)."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16: the graph's precision (scan, softplus and norms stay fp32)."),
    scan_form: Optional[str] = typer.Option(None, help=SCAN_FORM_HELP),
    linear_attention: str = typer.Option("auto", help=LINEAR_ATTENTION_HELP),
    chunk_size: int = typer.Option(16, help="Tokens per chunk of --scan-form unrolled."),
    scan_dtype: str = typer.Option("fp32", help="fp32, or the --dtype: the precision of LinearAttention's inputs (the scan's fp32 island, or half the memory traffic)."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset: 18 or newer (bf16: 22 or newer; the standard LinearAttention: 27 or newer). Default: 27 with the standard LinearAttention, else 20."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Accept any batch from 1 up to the graph's batch."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare ONNX Runtime with PyTorch after exporting; fail above the tolerance."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export in the folder."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Export the raw weights instead of the EMA."),
    optimization_level: int = typer.Option(3, min=0, max=5, help="TensorRT builder optimisation level (--trt)."),
) -> None:
    """Export the denoiser to ONNX and/or build a TensorRT engine.

    Never run (no GPU, and TensorRT cannot be installed where this was written): the TensorRT engine build
    and runtime (--trt, --backend trt); on ONNX Runtime's CUDA provider, its CUDA graphs and the
    LinearAttention op (I/O binding ran on an H200 with the earlier unrolled graph). The ONNX export, its
    verification and sampling run on ONNX Runtime's CPU provider in the tests."""
    from rich.console import Console

    from wdmctl.export.onnx_export import ExportSettings
    from wdmctl.export.workflow import ExportRequest, run_export

    console = Console(stderr=True)
    # TensorRT has no LinearAttention: --trt builds from (and by default exports) the unrolled form
    scan_form = scan_form or ("unrolled" if trt else "linear-attention")
    settings = ExportSettings(batch_size=batch_size, resolution=resolution, dtype=dtype, scan_form=scan_form,
                              linear_attention=linear_attention, chunk_size=chunk_size, scan_dtype=scan_dtype,
                              opset=opset, dynamic_batch=dynamic_batch)
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
    batch_sizes: Optional[List[int]] = typer.Option(None, "--batch-size", min=1, help="Images per batch (repeat; default: 8 and 32); conditional models run the guidance batch, 2x this."),
    resolution: Optional[int] = typer.Option(None, help="Input side (default: the model's trained size, 32 latents = 256 px)."),
    dtype: str = typer.Option("fp16", help="fp32 | fp16 | bf16, for every backend."),
    chunk_size: int = typer.Option(16, help="Tokens per chunk of the unrolled form."),
    linear_attention: str = typer.Option("auto", help="auto | standard | contrib: the LinearAttention op of the linear-attention export."),
    backends: Optional[str] = typer.Option(None, help="Comma-separated, of: eager, eager-cuda-graph, eager-torch-scan, compile, ort-linear-attention, ort-unrolled, tensorrt (default: all but eager-torch-scan and compile)."),
    steps: int = typer.Option(0, min=0, help="Also time an N-step sampling run per backend (0: latency only)."),
    warmup: int = typer.Option(3, min=0, help="Untimed calls before timing."),
    iters: int = typer.Option(20, min=1, help="Timed denoiser calls (the median is reported)."),
    work_dir: Optional[str] = typer.Option(None, help="Where the ONNX exports go (reused when they match; default: a temporary folder)."),
    device: Optional[str] = typer.Option(None, help="cuda | cpu (default: cuda when available)."),
    out: Optional[str] = typer.Option(None, help="Also write the JSON here."),
) -> None:
    """Latency per denoiser call per backend and batch size, against eager PyTorch in the same run (JSON naming the GPU)."""
    from wdmctl.export.benchmark import DenoiserBench, run_denoiser_bench

    chosen = {"batch_sizes": batch_sizes} if batch_sizes else {}
    if backends:
        chosen["backends"] = [b.strip() for b in backends.split(",") if b.strip()]
    bench = DenoiserBench(presets=presets or ([] if model else DEFAULT_BENCH_PRESETS), model=model,
                          resolution=resolution, dtype=dtype, chunk_size=chunk_size, linear_attention=linear_attention,
                          steps=steps, warmup=warmup, iters=iters, work_dir=work_dir, device=device, **chosen)
    typer.echo(run_denoiser_bench(bench, out))
