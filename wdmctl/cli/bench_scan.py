"""`wdmctl bench scan`: selective-scan (and causal conv1d) timings per backend, JSON naming the GPU."""

from __future__ import annotations

import typer

from wdmctl.cli.bench import bench_app


@bench_app.command("scan")
def bench_scan(
    shapes: str = typer.Option("64x1024x258,64x3072x258,64x1024x1026,64x3072x1026",
                               help="Comma-separated batch x d_inner x L shapes."),
    d_state: int = typer.Option(16, min=1, help="N, the state size."),
    dtype: str = typer.Option("bfloat16", help="Input dtype: bfloat16, float16 or float32."),
    backends: str = typer.Option("torch,mamba_ssm,triton", help="Scan backends to time (unavailable ones are skipped)."),
    iters: int = typer.Option(10, min=1, help="Timed groups of 5 back-to-back calls (median per call reported)."),
    profile: bool = typer.Option(True, help="Add a per-kernel GPU-time profile of the triton backend."),
    out: str = typer.Option(None, help="Also write the JSON here."),
) -> None:
    """Scan forward and forward+backward ms and GB/s of essential traffic (z gating, softplus, D skip),
    every backend in one run; causal conv1d + SiLU beside it."""
    import torch

    from wdmctl.bench import write_json
    from wdmctl.errors import WdmError
    from wdmctl.scan.benchmark import benchmark_scan

    if not torch.cuda.is_available():
        raise WdmError("`wdmctl bench scan` needs a CUDA GPU")
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in dtypes:
        raise WdmError(f"--dtype must be one of {', '.join(dtypes)}, not {dtype!r}")
    try:
        parsed = [tuple(int(v) for v in s.lower().split("x")) for s in shapes.split(",") if s.strip()]
    except ValueError:
        parsed = []
    if not parsed or any(len(s) != 3 or min(s) < 1 for s in parsed):
        raise WdmError(f"--shapes must look like 64x3072x258[,...], not {shapes!r}")
    payload = benchmark_scan(parsed, n=d_state, dtype=dtypes[dtype], iters=iters,
                             backends=tuple(b.strip() for b in backends.split(",") if b.strip()), profile=profile)
    typer.echo(write_json(out, payload))
