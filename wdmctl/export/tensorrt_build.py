"""Build TensorRT engines from an export folder's ONNX graph, with TensorRT's Python API (10.x and 11.x).

* Strongly typed network: TensorRT keeps every tensor in the type the ONNX graph gives it, so the fp32
  islands of an fp16/bf16 export (softplus, the scan, the norms) stay fp32. TensorRT 11 is always
  strongly typed (the flag is accepted and ignored); 10.x needs the flag. No precision builder flags:
  11.x removed them, and the precision is already in the graph.
* One optimisation profile over the batch: min = opt = max for a static export, 1..N (opt N) for a
  `--dynamic-batch` one.
* A timing cache per GPU and TensorRT version beside the engines, reused by later builds.
* Engines are cached under `engines/<key>.plan`, the key hashing the sha256 of the ONNX graph and its
  weights, the TensorRT version, the GPU's name and compute capability, the profile and the optimisation
  level: an engine is reused only where it was built for exactly that.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from wdmctl.core.io import write_bytes_atomic
from wdmctl.errors import MissingDependency, WdmError
from wdmctl.export.manifest import ENGINE_DIR, read_manifest, sha256_file, write_manifest

INSTALL_HINT = 'pip install "wdmctl[export]"'
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's default; 5 searches longer for the last few percent


def require_tensorrt():
    """The tensorrt module (10.x or newer), or a one-line error saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependency(f"TensorRT is not installed: {INSTALL_HINT}") from None
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise MissingDependency(f"TensorRT {tensorrt.__version__} is too old (10.x or newer): {INSTALL_HINT}")
    return tensorrt


def torch_dtype(trt, dtype) -> torch.dtype:
    """The torch dtype of a TensorRT I/O tensor type (only the types an export's inputs and output use)."""
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64}
    if dtype not in table:
        raise WdmError(f"unexpected TensorRT I/O type {dtype}")
    return table[dtype]


def gpu_identity(device: torch.device | str = "cuda") -> dict[str, str]:
    """The GPU's name and compute capability: an engine runs only on the kind of GPU it was built on."""
    device = torch.device(device)
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def profile_shapes(manifest: dict[str, Any]) -> dict[str, list[list[int]]]:
    """Per input: [min, opt, max] shapes of the optimisation profile, from the manifest's input shapes and
    batch range (a symbolic batch dimension becomes the range)."""
    low, high = manifest["batch_range"]
    shapes = {}
    for spec in manifest["inputs"]:
        rest = [int(d) for d in spec["shape"][1:]]
        shapes[spec["name"]] = [[low, *rest], [high, *rest], [high, *rest]]
    return shapes


def engine_cache_key(onnx_content_sha256: str, tensorrt_version: str, gpu: dict[str, str],
                     profile: dict[str, list[list[int]]], optimization_level: int) -> str:
    """A name for the engine that changes whenever anything it depends on changes."""
    payload = json.dumps({"onnx": onnx_content_sha256, "tensorrt": tensorrt_version, "gpu": gpu["name"],
                          "compute_capability": gpu["compute_capability"], "profile": profile,
                          "optimization_level": optimization_level}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def timing_cache_name(gpu: dict[str, str], tensorrt_version: str) -> str:
    """Timing caches hold kernel timings, valid only for one GPU model and TensorRT version."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu["name"]).strip("-").lower()
    return f"timing-{slug}-sm{gpu['compute_capability'].replace('.', '')}-trt{tensorrt_version}.cache"


def engine_entry(key: str, engine_file: str, sha256: str, size: int, tensorrt_version: str, gpu: dict[str, str],
                 profile: dict[str, list[list[int]]], optimization_level: int, build_seconds: float,
                 timing_cache: str) -> dict[str, Any]:
    """The manifest's record of one engine."""
    return {"key": key, "file": engine_file, "sha256": sha256, "bytes": size, "tensorrt": tensorrt_version,
            "gpu": gpu["name"], "compute_capability": gpu["compute_capability"], "profile": profile,
            "optimization_level": optimization_level, "build_seconds": round(build_seconds, 2),
            "timing_cache": timing_cache, "strongly_typed": True}


def find_engine(export_dir: Path, manifest: dict[str, Any], device: torch.device) -> Path:
    """The engine built for this GPU and TensorRT version, or a one-line error saying how to build one."""
    trt = require_tensorrt()
    gpu = gpu_identity(device)
    for entry in reversed(manifest.get("tensorrt", {}).get("engines", [])):
        if (entry["tensorrt"], entry["gpu"], entry["compute_capability"]) != (trt.__version__, gpu["name"], gpu["compute_capability"]):
            continue
        path = Path(export_dir) / entry["file"]
        if path.exists():
            return path
    raise WdmError(f"{export_dir} has no TensorRT {trt.__version__} engine for {gpu['name']}; "
                   f"run `wdmctl export --trt --out {export_dir}` on this machine")


def _serialize_engine(trt, onnx_path: Path, shapes: dict[str, list[list[int]]], optimization_level: int,
                      timing_cache: Path, workspace_gib: float | None) -> bytes:
    """Parse the ONNX file into a strongly typed network and build a serialized engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # a TensorRT that dropped the flag is strongly typed without it
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights resolve beside it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise WdmError(f"TensorRT cannot parse {onnx_path.name}: {errors[0] if errors else 'no reason given'}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise WdmError("TensorRT could not build an engine from the graph (its log above says why)")
    write_bytes_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return bytes(serialized)


def require_standard_ops_graph(scan_form: str | None) -> None:
    """TensorRT has no LinearAttention: engines are built from the standard-ops forms only."""
    if scan_form == "linear-attention":
        raise WdmError("TensorRT cannot build from the linear-attention graph (it has no LinearAttention op); "
                       "export with --scan-form unrolled")


def build_engine(export_dir: str | Path, device: torch.device | str = "cuda",
                 optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL, workspace_gib: float | None = None,
                 rebuild: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (or find in the cache) the engine of `export_dir`'s ONNX graph for this GPU; record it in the
    manifest and return its entry."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    require_standard_ops_graph(manifest["settings"].get("scan_form"))
    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise WdmError("TensorRT builds engines on a CUDA GPU, and none is visible")
    onnx_path = export_dir / manifest["onnx"]["file"]
    gpu = gpu_identity(device)
    shapes = profile_shapes(manifest)
    key = engine_cache_key(manifest["onnx"]["content_sha256"], trt.__version__, gpu, shapes, optimization_level)
    engine_file = f"{ENGINE_DIR}/{key}.plan"
    engine_path = export_dir / engine_file
    known = [e for e in manifest.setdefault("tensorrt", {"engines": []})["engines"] if e["key"] == key]
    if known and engine_path.exists() and not rebuild:
        log(f"TensorRT engine {engine_file} is cached (same ONNX, TensorRT {trt.__version__}, {gpu['name']})")
        return known[-1]
    engine_path.parent.mkdir(exist_ok=True)
    timing_cache = engine_path.parent / timing_cache_name(gpu, trt.__version__)
    started = time.perf_counter()
    with torch.cuda.device(torch.device(device)):
        data = _serialize_engine(trt, onnx_path, shapes, optimization_level, timing_cache, workspace_gib)
    seconds = time.perf_counter() - started
    write_bytes_atomic(engine_path, data)
    entry = engine_entry(key, engine_file, sha256_file(engine_path), len(data), trt.__version__, gpu, shapes,
                         optimization_level, seconds, f"{ENGINE_DIR}/{timing_cache.name}")
    manifest["tensorrt"]["engines"] = [e for e in manifest["tensorrt"]["engines"] if e["key"] != key] + [entry]
    write_manifest(export_dir, manifest)
    log(f"built TensorRT engine {engine_file} in {seconds:.1f} s ({len(data) / 2**20:.0f} MiB)")
    return entry
