"""Find a model by preset name or folder, without pickle anywhere."""

from __future__ import annotations

from pathlib import Path

import torch

from wdmctl.errors import WdmError
from wdmctl.models.presets import PRESETS, build_model
from wdmctl.models.wdmamba import WDMamba


def load_model_meta(name_or_path: str):
    """A preset built on the meta device (shapes only), or a saved model's architecture from its config."""
    if name_or_path in PRESETS:
        with torch.device("meta"):
            return build_model(name_or_path)
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").exists():
        config = WDMamba.load_config(path)
        with torch.device("meta"):
            return WDMamba.from_config(config)
    build_model(name_or_path)  # raises the unknown-preset error with a suggestion
    raise AssertionError("unreachable")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A saved model (safetensors + config.json, as written by `save_pretrained`)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise WdmError(f"{path} is not a saved model folder (no config.json)")
    model = WDMamba.from_pretrained(path, use_safetensors=True, torch_dtype=dtype)
    return model.to(device).eval()
