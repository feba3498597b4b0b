"""`wdmctl bench denoiser`: one denoiser, several backends, the same inputs, one process.

Backends (each skipped with its reason when it cannot run here):
  eager             what `wdmctl sample` runs: scan backend "auto" (the fused CUDA/Triton scans when
                    installed), autocast to the dtype
  eager-torch-scan  the exported computation in eager PyTorch (torch scan, weights in the dtype)
  compile           torch.compile of that same computation
  onnxruntime       the exported graph on ONNX Runtime (CUDA EP with I/O binding on a GPU)
  tensorrt          a TensorRT engine built from that graph, replayed as a CUDA graph

Per backend: the first call (setup, compilation), the median latency of one denoiser call at the graph
batch (2 x images for a conditional model: the guidance batch), the time of a whole N-step sampling run
(DPM-Solver++, guidance 1.5 for conditional models) and, for PyTorch backends, peak CUDA memory.
"""

from __future__ import annotations

import copy
import gc
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from wdmctl.core.hashing import state_dict_sha256
from wdmctl.errors import WdmError, first_line
from wdmctl.export.onnx_export import (ExportSettings, ensure_onnx, example_inputs, prepare_for_export,
                                       source_identity)

BENCH_BACKENDS = ("eager", "eager-torch-scan", "compile", "onnxruntime", "tensorrt")
GUIDANCE = 1.5


@dataclass
class DenoiserBench:
    """What to benchmark (the CLI's options)."""

    presets: list[str] = field(default_factory=list)
    model: str | None = None
    batch_size: int = 8
    resolution: int | None = None
    dtype: str = "fp16"
    scan: str = "chunked"
    chunk_size: int = 16
    backends: list[str] = field(default_factory=lambda: list(BENCH_BACKENDS))
    steps: int = 50
    warmup: int = 3
    iters: int = 20
    work_dir: str | None = None
    device: str | None = None


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
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _no_grad(fn: Callable) -> Callable:
    def call(x, t, y):
        with torch.no_grad():
            return fn(x, t, y)
    return call


def _make_denoiser(backend: str, model, settings: ExportSettings, export_dir: Path, device: torch.device):
    """(denoise(x, t, y), description) for one backend."""
    if backend == "eager":
        from wdmctl.diffusion.sampler import model_denoiser
        from wdmctl.scan import resolve_backend

        eager = copy.deepcopy(model).to(device).eval()
        eager.set_scan_backend("auto")
        scan = resolve_backend("auto", device.type).name
        return model_denoiser(eager, settings.dtype), f"PyTorch eager, scan backend {scan}, autocast {settings.dtype}"
    if backend in ("eager-torch-scan", "compile"):
        twin = prepare_for_export(model, settings.dtype, settings.scan, settings.chunk_size).to(device)
        what = f"{settings.scan} torch scan, {settings.dtype} weights with fp32 islands"
        if backend == "compile":
            return _no_grad(torch.compile(twin)), f"torch.compile (default mode) of the exported computation: {what}"
        return _no_grad(twin), f"PyTorch eager of the exported computation: {what}"
    from wdmctl.export.runtime import load_exported_denoiser

    if backend == "onnxruntime":
        denoise = load_exported_denoiser(export_dir, "onnx", device)
        io = "CUDA EP with I/O binding" if device.type == "cuda" else "CPU EP"
        return denoise, f"ONNX Runtime {io}"
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
                  bench: DenoiserBench, device: torch.device) -> dict[str, Any]:
    from wdmctl.core.timing import peak_memory_gib, time_fn

    x, t, *rest = (v.to(device) for v in inputs)
    y = rest[0] if rest else None
    _sync(device)
    started = time.perf_counter()
    denoise(x, t, y)
    _sync(device)
    first_call = time.perf_counter() - started
    latency = time_fn(lambda: denoise(x, t, y), warmup=bench.warmup, iters=bench.iters)
    result = {"first_call_s": round(first_call, 3), "latency_ms": round(latency, 3),
              "sampling_s": round(_sampling_seconds(denoise, model_config, settings, bench.steps, device), 3)}
    if backend not in ("onnxruntime", "tensorrt"):  # their memory is not torch's to count
        result["peak_memory_gib"] = peak_memory_gib(lambda: denoise(x, t, y))
    return result


def bench_model(label: str, model, source: dict[str, Any], bench: DenoiserBench, device: torch.device,
                export_dir: Path) -> dict[str, Any]:
    """Every asked-for backend on one model."""
    config = model.config
    settings = ExportSettings(batch_size=bench.batch_size, resolution=bench.resolution, dtype=bench.dtype,
                              scan=bench.scan, chunk_size=bench.chunk_size).resolved(config)
    batch = settings.graph_batch(config.num_classes > 0)
    inputs = example_inputs(config, settings.resolution, batch)
    entry: dict[str, Any] = {"model": label, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                             "graph_batch": batch, "input": [config.in_channels, settings.resolution, settings.resolution],
                             "backends": {}}
    if {"onnxruntime", "tensorrt"} & set(bench.backends):
        # ONNX Runtime verifies on CUDA only with onnxruntime-gpu; on its CPU provider a B/2-size chunked graph
        # takes hours, so a GPU host without it benchmarks the (then unverified) graph on TensorRT alone
        verify = device.type == "cpu" or _ort_has_cuda()
        try:
            manifest = ensure_onnx(model, export_dir, settings, source, verify=verify, overwrite=True,
                                   log=lambda line: None)
            entry["onnx"] = {k: manifest["onnx"][k] for k in ("node_count", "export_seconds", "exporter", "bytes")}
            entry["onnx"]["verification"] = {k: manifest["verification"].get(k)
                                             for k in ("provider", "max_abs", "rel_l2", "skipped")}
        except WdmError as err:
            entry["onnx"] = {"error": str(err)}
    for backend in bench.backends:
        if backend in ("onnxruntime", "tensorrt") and "error" in entry["onnx"]:
            entry["backends"][backend] = {"skipped": "no ONNX export (see onnx.error)"}
            continue
        denoise = None
        try:
            denoise, what = _make_denoiser(backend, model, settings, export_dir, device)
            entry["backends"][backend] = {"what": what, **_time_backend(backend, denoise, inputs, config, settings,
                                                                        bench, device)}
        except Exception as err:  # one backend failing (missing package, compile error) must not lose the others
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
    device = torch.device(bench.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work_dir = Path(bench.work_dir) if bench.work_dir else Path(tempfile.mkdtemp(prefix="wdmctl-bench-"))
    results = [bench_model(label, model, source, bench, device, work_dir / re.sub(r"[^A-Za-z0-9.-]+", "_", label))
               for label, model, source in _models(bench)]
    payload = {
        "benchmark": "denoiser",
        "settings": {"batch_size": bench.batch_size, "guidance": GUIDANCE, "dtype": bench.dtype, "scan": bench.scan,
                     "chunk_size": bench.chunk_size, "steps": bench.steps, "warmup": bench.warmup,
                     "iters": bench.iters, "device": str(device), "work_dir": str(work_dir)},
        "versions": {**export_versions(), "tensorrt": package_versions("tensorrt")["tensorrt"]},
        "results": results,
    }
    return write_json(out, payload)
