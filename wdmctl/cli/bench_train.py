"""`wdmctl bench train`: training throughput and peak memory per preset and scan backend, JSON naming the GPU."""

from __future__ import annotations

from typing import Optional

import typer

from wdmctl.cli.bench import PRESETS_HELP, SCAN_HELP, UVIT_HELP, bench_app, preset_runs, scan_overrides


@bench_app.command("train")
def bench_train(
    presets: str = typer.Option("WDM-B/2,WDM-XL/2", help=PRESETS_HELP),
    uvit: bool = typer.Option(True, "--uvit/--no-uvit", help=UVIT_HELP),
    backends: str = typer.Option("torch,mamba_ssm,triton", help="Scan backends (unavailable ones are skipped)."),
    scan: Optional[str] = typer.Option(None, help=SCAN_HELP),
    batch: int = typer.Option(32, min=1, help="Images per training step."),
    resolution: int = typer.Option(32, min=2, help="Latent side (32 = 256 px images through the SD VAE)."),
    precision: str = typer.Option("bf16", help="Autocast precision: bf16, fp16 or fp32."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the denoiser."),
    cuda_graphs: str = typer.Option("off", help="off, on, or off,on: time the step with eager launches, replayed as "
                                    "one CUDA graph (forward, backward, clipping, AdamW; CUDA only), or both."),
    profile: bool = typer.Option(False, "--profile", help="Add where each step's GPU time goes, by kernel category "
                                 "(scan, conv1d, GEMM, attention, optimizer, ...), and how busy the GPU was."),
    iters: int = typer.Option(10, min=1, help="Timed steps (median reported)."),
    warmup: int = typer.Option(3, min=0, help="Untimed steps first."),
    out: Optional[str] = typer.Option(None, help="Also write the JSON here."),
) -> None:
    """Images/s and peak memory of a full training step (loss, backward, clipping, AdamW) per preset and
    scan backend; an out-of-memory configuration is reported as such, not fatal."""
    import torch

    from wdmctl.bench import parse_cuda_graphs, write_json
    from wdmctl.errors import WdmError, first_line
    from wdmctl.scan import available_backends
    from wdmctl.training import benchmark_train_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    graph_modes = parse_cuda_graphs(cuda_graphs)
    if any(graph_modes) and device != "cuda":
        raise WdmError("--cuda-graphs on needs a CUDA device")
    runs, skipped = preset_runs(presets, uvit, backends, available_backends(device), attention="auto")
    overrides = scan_overrides(scan, runs)
    rows, notes = [], [f"scan backend {b} is not available on {device}: skipped" for b in skipped]
    for (name, backend), graphed in ((run, g) for run in runs for g in graph_modes):
        try:
            rows.append(benchmark_train_step(name, backend, batch, resolution, precision, iters, warmup,
                                             gradient_checkpointing, compile, profile=profile, cuda_graph=graphed,
                                             **overrides[name]))
        except torch.cuda.OutOfMemoryError:
            rows.append({"preset": name, "backend": backend, "batch_size": batch, "cuda_graph": graphed,
                         "error": "out of memory"})
        except Exception as err:  # noqa: BLE001 - a configuration torch.compile cannot handle is a result too
            if not compile:
                raise
            rows.append({"preset": name, "backend": backend, "batch_size": batch, "compile": True,
                         "error": f"torch.compile failed: {type(err).__name__}: {first_line(err, 300)}"})
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    typer.echo(write_json(out, {"benchmark": "train", "results": rows, "notes": notes}))
