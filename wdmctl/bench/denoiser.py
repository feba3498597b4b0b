"""`wdmctl bench denoiser`: one denoiser, several backends, the same inputs, one process.

Backends (each skipped with its reason when it cannot run here):
  eager                  what `wdmctl sample` runs: scan backend "auto" (the fused CUDA/Triton scans when
                         installed), autocast to the dtype
  eager-cuda-graph       the same, replayed from CUDA graphs (`wdmctl sample --cuda-graph`)
  eager-torch-scan       the unrolled form's computation in eager PyTorch (torch scan, weights in the dtype)
  compile                torch.compile of that same computation
  ort-linear-attention   the linear-attention export on ONNX Runtime (CUDA EP: I/O binding and CUDA graphs)
  ort-linear-attention-dtype-scan  the same with LinearAttention's inputs in the dtype (--scan-dtype)
  ort-linear-attention-per-channel  the same with a query and key per channel (--query-key per-channel), where
                         the default graph shares them (the runtime's contrib kernel takes the shared shapes)
  ort-unrolled           the unrolled export on ONNX Runtime (the same runtime)
  tensorrt               a TensorRT engine built from the unrolled export, replayed as a CUDA graph

For every model and every batch size: the first call (setup, compilation, capture), the median latency of
one denoiser call at the graph batch (2 x images for a conditional model: the guidance batch), the ratio to
`eager` and the rel-L2 of the output against `eager`'s on the same inputs, optionally the time of a whole
N-step sampling run (DPM-Solver++, guidance 1.5 for conditional models), for PyTorch backends, peak
CUDA memory, and optionally (`profile`, CUDA) where a call's GPU time goes, by kernel category: torch.profiler's
CUPTI records every kernel the process launches, so ONNX Runtime's and TensorRT's kernels are counted as well. Each export's node count, export time and verification (ONNX Runtime vs fp32 PyTorch) is
recorded beside them.
"""

from __future__ import annotations

import copy
import gc
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from wdmctl.core.hashing import state_dict_sha256
from wdmctl.errors import MissingDependency, WdmError, first_line
from wdmctl.export.onnx_export import (ExportSettings, ensure_onnx, example_inputs, prepare_for_export,
                                       source_identity)
from wdmctl.export.runtime import default_provider
from wdmctl.scan.torch_scan import DEFAULT_CHUNK_SIZE

# export -> its ExportSettings beyond the bench's own (dtype, batch, chunk size, LinearAttention choice);
# scan_dtype None: the bench's dtype. An export whose resolved settings equal an earlier one's is not made twice.
EXPORTS = {"linear-attention": {"scan_form": "linear-attention"},
           "linear-attention-dtype-scan": {"scan_form": "linear-attention", "scan_dtype": None},
           "linear-attention-per-channel": {"scan_form": "linear-attention", "query_key": "per-channel"},
           "unrolled": {"scan_form": "unrolled"}}
# backend -> the export it runs (None: PyTorch on the model itself)
BENCH_BACKENDS = {"eager": None, "eager-cuda-graph": None, "eager-torch-scan": None, "compile": None,
                  "ort-linear-attention": "linear-attention",
                  "ort-linear-attention-dtype-scan": "linear-attention-dtype-scan",
                  "ort-linear-attention-per-channel": "linear-attention-per-channel",
                  "ort-unrolled": "unrolled", "tensorrt": "unrolled"}
DEFAULT_BACKENDS = ("eager", "eager-cuda-graph", "ort-linear-attention", "ort-linear-attention-dtype-scan",
                    "ort-linear-attention-per-channel", "ort-unrolled", "tensorrt")
BASELINE = "eager"
GUIDANCE = 1.5
PROFILED_CALLS = 3
PROFILE_NEEDS_CUDA = ("kernel profiles need CUDA: they are CUPTI's records of the GPU kernels (ONNX Runtime's CPU "
                      "provider launches none)")


@dataclass
class DenoiserBench:
    """What to benchmark (the CLI's options)."""

    presets: list[str] = field(default_factory=list)
    model: str | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [8, 32])
    resolution: int | None = None
    dtype: str = "fp16"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    linear_attention: str = "auto"
    backends: list[str] = field(default_factory=lambda: list(DEFAULT_BACKENDS))
    steps: int = 0
    warmup: int = 3
    iters: int = 20
    work_dir: str | None = None
    device: str | None = None
    profile: bool = False


def _models(bench: DenoiserBench):
    """(label, model on CPU, source identity) for each model asked for."""
    if bench.model:
        from wdmctl.pipeline import load_pipeline

        pipe = load_pipeline(bench.model, device="cpu")
        yield bench.model, pipe.model, source_identity(Path(bench.model), True, pipe.meta)
        return
    from wdmctl.models.presets import build_model

    for name in bench.presets:
        torch.manual_seed(0)
        model = build_model(name).eval()
        yield name, model, {"preset": name, "weights": "random, torch.manual_seed(0)", "ema": None,
                            "weights_sha256": state_dict_sha256(model)}


def _ort_has_cuda() -> bool:
    """ORT runs graphs on the GPU here (export.runtime's provider choice); False without ONNX Runtime."""
    try:
        return default_provider() == "CUDAExecutionProvider"
    except MissingDependency:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _no_grad(fn: Callable) -> Callable:
    def call(x, t, y):
        with torch.no_grad():
            return fn(x, t, y)
    return call


def _make_denoiser(backend: str, model, settings: ExportSettings, export_dir: Path | None, device: torch.device):
    """(denoise(x, t, y), description) for one backend; `settings` and `export_dir` are those of its form."""
    if backend in ("eager", "eager-cuda-graph"):
        from wdmctl.diffusion.sampler import model_denoiser
        from wdmctl.scan import resolve_backend

        eager = copy.deepcopy(model).to(device).eval()
        eager.set_scan_backend("auto")
        scan = resolve_backend("auto", device.type).name
        graph = backend == "eager-cuda-graph"
        return (model_denoiser(eager, settings.dtype, cuda_graph=graph),
                f"PyTorch eager, scan backend {scan}, autocast {settings.dtype}{', CUDA graphs' if graph else ''}")
    if backend in ("eager-torch-scan", "compile"):
        twin = prepare_for_export(model, settings.dtype, "unrolled", settings.chunk_size).to(device)
        what = f"unrolled torch scan (chunks of {settings.chunk_size}), {settings.dtype} weights with fp32 islands"
        if backend == "compile":
            return _no_grad(torch.compile(twin)), f"torch.compile (default mode) of the exported computation: {what}"
        return _no_grad(twin), f"PyTorch eager of the exported computation: {what}"
    from wdmctl.export.runtime import load_exported_denoiser

    if backend.startswith("ort-"):
        denoise = load_exported_denoiser(export_dir, "onnx", device)
        runner = denoise.runner
        if device.type != "cuda":
            return denoise, "ONNX Runtime CPU EP"
        graph = "CUDA graph" if runner.cuda_graph else (runner.cuda_graph_note or "no CUDA graph")
        return denoise, f"ONNX Runtime CUDA EP, I/O binding, {graph}"
    from wdmctl.export.tensorrt_build import build_engine

    entry = build_engine(export_dir, device=device, log=lambda line: None)
    denoise = load_exported_denoiser(export_dir, "trt", device)
    return denoise, (f"TensorRT {entry['tensorrt']} engine (strongly typed, built in {entry['build_seconds']} s), "
                     "CUDA graph replay")


def _sampling_seconds(denoise: Callable, config, settings: ExportSettings, steps: int, device: torch.device) -> float:
    """Wall time of one `steps`-step sampling run of `batch_size` images (guided when conditional)."""
    from wdmctl.diffusion.sampler import denoise_loop
    from wdmctl.diffusion.schedule import default_solver, make_noise_scheduler, make_sampler

    conditional = config.num_classes > 0
    sampler = make_sampler(dict(make_noise_scheduler().config), default_solver(conditional))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(settings.batch_size, config.in_channels, settings.resolution, settings.resolution,
                        generator=g).to(device)
    labels = (torch.arange(settings.batch_size) % config.num_classes).to(device) if conditional else None
    _sync(device)
    started = time.perf_counter()
    denoise_loop(denoise, sampler, noise, labels, config.num_classes if conditional else None,
                 GUIDANCE if conditional else 1.0, steps, None)
    _sync(device)
    return time.perf_counter() - started


def _time_backend(backend: str, denoise: Callable, inputs: tuple, model_config, settings: ExportSettings,
                  bench: DenoiserBench, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    """The timings of one backend, and its output on `inputs` (fp32, CPU) for the comparison with eager."""
    from wdmctl.core.timing import peak_memory_gib, profile_kernels, step_profile, time_fn

    x, t, *rest = (v.to(device) for v in inputs)
    y = rest[0] if rest else None
    _sync(device)
    started = time.perf_counter()
    out = denoise(x, t, y)
    _sync(device)
    first_call = time.perf_counter() - started
    latency = time_fn(lambda: denoise(x, t, y), warmup=bench.warmup, iters=bench.iters)
    result = {"first_call_s": round(first_call, 3), "latency_ms": round(latency, 3)}
    if bench.steps:
        result["sampling_s"] = round(_sampling_seconds(denoise, model_config, settings, bench.steps, device), 3)
    if BENCH_BACKENDS[backend] is None:  # ONNX Runtime's and TensorRT's memory is not torch's to count
        result["peak_memory_gib"] = peak_memory_gib(lambda: denoise(x, t, y))
    if bench.profile:
        result["profile"] = (step_profile(profile_kernels(lambda: denoise(x, t, y), iters=PROFILED_CALLS), latency)
                             if device.type == "cuda" else {"skipped": PROFILE_NEEDS_CUDA})
    return result, out.float().cpu()


def _ensure_exports(model, source: dict[str, Any], settings: dict[str, ExportSettings | str],
                    export_dirs: dict[str, Path], device: torch.device) -> dict[str, Any]:
    """Export (or reuse) every export the asked-for backends run; node count, export time and verification
    (or the one-line error) per export. A str in `settings` says why that export is not made."""
    # ONNX Runtime verifies on CUDA only with onnxruntime-gpu; on its CPU provider a B/2-size graph takes
    # hours, so a GPU host without it benchmarks the (then unverified) graphs on TensorRT alone
    verify = device.type == "cpu" or _ort_has_cuda()
    exports: dict[str, Any] = {}
    for form in settings:
        if isinstance(settings[form], str):
            exports[form] = {"error": settings[form]}
            continue
        try:
            manifest = ensure_onnx(model, export_dirs[form], settings[form], source, verify=verify, overwrite=True,
                                   log=lambda line: None)
            exports[form] = {k: manifest["onnx"][k] for k in ("node_count", "export_seconds", "exporter", "bytes",
                                                              "opset")}
            exports[form]["scan"] = manifest["scan"]
            exports[form]["verification"] = {k: manifest["verification"].get(k)
                                             for k in ("provider", "max_abs", "rel_l2", "skipped")}
        except WdmError as err:
            exports[form] = {"error": str(err)}
    return exports


def _export_settings(config, base: ExportSettings, forms: list[str], bench: DenoiserBench) -> dict[str, ExportSettings | str]:
    """The resolved settings of each of `forms` (EXPORTS' names), or, where they equal an earlier form's, why
    that one is not exported again."""
    settings: dict[str, ExportSettings | str] = {}
    for form in forms:
        fields = dict(EXPORTS[form])
        if "scan_dtype" in fields:
            fields["scan_dtype"] = bench.dtype
        resolved = replace(base, linear_attention=bench.linear_attention, **fields).resolved(config)
        twin = next((other for other, earlier in settings.items() if earlier == resolved), None)
        settings[form] = resolved if twin is None else (
            f"the same graph as {twin} (dtype {resolved.dtype}, scan inputs in {resolved.scan_dtype}, query and key "
            f"{resolved.query_key})")
    return settings


def bench_model(label: str, model, source: dict[str, Any], bench: DenoiserBench, device: torch.device,
                export_root: Path, batch_size: int) -> dict[str, Any]:
    """Every asked-for backend on one model at one batch size."""
    from wdmctl.export.verify import output_errors

    config = model.config
    base = ExportSettings(batch_size=batch_size, resolution=bench.resolution, dtype=bench.dtype,
                          scan_form="unrolled", chunk_size=bench.chunk_size)
    forms = sorted({BENCH_BACKENDS[b] for b in bench.backends} - {None})
    settings = _export_settings(config, base, forms, bench)
    base = base.resolved(config)
    export_dirs = {form: export_root / f"{form}-b{batch_size}-{bench.dtype}" for form in forms}
    batch = base.graph_batch(config.num_classes > 0)
    inputs = example_inputs(config, base.resolution, batch)
    entry: dict[str, Any] = {"model": label, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                             "batch_size": batch_size, "graph_batch": batch,
                             "input": [config.in_channels, base.resolution, base.resolution],
                             "onnx": _ensure_exports(model, source, settings, export_dirs, device),
                             "backends": {}}
    baseline = None
    for backend in bench.backends:
        form = BENCH_BACKENDS[backend]
        if form and "error" in entry["onnx"][form]:
            entry["backends"][backend] = {"skipped": f"no {form} export (see onnx.{form}.error)"}
            continue
        denoise = None
        try:
            denoise, what = _make_denoiser(backend, model, settings.get(form, base), export_dirs.get(form), device)
            timing, out = _time_backend(backend, denoise, inputs, config, base, bench, device)
            if backend == BASELINE:
                baseline = {"latency_ms": timing["latency_ms"], "eps": out}
            elif baseline is not None:
                timing["vs_eager"] = round(timing["latency_ms"] / baseline["latency_ms"], 3)
                timing["rel_l2_vs_eager"] = output_errors(out.numpy(), baseline["eps"].numpy())["rel_l2"]
            entry["backends"][backend] = {"what": what, **timing}
        except Exception as err:  # one backend failing (missing package, out of memory) must not lose the others
            entry["backends"][backend] = {"skipped": first_line(err)}
        finally:
            del denoise
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return entry


def run_denoiser_bench(bench: DenoiserBench, out: str | None = None) -> str:
    """Run the benchmark; returns the JSON text (and writes it to `out` when given)."""
    from wdmctl.core.device import write_json
    from wdmctl.export.manifest import export_versions, package_versions

    unknown = [b for b in bench.backends if b not in BENCH_BACKENDS]
    if unknown:
        raise WdmError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BENCH_BACKENDS)}")
    if not bench.presets and not bench.model:
        raise WdmError("give --preset or --model")
    if bench.backends and bench.backends[0] != BASELINE and BASELINE in bench.backends:
        bench = replace(bench, backends=[BASELINE] + [b for b in bench.backends if b != BASELINE])
    device = torch.device(bench.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work_dir = Path(bench.work_dir) if bench.work_dir else Path(tempfile.mkdtemp(prefix="wdmctl-bench-"))
    payload: dict[str, Any] = {
        "benchmark": "denoiser",
        "settings": {"batch_sizes": bench.batch_sizes, "guidance": GUIDANCE, "dtype": bench.dtype,
                     "chunk_size": bench.chunk_size, "linear_attention": bench.linear_attention, "steps": bench.steps,
                     "warmup": bench.warmup, "iters": bench.iters, "device": str(device), "work_dir": str(work_dir),
                     "profile": bench.profile},
        "versions": {**export_versions(), "tensorrt": package_versions("tensorrt")["tensorrt"]},
        "results": [],
    }
    total = (1 if bench.model else len(bench.presets)) * len(bench.batch_sizes)   # as _models yields them
    for label, model, source in _models(bench):
        for batch_size in bench.batch_sizes:
            payload["results"].append(bench_model(label, model, source, bench, device,
                                                  work_dir / re.sub(r"[^A-Za-z0-9.-]+", "_", label), batch_size))
            if out and len(payload["results"]) < total:  # a time limit keeps the model/batch entries done so far
                write_json(out, {**payload, "partial": f"{len(payload['results'])} of {total} model/batch entries"})
    return write_json(out, payload)
