"""What ran a benchmark (GPU name and memory, torch and CUDA versions, host), and the benchmark JSON that
records it beside every result."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from wdmctl.core.io import write_json_atomic


def device_info() -> dict[str, Any]:
    """What ran the benchmark: GPU name and memory, torch/CUDA versions, host."""
    info: dict[str, Any] = {"torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine())
    return info


def write_json(path: str | Path | None, payload: dict[str, Any]) -> str:
    """Add the device description, print and optionally write the JSON; returns the text."""
    payload = {"device": device_info(), **payload}
    text = json.dumps(payload, indent=2)
    if path:
        write_json_atomic(path, payload)
    return text
