"""`wdmctl bench train`: training throughput and peak memory per preset and scan backend, JSON naming the GPU."""

from __future__ import annotations

from typing import Optional

import typer

from wdmctl.cli.bench import bench_app


@bench_app.command("train")
def bench_train(
    presets: str = typer.Option("WDM-B/2,WDM-XL/2", help="Comma-separated presets (random weights)."),
    uvit: bool = typer.Option(True, "--uvit/--no-uvit", help="Also time each WD-Mamba preset's same-size U-ViT."),
    backends: str = typer.Option("torch,mamba_ssm,triton", help="Scan backends (unavailable ones are skipped)."),
    batch: int = typer.Option(32, min=1, help="Images per training step."),
    resolution: int = typer.Option(32, min=2, help="Latent side (32 = 256 px images through the SD VAE)."),
    precision: str = typer.Option("bf16", help="Autocast precision: bf16, fp16 or fp32."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the denoiser."),
    iters: int = typer.Option(10, min=1, help="Timed steps (median reported)."),
    warmup: int = typer.Option(3, min=0, help="Untimed steps first."),
    out: Optional[str] = typer.Option(None, help="Also write the JSON here."),
) -> None:
    """Images/s and peak memory of a full training step (loss, backward, clipping, AdamW) per preset and
    scan backend; an out-of-memory configuration is reported as such, not fatal."""
    import torch

    from wdmctl.bench import write_json
    from wdmctl.models.presets import PRESETS, SAME_SIZE_UVIT
    from wdmctl.scan import available_backends
    from wdmctl.training import benchmark_train_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    usable = available_backends(device)
    wanted = [b.strip() for b in backends.split(",") if b.strip()]
    names = [p.strip() for p in presets.split(",") if p.strip()]
    if uvit:
        names += [SAME_SIZE_UVIT[p] for p in names if p in SAME_SIZE_UVIT and SAME_SIZE_UVIT[p] not in names]
    rows, notes = [], [f"scan backend {b} is not available on {device}: skipped" for b in wanted if b not in usable]
    for name in names:
        # attention presets have no scan: one row, whatever the backends
        runs = [b for b in wanted if b in usable] if PRESETS.get(name, {}).get("arch") != "uvit" else ["auto"]
        for backend in runs:
            try:
                rows.append(benchmark_train_step(name, backend, batch, resolution, precision, iters, warmup,
                                                 gradient_checkpointing, compile))
            except torch.cuda.OutOfMemoryError:
                rows.append({"preset": name, "backend": backend, "batch_size": batch, "error": "out of memory"})
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
    typer.echo(write_json(out, {"benchmark": "train", "results": rows, "notes": notes}))
