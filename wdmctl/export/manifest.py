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

from wdmctl.core.hashing import sha256_file  # noqa: F401 - the export modules' (and their tests') name for it
from wdmctl.core.io import write_json_atomic
from wdmctl.core.version import __version__
from wdmctl.errors import WdmError
from wdmctl.core.integrity import CorruptFile, json_problem

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
    versions = package_versions("torch", "onnx", "onnxscript", "onnx-ir")
    return {"wdmctl": __version__, **versions, "onnxruntime": onnxruntime_version()}


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, or a one-line error saying how to make one."""
    path = Path(export_dir) / MANIFEST_FILE
    if not path.exists():
        raise WdmError(f"{export_dir} holds no export (no {MANIFEST_FILE}); run `wdmctl export` first")
    problem = json_problem(path)
    if problem:
        raise CorruptFile(f"{path}: {problem}; export again with `wdmctl export --overwrite`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise WdmError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r}); export again")
    return manifest


def require_intact_onnx(export_dir: str | Path, manifest: dict[str, Any]) -> None:
    """The .onnx (and its external data) as the manifest recorded them, hashes included (ONNX Runtime reads
    every byte anyway); a one-line `CorruptFile` naming the first bad file otherwise."""
    onnx = manifest["onnx"]
    files = [(onnx["file"], onnx["sha256"])]
    if onnx.get("external_data"):
        files.append((onnx["external_data"], onnx["external_data_sha256"]))
    paths = [Path(export_dir) / name for name, _ in files]
    total = sum(p.stat().st_size for p in paths if p.is_file())
    for path, (_, digest) in zip(paths, files):
        if not path.is_file():
            problem = "missing"
        elif sha256_file(path) != digest:
            how = "cut short" if total < onnx["bytes"] else "changed since it was written"
            problem = f"{how} (sha256 differs; {total} bytes now, {onnx['bytes']} when exported)"
        else:
            continue
        raise CorruptFile(f"{path}: {problem}; export again with `wdmctl export --overwrite`")


def write_manifest(export_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(export_dir) / MANIFEST_FILE
    write_json_atomic(path, manifest)
    return path
