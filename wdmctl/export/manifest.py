"""manifest.json: what an export folder holds, how it was made and how well it matches PyTorch.

The manifest is written last, after every artifact it names is in place, and removed first when an
export is replaced: a folder without one holds no valid export, whatever else is in it.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from wdmctl.errors import WdmError
from wdmctl.integrity import sha256_file  # noqa: F401  (re-exported: the export modules hash with it)

MANIFEST_FILE = "manifest.json"
FORMAT = "wdmctl-export/1"
ONNX_FILE = "denoiser.onnx"
ENGINE_DIR = "engines"


def package_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of the named distributions (None for those not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def onnxruntime_version() -> str | None:
    """onnxruntime and onnxruntime-gpu install the same module under different distribution names."""
    versions = package_versions("onnxruntime", "onnxruntime-gpu")
    return versions["onnxruntime-gpu"] or versions["onnxruntime"]


def export_versions() -> dict[str, str | None]:
    from wdmctl import __version__

    versions = package_versions("torch", "onnx", "onnxscript", "onnx-ir")
    return {"wdmctl": __version__, **versions, "onnxruntime": onnxruntime_version()}


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, or a one-line error saying how to make one."""
    path = Path(export_dir) / MANIFEST_FILE
    if not path.exists():
        raise WdmError(f"{export_dir} holds no export (no {MANIFEST_FILE}); run `wdmctl export` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise WdmError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r}); export again")
    return manifest


def write_manifest(export_dir: str | Path, manifest: dict[str, Any]) -> Path:
    from wdmctl.pipeline import write_json_atomic

    path = Path(export_dir) / MANIFEST_FILE
    write_json_atomic(path, manifest)
    return path
