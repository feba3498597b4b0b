"""One selective-scan interface, several backends behind it.

`selective_scan` has the exact semantics of mamba-ssm's `selective_scan_fn` (plus `reverse`), and
`causal_conv1d` those of causal-conv1d's `causal_conv1d_fn`:

    u, delta, z : (batch, d_inner, L)      any float dtype; any strides (a transposed view of a
                                           (batch, L, d_inner) tensor is welcome: backends that can
                                           read it in place do, the others copy)
    A           : (d_inner, N)             fp32, normally -exp(A_log) <= 0
    B, C        : (batch, N, L)            input dtype
    D, delta_bias : (d_inner,)             fp32
    returns       (batch, d_inner, L)      in u's dtype; the state is always fp32

    delta = softplus(delta + delta_bias)          (softplus only when delta_softplus)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <C_t, h_t> + D * u_t;   y_t *= silu(z_t)   (when z is given)

`reverse=True` runs the recurrence from t = L-1 down to 0 (the same as flipping every sequence input,
scanning, and flipping the output back), so backward scans need no flipped copies in backends that
support it natively.

Backends register themselves in `BACKENDS`; "auto" picks the fastest available one for the tensors'
device. Parameter names never depend on the backend, so a checkpoint trained with one runs on any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from wdmctl.errors import MissingDependency, WdmError

__all__ = [
    "BACKENDS",
    "ScanBackend",
    "available_backends",
    "causal_conv1d",
    "register_backend",
    "resolve_backend",
    "selective_scan",
]


@dataclass
class ScanBackend:
    """A selective-scan implementation.

    `priority` orders `auto`'s choice among available backends (higher first); `devices` says which
    device types it runs on; `is_available` is checked lazily so importing wdmctl never imports CUDA
    extensions.
    """

    name: str
    selective_scan: Callable[..., torch.Tensor]
    causal_conv1d: Callable[..., torch.Tensor]
    is_available: Callable[[], bool]
    install_hint: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    priority: int = 0
    exportable: bool = False
    extra: dict = field(default_factory=dict)


BACKENDS: dict[str, ScanBackend] = {}


def register_backend(backend: ScanBackend) -> None:
    BACKENDS[backend.name] = backend


def available_backends(device_type: str | None = None) -> list[str]:
    """Names of the backends that can run here (on `device_type` when given), best first."""
    _load_builtin_backends()
    names = [
        b.name
        for b in sorted(BACKENDS.values(), key=lambda b: -b.priority)
        if (device_type is None or device_type in b.devices) and b.is_available()
    ]
    return names


def resolve_backend(name: str, device_type: str) -> ScanBackend:
    """Turn a backend name (or "auto") into a backend that runs on `device_type`, or raise a one-line error."""
    _load_builtin_backends()
    if name == "auto":
        names = available_backends(device_type)
        if not names:  # pragma: no cover - the torch backend is always there
            raise WdmError(f"no selective-scan backend runs on {device_type}")
        return BACKENDS[names[0]]
    if name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS)) + ", auto"
        raise WdmError(f"unknown scan backend {name!r}; choose one of: {known}")
    backend = BACKENDS[name]
    if not backend.is_available():
        raise MissingDependency(f"scan backend {name!r} is not installed: {backend.install_hint}")
    if device_type not in backend.devices:
        raise WdmError(f"scan backend {name!r} runs on {'/'.join(backend.devices)}, not on {device_type}")
    return backend


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    backend: str = "auto",
    **options,
) -> torch.Tensor:
    """The selective scan (see the module docstring for shapes and semantics)."""
    impl = resolve_backend(backend, u.device.type)
    return impl.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, **options)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    reverse: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Depthwise causal conv1d: x (batch, d, L), weight (d, width), optional SiLU; `reverse` makes it anti-causal."""
    if activation not in (None, "silu", "swish"):
        raise WdmError(f"causal_conv1d activation must be None or 'silu', not {activation!r}")
    impl = resolve_backend(backend, x.device.type)
    return impl.causal_conv1d(x, weight, bias, activation, reverse)


_loaded = False


def _load_builtin_backends() -> None:
    """Import the backend modules once; each registers itself (and checks its packages lazily)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from wdmctl.scan import torch_scan  # noqa: F401
    from wdmctl.scan import mamba_ssm_scan  # noqa: F401

    try:  # our Triton kernels are optional: triton may be missing (CPU-only installs)
        from wdmctl.scan import triton_scan  # noqa: F401
    except ImportError:
        pass
