"""`wdmctl export` as one function: find the checkpoint, export/verify the ONNX graph, build the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from wdmctl.errors import WdmError
from wdmctl.export.manifest import read_manifest
from wdmctl.export.onnx_export import (ExportSettings, default_export_dir, ensure_onnx, export_onnx,
                                       prepare_out_dir, source_identity)
from wdmctl.export.tensorrt_build import (DEFAULT_OPTIMIZATION_LEVEL, build_engine, require_standard_ops_graph,
                                          require_tensorrt)
from wdmctl.pipeline import load_pipeline
from wdmctl.runs import resolve_pipeline_dir


@dataclass
class ExportRequest:
    """Everything `wdmctl export` asks for."""

    run: str | None = None
    model: str | None = None
    checkpoint: str = "latest"
    out: str | None = None
    onnx: bool = False
    trt: bool = False
    settings: ExportSettings = ExportSettings()
    verify: bool = True
    overwrite: bool = False
    ema: bool = True
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL


def run_export(req: ExportRequest, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Export (`--onnx`, the default), and/or build a TensorRT engine (`--trt`, exporting first when the
    folder holds no export of these weights and settings). Everything that can be checked before the
    minutes of export work is checked first. Returns the export folder and its final manifest."""
    req.settings.check()
    if req.trt:
        require_standard_ops_graph(req.settings.scan_form)
        require_tensorrt()
        if not torch.cuda.is_available():
            raise WdmError("--trt builds an engine for the GPU it runs on, and no CUDA GPU is visible")
    pipeline_dir = resolve_pipeline_dir(req.run, req.model, req.checkpoint)
    pipe = load_pipeline(pipeline_dir, ema=req.ema, device="cpu")  # a damaged model: no export folder is made
    out = prepare_out_dir(Path(req.out) if req.out else default_export_dir(pipeline_dir))
    source = source_identity(pipeline_dir, req.ema, pipe.meta)
    if req.onnx or not req.trt:
        manifest = export_onnx(pipe.model, out, req.settings, source, verify=req.verify, overwrite=req.overwrite,
                               log=log)
    else:
        manifest = ensure_onnx(pipe.model, out, req.settings, source, verify=req.verify, overwrite=req.overwrite,
                               log=log)
    del pipe
    if req.trt:
        build_engine(out, optimization_level=req.optimization_level, log=log)
        manifest = read_manifest(out)
    return out, manifest
