"""sha256, three ways: of a file, of a JSON value, of a state dict. Every hash wdmctl records is one of these."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping


def sha256_file(path: str | Path, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """sha256 of a JSON-serialisable value with sorted keys, so equal values hash equally."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def state_dict_sha256(state: Mapping[str, Any] | Any) -> str:
    """sha256 over tensor names, dtypes, shapes and raw bytes, in name order: tells two sets of weights of one
    architecture apart. Takes a state dict or a module (its state dict)."""
    import torch  # here, not at the top: hashing files and JSON must not need torch

    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
