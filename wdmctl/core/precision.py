"""The one precision vocabulary: every option that picks a floating-point precision (training, sampling,
benchmarks) takes these names, and this module alone maps them to torch dtypes."""

from __future__ import annotations

from wdmctl.errors import WdmError

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(name: str, option: str = "--precision") -> str:
    if name not in PRECISIONS:
        raise WdmError(f"{option} must be one of {', '.join(PRECISIONS)}, not {name!r}")
    return name


def torch_dtype(name: str, option: str = "--precision"):
    import torch  # here: the CLI validates names without importing torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[check_precision(name, option)]
