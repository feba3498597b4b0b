"""`wdmctl bench ...`: benchmarks that print (and with --out write) JSON naming the device, baselines measured
in the same run. Every sub-command is here except `bench cache`, which lives with `wdmctl cache`.

Library imports are inside the commands: they pull in torch, and `wdmctl --help` must start without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from wdmctl.cli import options
from wdmctl.cli.app import app
from wdmctl.core.precision import PRECISIONS
from wdmctl.errors import WdmError

bench_app = typer.Typer(help="Benchmarks (JSON output naming the GPU; baselines from the same run).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

DEFAULT_DENOISER_PRESETS = ["WDM-B/2", "WDM-XL/2"]


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def parse_off_on(text: str, option: str) -> list[bool]:
    """`off|on|off,on` -> [False], [True], [False, True]."""
    modes = {"off": False, "on": True}
    words = _words(text)
    if not words or any(w not in modes for w in words):
        raise WdmError(f"{option} takes off, on or off,on, not {text!r}")
    return [modes[w] for w in words]


def parse_cuda_graphs(text: str) -> list[bool]:
    return parse_off_on(text, "--cuda-graphs")


def parse_sizes(text: str | None, resolution: int, batch: int) -> list[tuple[int, int]]:
    """`--sizes 32:64,64:32,128:8` -> [(latent side, batch), ...]; a size without `:BATCH` takes --batch;
    no --sizes: [(--resolution, --batch)]."""
    if text is None:
        return [(resolution, batch)]
    sizes = []
    for word in _words(text):
        side, _, size_batch = word.partition(":")
        try:
            sizes.append((int(side), int(size_batch) if size_batch else batch))
        except ValueError:
            sizes = []
            break
    if not sizes or any(min(size) < 1 for size in sizes):
        raise WdmError(f"--sizes takes latent sides with optional batches, like 32:64,64:32,128:8, not {text!r}")
    return sizes


def _precisions(text: str, option: str) -> list[str]:
    words = _words(text)
    if not words or any(w not in PRECISIONS for w in words):
        raise WdmError(f"{option} takes {', '.join(PRECISIONS)} (comma-separated), not {text!r}")
    return words


def parse_scan_shapes(text: str) -> list[tuple[int, int, int]]:
    """`64x1536x258,8x1536x4098` -> [(batch, d_inner, L), ...]."""
    try:
        parsed = [tuple(int(v) for v in s.lower().split("x")) for s in _words(text)]
    except ValueError:
        parsed = []
    if not parsed or any(len(s) != 3 or min(s) < 1 for s in parsed):
        raise WdmError(f"--shapes must look like 64x3072x258[,...], not {text!r}")
    return parsed


def parse_kernel_configs(text: str | None) -> dict[str, tuple] | None:
    """`fwd=32,1;bwd1=32,1,168` -> {"fwd": (32, 1), "bwd1": (32, 1, 168)}: launch configs (BD, warps[, maxnreg])
    per scan kernel kind."""
    if text is None:
        return None
    from wdmctl.bench.sass import DEFAULT_CONFIGS

    configs = {}
    for part in (p.strip() for p in text.split(";") if p.strip()):
        kind, _, values = part.partition("=")
        try:
            config = tuple(int(v) for v in values.split(","))
        except ValueError:
            config = ()
        if kind.strip() not in DEFAULT_CONFIGS or len(config) not in (2, 3) or min(config) < 1:
            raise WdmError(f"--configs takes KIND=BD,WARPS[,MAXNREG] for {', '.join(DEFAULT_CONFIGS)} separated by "
                           f"';', not {text!r}")
        configs[kind.strip()] = config
    return {**DEFAULT_CONFIGS, **configs}


def scan_overrides(scan: str | None, runs: list[tuple[str, str]]) -> dict[str, dict]:
    """Model overrides per preset for --scan (checked here, before any run): none for the presets' own mode
    or a U-ViT, else {"scan": mode}."""
    from wdmctl.models.wdmamba import SCAN_MODES

    if scan is not None and scan not in SCAN_MODES:
        raise WdmError(f"--scan must be one of {', '.join(SCAN_MODES)}, not {scan!r}")
    return {name: {"scan": scan} if scan and not _is_uvit(name) else {} for name, _ in runs}


def _is_uvit(name: str) -> bool:
    from wdmctl.models.presets import PRESETS

    return PRESETS.get(name, {}).get("arch") == "uvit"


def preset_runs(presets: str, uvit: bool, backends: str, usable: list[str], attention: str | None):
    """(preset, scan backend) pairs to time: each preset with every wanted backend that is available, and its
    same-size U-ViT once (it has no scan: `attention` stands in for the backend)."""
    from wdmctl.models.presets import SAME_SIZE_UVIT, preset_config

    names = _words(presets)
    for name in names:
        preset_config(name)  # an unknown preset: one line, before any run
    if uvit:
        names += [SAME_SIZE_UVIT[p] for p in names if p in SAME_SIZE_UVIT and SAME_SIZE_UVIT[p] not in names]
    wanted = _words(backends)
    runs = []
    for name in names:
        scans = [attention] if _is_uvit(name) else [b for b in wanted if b in usable]
        runs += [(name, backend) for backend in scans]
    return runs, [b for b in wanted if b not in usable]


def save_so_far(out: str | None, benchmark: str, rows: list[dict], total: int, key: str = "results") -> None:
    """Write the rows measured so far to --out (under `key`, as the finished payload has them), marked partial:
    a run stopped by a time limit still leaves them (the finished command overwrites the file)."""
    if out:
        from wdmctl.core.device import write_json

        write_json(out, {"benchmark": benchmark, key: rows, "partial": f"{len(rows)} of {total} configurations"})


def _device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@bench_app.command("model")
def bench_model(
    presets: str = options.PRESETS,
    uvit: bool = options.UVIT,
    backends: str = typer.Option("torch,mamba_ssm,triton", help="Scan backends to time (unavailable ones are skipped)."),
    batch: int = typer.Option(64, min=1, help="Batch size."),
    resolution: int = typer.Option(None, min=2, help="Latent side (default: the preset's, 32 = 256 px with SD-VAE)."),
    iters: int = typer.Option(10, min=1, help="Timed iterations (median reported)."),
    out: Optional[str] = options.JSON_OUT,
) -> None:
    """Forward and train-step images/s and peak memory per preset and scan backend, U-ViT beside it."""
    from wdmctl.bench.model import benchmark_model
    from wdmctl.core.device import write_json
    from wdmctl.scan import available_backends

    runs, skipped = preset_runs(presets, uvit, backends, available_backends(_device_type()), attention=None)
    rows = [benchmark_model(preset, backend, batch, resolution, iters=iters) for preset, backend in runs]
    typer.echo(write_json(out, {"benchmark": "model", "results": rows, "skipped_backends": skipped}))


@bench_app.command("train")
def bench_train(
    presets: str = options.PRESETS,
    uvit: bool = options.UVIT,
    backends: str = typer.Option("torch,mamba_ssm,triton", help="Scan backends (unavailable ones are skipped)."),
    scan: Optional[str] = options.SCAN,
    batch: int = typer.Option(32, min=1, help="Images per training step."),
    resolution: int = options.LATENT_SIDE,
    sizes: Optional[str] = options.SIZES,
    precision: str = typer.Option("bf16", help=f"Autocast precision: {', '.join(PRECISIONS)}."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations."),
    compile: str = typer.Option("off", "--compile", help="off, on, or off,on: torch.compile the denoiser (the "
                                "Triton scan and conv stay opaque custom ops), or time both."),
    cuda_graphs: str = options.CUDA_GRAPHS,
    profile: bool = typer.Option(False, "--profile", help="Add where each step's GPU time goes, by kernel category "
                                 "(scan, conv1d, GEMM, attention, optimizer, ...), and how busy the GPU was."),
    iters: int = typer.Option(10, min=1, help="Timed steps (median reported)."),
    warmup: int = typer.Option(3, min=0, help="Untimed steps first."),
    out: Optional[str] = options.JSON_OUT,
) -> None:
    """Images/s and peak memory of a full training step (loss, backward, clipping, AdamW) per preset, scan
    backend, size and mode; with U-ViT beside, each WD-Mamba row's speed ratio and the size where it overtakes
    (issue 16's scaling table). An out-of-memory configuration is reported as such, not fatal."""
    import torch

    from wdmctl.bench.scaling import OUT_OF_MEMORY, scaling_summary
    from wdmctl.bench.train import benchmark_train_step
    from wdmctl.core.device import write_json
    from wdmctl.errors import first_line
    from wdmctl.scan import available_backends

    device = _device_type()
    graph_modes = parse_cuda_graphs(cuda_graphs)
    compile_modes = parse_off_on(compile, "--compile")
    size_list = parse_sizes(sizes, resolution, batch)
    _precisions(precision, "--precision")
    if any(graph_modes) and device != "cuda":
        raise WdmError("--cuda-graphs on needs a CUDA device")
    runs, skipped = preset_runs(presets, uvit, backends, available_backends(device), attention="auto")
    overrides = scan_overrides(scan, runs)
    rows, notes = [], [f"scan backend {b} is not available on {device}: skipped" for b in skipped]
    configurations = [(size, run, c, g) for size in size_list for run in runs for c in compile_modes for g in graph_modes]
    for (side, size_batch), (name, backend), compiled, graphed in configurations:
        where = {"preset": name, "backend": backend, "batch_size": size_batch, "resolution": side,
                 "compile": compiled, "cuda_graph": graphed}
        try:
            rows.append(benchmark_train_step(name, backend, size_batch, side, precision, iters, warmup,
                                             gradient_checkpointing, compiled, profile=profile, cuda_graph=graphed,
                                             **overrides[name]))
        except torch.cuda.OutOfMemoryError:
            rows.append({**where, "error": OUT_OF_MEMORY})
        except Exception as err:  # noqa: BLE001 - a configuration torch.compile cannot handle is a result too
            if not compiled:
                raise
            rows.append({**where, "error": f"torch.compile failed: {type(err).__name__}: {first_line(err, 300)}"})
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        save_so_far(out, "train", rows, len(configurations))
    summary = scaling_summary(rows, "images_per_s", "batch_size", ("cuda_graph", "compile"))
    typer.echo(write_json(out, {"benchmark": "train", "results": rows, **summary, "notes": notes}))


@bench_app.command("sample")
def bench_sample(
    presets: str = options.PRESETS,
    uvit: bool = options.UVIT,
    backends: str = typer.Option("mamba_ssm,triton", help="Scan backends (unavailable ones are skipped)."),
    scan: Optional[str] = options.SCAN,
    batch: int = typer.Option(64, min=1, help="Images per batch."),
    resolution: int = options.LATENT_SIDE,
    sizes: Optional[str] = options.SIZES,
    steps: int = typer.Option(50, min=1, help="Solver steps."),
    cfgs: str = typer.Option("1.0,1.5", help="Guidance weights to time (1 = unguided, one pass per step)."),
    precisions: str = typer.Option("bf16,fp32", help="Denoiser precisions to time."),
    iters: int = typer.Option(2, min=1, help="Timed sampling runs per configuration (median reported; a short untimed one first)."),
    cuda_graphs: str = options.CUDA_GRAPHS,
    out: Optional[str] = options.JSON_OUT,
) -> None:
    """Sampling throughput (images/s over --steps solver steps) and peak memory per preset, scan backend, size,
    guidance and precision; with U-ViT beside, each WD-Mamba row's speed ratio and the size where it overtakes."""
    import torch

    from wdmctl.bench.sample import benchmark_sampling
    from wdmctl.bench.scaling import OUT_OF_MEMORY, scaling_summary
    from wdmctl.core.device import write_json
    from wdmctl.scan import available_backends

    runs, skipped = preset_runs(presets, uvit, backends, available_backends(_device_type()), attention=None)
    overrides = scan_overrides(scan, runs)
    graph_modes = parse_cuda_graphs(cuda_graphs)
    size_list = parse_sizes(sizes, resolution, batch)
    guidance, precision_list = [float(cfg) for cfg in _words(cfgs)], _precisions(precisions, "--precisions")
    rows = []
    configurations = [(size, run, c, p, g) for size in size_list for run in runs for c in guidance
                      for p in precision_list for g in graph_modes]
    for (side, size_batch), (preset, backend), cfg, precision, graph in configurations:
        try:
            rows.append(benchmark_sampling(preset, backend, size_batch, steps, cfg, precision, iters, side, graph,
                                           **overrides[preset]))
        except torch.cuda.OutOfMemoryError:
            rows.append({"preset": preset, "scan_backend": backend, "batch": size_batch, "resolution": side,
                         "cfg": cfg, "precision": precision, "cuda_graph": graph, "error": OUT_OF_MEMORY})
            torch.cuda.empty_cache()
        save_so_far(out, "sample", rows, len(configurations))
    summary = scaling_summary(rows, "images_per_second", "batch", ("cuda_graph", "cfg", "precision"))
    typer.echo(write_json(out, {"benchmark": "sample", "results": rows, **summary, "skipped_backends": skipped}))


@bench_app.command("scan")
def bench_scan(
    shapes: str = typer.Option("64x1024x258,64x3072x258,64x1024x1026,64x3072x1026",
                               help="Comma-separated batch x d_inner x L shapes."),
    d_state: int = typer.Option(16, min=1, help="N, the state size."),
    precision: str = typer.Option("bf16", "--precision", help=f"Input precision: {', '.join(PRECISIONS)}."),
    backends: str = typer.Option("torch,mamba_ssm,triton", help="Scan backends to time (unavailable ones are skipped)."),
    iters: int = typer.Option(10, min=1, help="Timed groups of 5 back-to-back calls (median per call reported)."),
    profile: bool = typer.Option(True, help="Add a per-kernel GPU-time profile of the triton backend."),
    layouts: str = typer.Option("model,contiguous,contiguous-token-major", help="Input layouts: model (the mixer's "
                                "strided views), contiguous ((batch, d, L) copies), contiguous-token-major (triton "
                                "only: those copied to token-major memory first, the copies timed)."),
    segments: str = typer.Option("default", help="Segment counts to time triton-segmented with (comma-separated; "
                                 "`default`: its own choice)."),
    convs: bool = typer.Option(True, help="Time the causal conv1d and the 2-D conv beside the scan."),
    out: Optional[str] = options.JSON_OUT,
) -> None:
    """Scan forward and forward+backward ms and GB/s of essential traffic (z gating, softplus, D skip),
    every backend in one run (triton-segmented beside triton: `segmented_vs_triton`); causal conv1d + SiLU
    beside it."""
    from wdmctl.bench.scan import benchmark_scan
    from wdmctl.core.device import write_json
    from wdmctl.core.precision import torch_dtype

    if _device_type() != "cuda":
        raise WdmError("`wdmctl bench scan` needs a CUDA GPU")
    dtype = torch_dtype(precision)
    parsed = parse_scan_shapes(shapes)
    from wdmctl.bench.scan import LAYOUTS

    wanted_layouts = tuple(_words(layouts))
    if not wanted_layouts or any(v not in LAYOUTS for v in wanted_layouts):
        raise WdmError(f"--layouts takes {', '.join(LAYOUTS)}, not {layouts!r}")
    try:
        counts = tuple(None if v == "default" else int(v) for v in _words(segments))
    except ValueError:
        counts = ()
    if not counts or any(c is not None and c < 1 for c in counts):
        raise WdmError(f"--segments takes positive counts or `default`, not {segments!r}")
    payload = benchmark_scan(parsed, n=d_state, dtype=dtype, iters=iters, backends=tuple(_words(backends)),
                             profile=profile, layouts=wanted_layouts, segments=counts, convs=convs,
                             on_row=lambda rows, total: save_so_far(out, "selective_scan", rows, total, key="rows"))
    typer.echo(write_json(out, payload))


@bench_app.command("sass")
def bench_sass(
    shapes: str = typer.Option("64x1536x258,32x1536x1026,8x1536x4098",
                               help="Comma-separated batch x d_inner x L shapes (default: WDM-B/2's scans at 256, "
                               "1,024 and 4,096 tokens)."),
    measured: Optional[Path] = typer.Option(None, "--measured", exists=True, dir_okay=False,
                                            help="A `bench scan` JSON (with triton rows and its profile): its GPU, "
                                            "the configs its tuner chose and its per-kernel times."),
    configs: Optional[str] = typer.Option(None, "--configs", help="Launch configs where no --measured run names "
                                          "them: 'fwd=32,1;bwd1=32,1,168;bwd2=32,1,168' (the H200's at 256 tokens)."),
    out: Optional[str] = options.JSON_OUT,
) -> None:
    """The triton scan kernels' step loops read from their sm_90 machine code (no GPU needed): instructions per
    step by class, registers, occupancy, and the time no scheduling can beat, beside a measured run's."""
    from wdmctl.bench.sass import benchmark_sass
    from wdmctl.core.device import write_json

    payload = benchmark_sass(parse_scan_shapes(shapes), measured=str(measured) if measured else None,
                             configs=parse_kernel_configs(configs))
    typer.echo(write_json(out, payload))


@bench_app.command("inception")
def bench_inception(
    batch_size: int = typer.Option(200, "--batch-size", min=1, help="Images per batch."),
    resolution: int = typer.Option(256, "--resolution", min=8, help="Input image size (resized to 299)."),
    iters: int = typer.Option(10, "--iters", min=1, help="Timed batches (median reported)."),
    inception: Optional[str] = options.INCEPTION,
    device: Optional[str] = options.DEVICE,
    out: Optional[str] = options.JSON_OUT,
) -> None:
    """FID Inception throughput (images/s): uint8 batch to features, and the network alone."""
    from wdmctl.bench.inception import benchmark_throughput
    from wdmctl.core.device import write_json
    from wdmctl.fid.inception import load_inception

    extractor = load_inception(inception, device, batch_size)
    payload = benchmark_throughput(extractor, resolution=resolution, batch_size=batch_size, iters=iters)
    payload["torch_device"] = str(extractor.device)
    typer.echo(write_json(out, payload))


@bench_app.command("denoiser")
def bench_denoiser(
    presets: Optional[List[str]] = typer.Option(None, "--preset", help="Model preset with random weights (repeat; default: WDM-B/2 and WDM-XL/2)."),
    model: Optional[str] = options.MODEL,
    batch_sizes: Optional[List[int]] = typer.Option(None, "--batch-size", min=1, help="Images per batch (repeat; default: 8 and 32); conditional models run the guidance batch, 2x this."),
    resolution: Optional[int] = typer.Option(None, help="Input side (default: the model's trained size, 32 latents = 256 px)."),
    dtype: str = typer.Option("fp16", help=f"{' | '.join(PRECISIONS)}, for every backend."),
    chunk_size: Optional[int] = typer.Option(None, help="Tokens per chunk of the unrolled form (default: the torch scan's own)."),
    linear_attention: str = typer.Option("auto", help="auto | standard | contrib: the LinearAttention op of the linear-attention export."),
    backends: Optional[str] = typer.Option(None, help="Comma-separated, of: eager, eager-cuda-graph, eager-torch-scan, compile, ort-linear-attention, ort-linear-attention-dtype-scan, ort-linear-attention-per-channel, ort-unrolled, tensorrt (default: all but eager-torch-scan and compile)."),
    steps: int = typer.Option(0, min=0, help="Also time an N-step sampling run per backend (0: latency only)."),
    warmup: int = typer.Option(3, min=0, help="Untimed calls before timing."),
    iters: int = typer.Option(20, min=1, help="Timed denoiser calls (the median is reported)."),
    work_dir: Optional[str] = typer.Option(None, help="Where the ONNX exports go (reused when they match; default: a temporary folder)."),
    device: Optional[str] = typer.Option(None, help="cuda | cpu (default: cuda when available)."),
    profile: bool = typer.Option(False, "--profile", help="Add where each backend's call spends its GPU time, by kernel category (CUDA; ONNX Runtime's and TensorRT's kernels included)."),
    out: Optional[str] = options.JSON_OUT,
) -> None:
    """Latency per denoiser call per backend and batch size, against eager PyTorch in the same run (JSON naming the GPU)."""
    from wdmctl.bench.denoiser import DenoiserBench, run_denoiser_bench

    chosen = {"batch_sizes": batch_sizes} if batch_sizes else {}
    if backends:
        chosen["backends"] = _words(backends)
    if chunk_size is not None:  # None: DenoiserBench's default, the scan's
        chosen["chunk_size"] = chunk_size
    bench = DenoiserBench(presets=presets or ([] if model else DEFAULT_DENOISER_PRESETS), model=model,
                          resolution=resolution, dtype=dtype, linear_attention=linear_attention, steps=steps,
                          warmup=warmup, iters=iters, work_dir=work_dir, device=device, profile=profile, **chosen)
    typer.echo(run_denoiser_bench(bench, out))


@bench_app.command("cache")
def bench_cache(
    out: Path = typer.Option(None, "--out", help="Write the JSON here too."),
    taef2: Path = typer.Option(None, "--taef2", help="TAEF2 weights folder (random weights when omitted)."),
    resolution: int = typer.Option(256, min=8, max=4096, help="Image side."),
    batch_size: int = typer.Option(64, min=1, max=4096, help="Images per batch."),
    dtype: str = typer.Option("bf16", help=f"Encoder precision: {', '.join(PRECISIONS)}."),
    iters: int = typer.Option(10, min=1, max=1000, help="Timed iterations (median reported)."),
) -> None:
    """Encoding throughput (images/s) of an SD-VAE-sized AutoencoderKL and of TAEF2."""
    from wdmctl.bench.cache import benchmark_encode
    from wdmctl.core.precision import torch_dtype
    from wdmctl.core.device import write_json

    payload = benchmark_encode(str(taef2) if taef2 else None, resolution, batch_size,
                               torch_dtype(dtype, "--dtype"), warmup=min(3, iters), iters=iters)
    typer.echo(write_json(out, payload))
