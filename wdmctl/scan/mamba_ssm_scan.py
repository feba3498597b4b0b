"""mamba-ssm's CUDA selective scan and causal-conv1d's kernel behind our interface.

Both packages are optional (`pip install "wdmctl[cuda]"`); they are imported only when this backend
is used. mamba-ssm's kernel has no reverse mode, so a backward scan flips its inputs and output
(our Triton backend reads them in reverse instead).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

from wdmctl.scan.registry import ScanBackend, register_backend
from wdmctl.scan.torch_scan import causal_conv1d_torch

INSTALL_HINT = 'pip install "wdmctl[cuda]" (mamba-ssm and causal-conv1d, built for your torch and CUDA)'


@lru_cache(maxsize=None)
def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def is_available() -> bool:
    import torch

    return torch.cuda.is_available() and _has("mamba_ssm") and _has("selective_scan_cuda")


def selective_scan_mamba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         reverse=False, **_):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if reverse:
        u, delta, B, C = u.flip(-1), delta.flip(-1), B.flip(-1), C.flip(-1)
        z = z.flip(-1) if z is not None else None
    out = selective_scan_fn(
        u, delta, A.float(), B, C,
        D.float() if D is not None else None, z,
        delta_bias.float() if delta_bias is not None else None, delta_softplus,
    )
    return out.flip(-1) if reverse else out


def causal_conv1d_mamba(x, weight, bias=None, activation=None, reverse=False):
    if not _has("causal_conv1d"):
        return causal_conv1d_torch(x, weight, bias, activation, reverse)
    from causal_conv1d import causal_conv1d_fn

    xin = x.flip(-1) if reverse else x
    if xin.stride(-1) != 1 and not (xin.stride(1) == 1 and xin.shape[1] % 8 == 0):
        xin = xin.contiguous()
    out = causal_conv1d_fn(xin, weight, bias, activation=activation)
    return out.flip(-1) if reverse else out


register_backend(ScanBackend(
    name="mamba_ssm",
    selective_scan=selective_scan_mamba,
    causal_conv1d=causal_conv1d_mamba,
    is_available=is_available,
    install_hint=INSTALL_HINT,
    devices=("cuda",),
    priority=10,
))
