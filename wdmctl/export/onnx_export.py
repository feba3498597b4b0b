"""Export the denoiser to ONNX, the selective scan in one of three forms, with fp32 islands.

What the graph is:
* the model on an exportable scan backend, chosen by the scan form:
  `linear-attention` (the default): one LinearAttention node per scan (`linear_attention`: ONNX's opset-27
  op, or onnxruntime's com.microsoft one), everything around it ordinary ops;
  `unrolled`: the `torch` chunked scan (T-token chunks, overflow-free decay matrices) in standard ops only:
  what TensorRT builds from and what runs on any runtime;
  `sequential`: the `torch-sequential` scan, one step per token, standard ops only.
  torch.export traces the Python code into straight-line graphs: no Loop/Scan/If nodes.
* weights in the export dtype (fp32, fp16 or bf16) except the scan's A_log, D and dt bias; the scan,
  softplus and the norms compute in fp32 whatever the dtype (the scan upcasts its inputs, torch's
  RMSNorm upcasts internally), so a low-precision graph has fp32 islands exactly there.
* fp32 `x` and `timesteps`, int64 `class_labels` (conditional models only), fp32 `eps`: the interface
  never depends on `--dtype`.
* batch = the guidance batch (2 x images) for a conditional model, `batch_size` images otherwise; static
  unless `dynamic_batch`.

How it is written: into a staging folder inside the output folder, checked (onnx.checker, standard ops),
verified against PyTorch, then renamed into place, the manifest last. A failure at any step leaves the
previous export (if any) as it was, and no file under a final name.
"""

from __future__ import annotations

import collections
import copy
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from wdmctl.core.precision import check_precision, torch_dtype
from wdmctl.errors import WdmError, first_line
from wdmctl.export.manifest import (FORMAT, MANIFEST_FILE, ONNX_FILE, export_versions, read_manifest,
                                    sha256_file, write_manifest)
from wdmctl.export.verify import TIMESTEPS, TOLERANCES, Tolerances, VerificationCase, verify_onnx
from wdmctl.scan.torch_scan import DEFAULT_CHUNK_SIZE

# --scan-form -> the wdmctl.scan backend the model is traced on
SCAN_FORMS = {"linear-attention": "linear-attention", "unrolled": "torch", "sequential": "torch-sequential"}
# the PyTorch computation each form is verified against: the plain recurrence for the op (an independent
# check of its mapping), the same computation for the unrolled forms
REFERENCE_FORMS = {"linear-attention": "sequential", "unrolled": "unrolled", "sequential": "sequential"}
DEFAULT_OPSET = 20
# The dynamo exporter writes opset 18 (ReduceMean/Split take axes as inputs from there on) and converts
# upwards; ONNX's Conv accepts bfloat16 only from opset 22, and the patch embedding is a Conv.
MIN_OPSET = {"fp32": 18, "fp16": 18, "bf16": 22}
TORCHSCRIPT_MAX_OPSET = 20
INPUT_NAMES = ("x", "timesteps", "class_labels")
OUTPUT_NAME = "eps"
ONNX_DATA_FILE = ONNX_FILE + ".data"
# protobuf cannot hold more than 2 GiB; above this much weight the tensors go to the external data file
EXTERNAL_DATA_BYTES = int(1.5 * 2**30)
CONTROL_FLOW_OPS = {"Loop", "Scan", "If", "SequenceMap"}
STANDARD_DOMAINS = {"", "ai.onnx"}


@dataclass(frozen=True)
class ExportSettings:
    """Everything that shapes the graph (and so must match for an existing export to be reused)."""

    batch_size: int = 16           # images per denoiser batch; the graph's batch is 2x this when guided
    resolution: int | None = None  # the model input's side (latent side for latent models); None = trained
    dtype: str = "fp32"
    scan_form: str = "linear-attention"
    linear_attention: str | None = "auto"  # auto | standard | contrib; resolved: standard | contrib (None: other forms)
    chunk_size: int = DEFAULT_CHUNK_SIZE   # tokens per chunk of the unrolled form
    scan_dtype: str = "fp32"               # LinearAttention's inputs: fp32 (an fp32 island) or --dtype
    query_key: str | None = "auto"         # auto | shared | per-channel; resolved: shared | per-channel (None: other forms)
    opset: int | None = None               # None: 27 with the standard LinearAttention, else 20
    dynamic_batch: bool = False

    def check(self) -> None:
        """One-line errors for values that are wrong whatever the model."""
        from wdmctl.export.linear_attention import CHOICES, QUERY_KEY

        check_precision(self.dtype, "--dtype")
        if self.scan_form not in SCAN_FORMS:
            raise WdmError(f"--scan-form must be one of {', '.join(SCAN_FORMS)}, not {self.scan_form!r}")
        if self.scan_form == "linear-attention" and self.linear_attention not in CHOICES:
            raise WdmError(f"--linear-attention must be one of {', '.join(CHOICES)}, not {self.linear_attention!r}")
        if self.scan_form == "linear-attention" and self.query_key not in QUERY_KEY:
            raise WdmError(f"--query-key must be one of {', '.join(QUERY_KEY)}, not {self.query_key!r}")
        if self.opset is not None:
            check_opset(self.opset, self.dtype)
        if self.batch_size < 1:
            raise WdmError(f"--batch-size must be >= 1, not {self.batch_size}")
        if self.chunk_size < 1:
            raise WdmError(f"--chunk-size must be >= 1, not {self.chunk_size}")
        if self.scan_dtype not in ("fp32", self.dtype):
            raise WdmError(f"--scan-dtype must be fp32 or the graph's --dtype {self.dtype}, not {self.scan_dtype!r}")
        if self.scan_dtype != "fp32" and self.scan_form != "linear-attention":
            raise WdmError(f"--scan-dtype {self.scan_dtype} is for --scan-form linear-attention; the "
                           f"{self.scan_form} scan computes in fp32")

    def resolved(self, config) -> "ExportSettings":
        """Checked against the model's config, with the resolution, the LinearAttention spelling (from what the
        installed onnxruntime runs on the provider that will run the graph) and the opset filled in."""
        from wdmctl.export.linear_attention import OPS, resolve_choice, resolve_query_key
        from wdmctl.export.runtime import default_provider

        self.check()
        resolution = self.resolution or config.sample_size
        if resolution < config.patch_size or resolution % config.patch_size:
            raise WdmError(f"--resolution {resolution} is not a multiple of the patch size {config.patch_size}")
        # settings that mean nothing to a form are fixed, which keeps reuse checks honest
        chunk = self.chunk_size if self.scan_form == "unrolled" else 1
        choice = query_key = None
        if self.scan_form == "linear-attention":
            provider = default_provider()
            choice = resolve_choice(self.linear_attention, provider, self.opset)
            query_key = resolve_query_key(self.query_key, choice, provider)
        opset = self.opset or (OPS["standard"][1] if choice == "standard" else DEFAULT_OPSET)
        check_opset(opset, self.dtype)
        if choice == "standard" and opset < OPS["standard"][1]:
            raise WdmError(f"the standard LinearAttention needs --opset {OPS['standard'][1]} or newer, not {opset} "
                           "(or --linear-attention contrib)")
        return replace(self, resolution=resolution, chunk_size=chunk, linear_attention=choice, opset=opset,
                       query_key=query_key)

    def graph_batch(self, conditional: bool) -> int:
        return 2 * self.batch_size if conditional else self.batch_size


def check_opset(opset: int, dtype: str) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET[dtype]:
        why = "bfloat16 Conv exists from opset 22" if dtype == "bf16" else "the exporter writes opset 18 and up"
        raise WdmError(f"--opset {opset} is too low for a {dtype} export: {MIN_OPSET[dtype]} or higher ({why})")
    if opset > newest:
        raise WdmError(f"--opset {opset} is newer than the installed onnx {onnx.__version__} knows ({newest})")


class DenoiserForExport(nn.Module):
    """fp32 in, fp32 out around a model whose weights are in the export dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x.to(self.dtype), timesteps, class_labels).float()


def prepare_for_export(model: nn.Module, dtype: str, scan_form: str, chunk_size: int,
                       scan_dtype: str = "fp32", query_key: str = "per-channel") -> DenoiserForExport:
    """A copy of `model` on the scan backend of `scan_form`, cast to `dtype` with the scan's parameters in
    fp32 (and LinearAttention's inputs in `scan_dtype`, its query and key `query_key`: shared by all heads or
    one per channel). One-line error when the model has no exportable scan path."""
    import wdmctl.export.linear_attention  # noqa: F401  (registers the linear-attention scan backend)
    from wdmctl.models.wdmamba import SSMBranch
    from wdmctl.scan import resolve_backend

    if not hasattr(model, "set_scan_backend"):
        raise WdmError(f"{type(model).__name__} has no exportable scan path (it cannot switch to the torch scan)")
    backend = resolve_backend(SCAN_FORMS[scan_form], "cpu")
    if not backend.exportable:
        raise WdmError(f"the {scan_form} scan ({backend.name!r} backend) is not exportable; no exportable scan path")
    twin = copy.deepcopy(model).eval().requires_grad_(False)
    options = {"chunk_size": chunk_size} if scan_form == "unrolled" else {}
    if scan_form == "linear-attention":
        options["scan_dtype"] = torch_dtype(scan_dtype, "--scan-dtype")
        options["shared_query_key"] = query_key == "shared"
    twin.set_scan_backend(backend.name, **options)
    target = torch_dtype(dtype, "--dtype")
    # set .data rather than calling .to(): diffusers' ModelMixin.to warns about fp32-kept modules on every cast
    for tensor in [*twin.parameters(), *twin.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(target)
    for branch in twin.modules():
        if isinstance(branch, SSMBranch):
            # A = -exp(A_log) sets every decay: fp16's 3 digits would move them all; D and the dt bias are
            # added in fp32 inside the scan anyway
            for tensor in (branch.A_log, branch.D, branch.dt_proj.bias):
                tensor.data = tensor.data.float()
    return DenoiserForExport(twin, target).eval()


def input_names(conditional: bool) -> list[str]:
    return list(INPUT_NAMES if conditional else INPUT_NAMES[:2])


def example_inputs(config, resolution: int, batch: int, timestep: float | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Fixed inputs: x ~ N(0, 1); all rows at `timestep` (spread over 0..999 when None); for a conditional
    model, labels in the guidance layout (class labels, then the null class for the second half)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, resolution, resolution, generator=g)
    if timestep is None:
        t = torch.linspace(0, 999, batch)
    else:
        t = torch.full((batch,), float(timestep))
    if not config.num_classes:
        return x, t
    labels = torch.randint(0, config.num_classes, (batch,), generator=g)
    labels[(batch + 1) // 2:] = config.num_classes
    return x, t, labels


# ----------------------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------------------

def _dynamo_export(module: nn.Module, inputs: tuple, names: list[str], settings: ExportSettings):
    """torch.export + onnxscript: the current exporter. Returns an onnx_ir Model."""
    dynamic_shapes = None
    if settings.dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = {name: {0: batch} for name in names}
    translations = None
    trace_opset = settings.opset
    if settings.scan_form == "linear-attention":
        from wdmctl.export.linear_attention import translation_table

        translations = translation_table()
        # from opset 23 the exporter writes RMSNormalization, which onnx's converter cannot lift to 27: trace
        # at the default opset and convert (the LinearAttention placeholder is outside the converted domain)
        trace_opset = min(settings.opset, DEFAULT_OPSET)
    program = torch.onnx.export(module, inputs, dynamo=True, opset_version=trace_opset, input_names=names,
                                output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes, optimize=False,
                                verbose=False, custom_translation_table=translations)
    model = program.model
    if trace_opset != settings.opset:
        from onnxscript.version_converter import convert_version

        convert_version(model, settings.opset, fallback=True)
    if model.opset_imports.get("") != settings.opset:  # the exporter's opset conversion gives up quietly
        raise WdmError(f"the ONNX exporter could not write opset {settings.opset} (it wrote "
                       f"{model.opset_imports.get('')}); try another --opset")
    return model


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm for the TorchScript exporter, which has none at opset 20: in fp32, like torch."""
    from torch.onnx import symbolic_helper

    axes = g.op("Constant", value_t=torch.tensor(list(range(-len(normalized_shape), 0)), dtype=torch.long))
    xf = g.op("Cast", x, to_i=1)  # 1 = FLOAT
    mean_square = g.op("ReduceMean", g.op("Mul", xf, xf), axes, keepdims_i=1)
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    eps_t = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
    y = g.op("CastLike", g.op("Div", xf, g.op("Sqrt", g.op("Add", mean_square, eps_t))), x)
    return y if symbolic_helper._is_none(weight) else g.op("Mul", y, weight)


def _torchscript_export(module: nn.Module, inputs: tuple, names: list[str], settings: ExportSettings, staging: Path):
    """The TorchScript exporter (opset <= 20), as a fallback. Returns an onnx_ir Model."""
    import onnx_ir
    from torch.onnx import symbolic_helper

    torch.onnx.register_custom_op_symbolic(
        "aten::rms_norm", symbolic_helper.parse_args("v", "is", "v", "f")(_rms_norm_symbolic), 18)
    path = staging / "torchscript.onnx"
    dynamic_axes = {name: {0: "batch"} for name in [*names, OUTPUT_NAME]} if settings.dynamic_batch else None
    torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=settings.opset, input_names=names,
                      output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes, do_constant_folding=True)
    return onnx_ir.load(path)


def trace_to_onnx(module: nn.Module, inputs: tuple, names: list[str], settings: ExportSettings, staging: Path,
                  log: Callable[[str], None]):
    """(onnx_ir Model, exporter name, note): the dynamo exporter, else the TorchScript one with a note."""
    try:
        with torch.no_grad():
            return _dynamo_export(module, inputs, names, settings), "dynamo", None
    except WdmError:
        raise
    except Exception as err:  # the exporter raises many types; all mean "this exporter cannot do it"
        if settings.scan_form == "linear-attention":
            raise WdmError(f"the ONNX exporter failed ({first_line(err)}); the TorchScript fallback cannot write "
                           "LinearAttention, so try --scan-form unrolled") from None
        if settings.opset > TORCHSCRIPT_MAX_OPSET:
            raise WdmError(f"the ONNX exporter failed ({first_line(err)}); the TorchScript fallback stops at "
                           f"opset {TORCHSCRIPT_MAX_OPSET}, so try --opset 20") from None
        note = f"the dynamo exporter failed ({first_line(err)}); exported with the TorchScript exporter instead"
        log(f"note: {note}")
    try:
        with torch.no_grad():
            return _torchscript_export(module, inputs, names, settings, staging), "torchscript", note
    except Exception as err:
        raise WdmError(f"both ONNX exporters failed; TorchScript: {first_line(err)}") from None


def simplify(model) -> None:
    """Inline, fold constants, drop dead nodes and merge duplicates, in place.

    Not onnxscript's full `optimize`: its pattern rewrites took 30x longer (minutes at WDM-B/2) for 6%
    fewer nodes here, and ONNX Runtime and TensorRT do their own fusions anyway."""
    import onnxscript.optimizer
    from onnx_ir.passes import common

    common.InlinePass()(model)
    onnxscript.optimizer.fold_constants(model)
    for graph_pass in (common.RemoveUnusedNodesPass(), common.CommonSubexpressionEliminationPass(),
                       common.RemoveUnusedNodesPass(), common.LiftConstantsToInitializersPass(),
                       common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()):
        graph_pass(model)


def graph_summary(model) -> dict[str, Any]:
    """Node count, op histogram (most frequent first), domains, ops outside the standard domain and opsets of
    an onnx_ir Model."""
    ops = collections.Counter()
    domains, custom_ops = set(), set()
    for node in model.graph.all_nodes():
        ops[node.op_type] += 1
        domains.add(node.domain)
        if node.domain not in STANDARD_DOMAINS:
            custom_ops.add(f"{node.domain}.{node.op_type}")
    return {"node_count": sum(ops.values()), "op_histogram": dict(ops.most_common()),
            "domains": sorted(domains), "custom_ops": sorted(custom_ops), "opset_imports": dict(model.opset_imports),
            "functions": len(model.functions)}


def require_expected_ops(summary: dict[str, Any], settings: ExportSettings) -> None:
    """One-line error if the graph kept control flow or functions, or holds an op outside the standard domain
    other than the com.microsoft LinearAttention that --linear-attention contrib asked for."""
    from wdmctl.export.linear_attention import OP_TYPE, OPS

    allowed = {f"{OPS['contrib'][0]}.{OP_TYPE}"} if settings.linear_attention == "contrib" else set()
    custom = [op for op in summary["custom_ops"] if op not in allowed]
    loops = sorted(CONTROL_FLOW_OPS & set(summary["op_histogram"]))
    if custom or loops or summary["functions"]:
        raise WdmError(f"the exported graph holds unexpected ops (outside the standard domain {custom}, control "
                       f"flow {loops}, {summary['functions']} functions); ONNX Runtime or TensorRT may not run it")


def weight_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_onnx(model, path: Path) -> list[str]:
    """Write the model (weights in `<name>.data` beside it when they do not fit protobuf's 2 GiB);
    returns the names of the files written, the .onnx last."""
    import onnx_ir

    external = weight_bytes(model) > EXTERNAL_DATA_BYTES
    try:
        onnx_ir.save(model, path, external_data=ONNX_DATA_FILE if external else None)
    except OSError as err:  # a full disk, mostly
        raise WdmError(f"cannot write {path.name}: {err.strerror or first_line(err)}") from None
    return [ONNX_DATA_FILE, path.name] if external else [path.name]


def check_onnx(path: Path) -> None:
    """onnx.checker with full (type and shape) checks; from the path, so external data works."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # onnx raises ValidationError, InferenceError, ...
        raise WdmError(f"the exported graph fails onnx.checker: {first_line(err)}") from None


# ----------------------------------------------------------------------------------------------------
# The export folder
# ----------------------------------------------------------------------------------------------------

def source_identity(pipeline_dir: Path, ema: bool, meta: dict[str, Any]) -> dict[str, Any]:
    """Which weights were exported: folder, EMA or not, training step and sha256 of the safetensors."""
    import hashlib

    weights = sorted((Path(pipeline_dir) / ("denoiser" if ema else "denoiser_online")).glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in weights:
        digest.update(sha256_file(path).encode())
    return {"path": str(Path(pipeline_dir).resolve()), "ema": ema, "step": meta.get("step"),
            "weights_sha256": digest.hexdigest()}


def default_export_dir(pipeline_dir: Path) -> Path:
    """`<checkpoint>/export` beside a run's `<checkpoint>/pipeline`, where `wdmctl sample --backend` looks."""
    return Path(pipeline_dir).parent / "export"


def prepare_out_dir(out_dir: Path) -> Path:
    """Create the folder and prove it writable now, before minutes of export work."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise WdmError(f"cannot write to {out_dir}: {err.strerror or first_line(err)}") from None
    return out_dir


def export_differences(manifest: dict[str, Any], settings: ExportSettings, source: dict[str, Any]) -> list[str]:
    """What differs between an existing export and the one asked for (empty: it can be reused)."""
    differ = [k for k, v in asdict(settings).items() if manifest["settings"].get(k) != v]
    for key in ("weights_sha256", "ema"):
        if manifest["source"].get(key) != source.get(key):
            differ.append(f"source {key}")
    return differ


def _promote(staging: Path, out_dir: Path, files: list[str]) -> None:
    """Move the staged files to their final names. The old manifest goes first: from then until the new
    one is written, the folder holds no valid export, never a mismatched one."""
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for name in files:
        os.replace(staging / name, out_dir / name)
    if ONNX_DATA_FILE not in files:
        (out_dir / ONNX_DATA_FILE).unlink(missing_ok=True)


def export_onnx(model: nn.Module, out_dir: str | Path, settings: ExportSettings, source: dict[str, Any],
                verify: bool = True, overwrite: bool = False, tolerances: Tolerances | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export `model` to `<out_dir>/denoiser.onnx`, verify it against PyTorch, write the manifest; returns it."""
    config = model.config
    settings = settings.resolved(config)
    out_dir = prepare_out_dir(Path(out_dir))
    if ((out_dir / MANIFEST_FILE).exists() or (out_dir / ONNX_FILE).exists()) and not overwrite:
        raise WdmError(f"{out_dir} already holds an export; pass --overwrite to replace it")
    conditional = config.num_classes > 0
    batch = settings.graph_batch(conditional)
    names = input_names(conditional)
    tolerances = tolerances or TOLERANCES[settings.dtype]
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export-", suffix=".partial"))
    try:
        module = prepare_for_export(model, settings.dtype, settings.scan_form, settings.chunk_size,
                                    settings.scan_dtype, settings.query_key)
        log(f"exporting {type(model).__name__} ({describe_scan(settings)}, {settings.dtype}, batch {batch}, "
            f"{config.in_channels}x{settings.resolution}x{settings.resolution}, opset {settings.opset})")
        started = time.perf_counter()
        graph, exporter, note = trace_to_onnx(module, example_inputs(config, settings.resolution, batch), names,
                                              settings, staging, log)
        del module
        simplify(graph)
        scan = _place_scan_ops(graph, settings)
        export_seconds = time.perf_counter() - started
        summary = graph_summary(graph)
        require_expected_ops(summary, settings)
        files = save_onnx(graph, staging / ONNX_FILE)
        del graph
        check_onnx(staging / ONNX_FILE)
        verification: dict[str, Any] = {"skipped": "--no-verify"}
        if verify:
            verification = _verify(staging / ONNX_FILE, model, settings, batch, names, tolerances)
            log(f"verified on {verification['provider']}: max-abs {verification['max_abs']:.2e}, rel-L2 "
                f"{verification['rel_l2']:.2e} (tolerances {tolerances.max_abs:g}, {tolerances.rel_l2:g})")
        manifest = {
            "format": FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source,
            "model_config": dict(config),
            "settings": asdict(settings),
            "conditional": conditional,
            "num_classes": int(config.num_classes),
            "null_class": int(config.num_classes) if conditional else None,
            "batch_range": [1, batch] if settings.dynamic_batch else [batch, batch],
            "inputs": _io_specs(names, batch, config.in_channels, settings),
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32",
                         "shape": [_batch_dim(batch, settings), config.in_channels, settings.resolution,
                                   settings.resolution]}],
            "onnx": {"file": ONNX_FILE, **_file_hashes(staging, files), "exporter": exporter,
                     "exporter_note": note, "opset": settings.opset, "export_seconds": round(export_seconds, 2),
                     **summary},
            "scan": scan,
            "runtime": {"onnxruntime": runtime_record(settings)},
            "precision": {"graph": settings.dtype, "io": "float32 (class_labels int64)",
                          "fp32_islands": ["A_log/D/dt bias", "softplus", "selective scan", "RMSNorm",
                                           "timestep sinusoid"]},
            "verification": verification,
            "versions": export_versions(),
            "tensorrt": {"engines": []},
        }
        _promote(staging, out_dir, files)
        write_manifest(out_dir, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out_dir / ONNX_FILE} ({exporter} exporter, {summary['node_count']} nodes, "
        f"{export_seconds:.1f} s) and {out_dir / MANIFEST_FILE}")
    return manifest


def describe_scan(settings: ExportSettings) -> str:
    if settings.scan_form == "linear-attention":
        return (f"scan as {settings.linear_attention} LinearAttention in {settings.scan_dtype}, query and key "
                f"{settings.query_key}")
    if settings.scan_form == "unrolled":
        return f"unrolled scan, chunks of {settings.chunk_size}"
    return "sequential scan"


def _place_scan_ops(graph, settings: ExportSettings) -> dict[str, Any]:
    """Put the LinearAttention nodes in their domain (linear-attention form); the manifest's `scan` entry."""
    from wdmctl.export.linear_attention import ATTRIBUTES, OP_TYPE, OPS, mapping, place_linear_attention

    entry: dict[str, Any] = {"form": settings.scan_form}
    if settings.scan_form == "unrolled":
        entry["chunk_size"] = settings.chunk_size
    if settings.scan_form != "linear-attention":
        return entry
    nodes = place_linear_attention(graph, settings.linear_attention)
    if not nodes:
        raise WdmError(f"the graph has no {OP_TYPE} node: the model did not scan through wdmctl.scan's interface")
    domain, version = OPS[settings.linear_attention]
    entry["linear_attention"] = {"op": settings.linear_attention, "domain": domain or "ai.onnx",
                                 "version": version, "nodes": nodes, "dtype": settings.scan_dtype, **ATTRIBUTES,
                                 "query_key": settings.query_key,
                                 "mapping": mapping(settings.query_key)}
    return entry


def runtime_record(settings: ExportSettings) -> dict[str, Any]:
    """How wdmctl's runtime runs this graph on ONNX Runtime (the manifest's `runtime.onnxruntime`)."""
    from wdmctl.export.runtime import cuda_provider_options

    static = not settings.dynamic_batch
    return {"io_binding": "CUDA: inputs and output bound to device tensors",
            "cuda_graph": static,
            "cuda_provider_options": cuda_provider_options(0, cuda_graph=static),
            "cpu_provider_options": {}}


def _file_hashes(staging: Path, files: list[str]) -> dict[str, Any]:
    """sha256 of the .onnx and of its external data, and `content_sha256` over both: with external data
    the .onnx holds only offsets, so new weights can leave its bytes unchanged."""
    import hashlib

    onnx_sha = sha256_file(staging / ONNX_FILE)
    data_sha = sha256_file(staging / ONNX_DATA_FILE) if ONNX_DATA_FILE in files else None
    content = hashlib.sha256(f"{onnx_sha}:{data_sha}".encode()).hexdigest()
    return {"sha256": onnx_sha, "external_data": ONNX_DATA_FILE if data_sha else None,
            "external_data_sha256": data_sha, "content_sha256": content,
            "bytes": sum((staging / name).stat().st_size for name in files)}


def _batch_dim(batch: int, settings: ExportSettings) -> int | str:
    return "batch" if settings.dynamic_batch else batch


def _io_specs(names: list[str], batch: int, channels: int, settings: ExportSettings) -> list[dict[str, Any]]:
    b = _batch_dim(batch, settings)
    shapes = {"x": [b, channels, settings.resolution, settings.resolution], "timesteps": [b], "class_labels": [b]}
    dtypes = {"x": "float32", "timesteps": "float32", "class_labels": "int64"}
    return [{"name": n, "shape": shapes[n], "dtype": dtypes[n]} for n in names]


def _verify(onnx_path: Path, model: nn.Module, settings: ExportSettings, batch: int, names: list[str],
            tolerances: Tolerances) -> dict[str, Any]:
    """ONNX Runtime vs the fp32 PyTorch model (REFERENCE_FORMS) at every verification timestep, at the
    graph's batch and, for a dynamic export, at batch 1 too. CUDA when onnxruntime-gpu and a GPU are here."""
    from wdmctl.export.runtime import default_provider

    device = torch.device("cuda" if default_provider() == "CUDAExecutionProvider" else "cpu")
    reference = prepare_for_export(model, "fp32", REFERENCE_FORMS[settings.scan_form], settings.chunk_size).to(device)
    batches = [batch, 1] if settings.dynamic_batch and batch > 1 else [batch]
    cases = [VerificationCase(b, t, example_inputs(model.config, settings.resolution, b, t, seed=t))
             for b in batches for t in TIMESTEPS]
    low_precision = settings.dtype if settings.dtype != "fp32" else None
    return verify_onnx(onnx_path, reference, cases, names, tolerances, device, low_precision)


def ensure_onnx(model: nn.Module, out_dir: str | Path, settings: ExportSettings, source: dict[str, Any],
                verify: bool = True, overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The export in `out_dir` if it was made from the same weights with the same settings, else a new one
    (replacing a different one only with `overwrite`)."""
    settings = settings.resolved(model.config)
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_FILE).exists():
        manifest = read_manifest(out_dir)
        differ = export_differences(manifest, settings, source)
        if not differ:
            log(f"reusing {out_dir / ONNX_FILE} (same weights and settings)")
            return manifest
        if not overwrite:
            raise WdmError(f"{out_dir} holds an export with other {', '.join(differ)}; pass --overwrite to replace it")
    return export_onnx(model, out_dir, settings, source, verify=verify, overwrite=True, log=log)
