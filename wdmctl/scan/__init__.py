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

`column_grid=(extra, rows, cols)` says the L = extra + rows * cols tokens are [extra tokens, a rows x cols
patch grid stored row by row], and scans them in column-major order: the extra tokens, then the grid
column by column (the same as permuting every sequence input with `transpose_patch_grid`, scanning and
permuting back). Inputs and output stay in memory (row-major) order. Backends with `reads_column_order`
read that order in place; for the others this module permutes copies.

`selective_scan_pair` and `causal_conv1d_pair` run both directions of a bidirectional block at once:
the two directions are stacked on the batch axis (2 * batch rows; rows batch.. scan the other way), the
parameters on a leading axis of 2, and z (batch rows) gates both. Backends that have them do it in one
launch per kernel; for the others this module makes two calls.

Backends register themselves in `BACKENDS`; "auto" picks the fastest available one for the tensors'
device. Parameter names never depend on the backend, so a checkpoint trained with one runs on any.
"""

from __future__ import annotations

import torch

from wdmctl.errors import MissingDependency, WdmError
from wdmctl.scan import mamba_ssm_scan, torch_scan  # noqa: F401 - each registers its backend
from wdmctl.scan.registry import _AUTO, BACKENDS, ScanBackend, check_activation, check_column_grid, register_backend

__all__ = [
    "BACKENDS",
    "ScanBackend",
    "available_backends",
    "causal_conv1d",
    "causal_conv1d_pair",
    "register_backend",
    "resolve_backend",
    "selective_scan",
    "selective_scan_pair",
    "transpose_patch_grid",
]


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
        if device_type not in _AUTO:
            names = available_backends(device_type)
            if not names:  # pragma: no cover - the torch backend is always there
                raise WdmError(f"no selective-scan backend runs on {device_type}")
            _AUTO[device_type] = BACKENDS[names[0]]
        return _AUTO[device_type]
    if name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS)) + ", auto"
        raise WdmError(f"unknown scan backend {name!r}; choose one of: {known}")
    backend = BACKENDS[name]
    if not backend.is_available():
        raise MissingDependency(f"scan backend {name!r} is not installed: {backend.install_hint}")
    if device_type not in backend.devices:
        raise WdmError(f"scan backend {name!r} runs on {'/'.join(backend.devices)}, not on {device_type}")
    return backend


def transpose_patch_grid(tokens: torch.Tensor, num_extra: int, rows: int, cols: int) -> torch.Tensor:
    """[extras, patches of a rows x cols grid in row-major order] -> [extras, the same patches column-major],
    for (batch, L, channels) tokens. Applied with (rows, cols) it gives column-major order; with (cols, rows)
    it restores row-major. One transposing copy each way (a gather by index would cost a sort and
    scatter-add in the backward)."""
    b, _, d = tokens.shape
    patches = tokens[:, num_extra:].reshape(b, rows, cols, d).transpose(1, 2).reshape(b, rows * cols, d)
    return torch.cat([tokens[:, :num_extra], patches], dim=1)


def _permute_sequence(x: torch.Tensor | None, column_grid, back: bool = False) -> torch.Tensor | None:
    """A (batch, channels, L) sequence in column-major order of column_grid (or back to row-major)."""
    if x is None:
        return None
    extra, rows, cols = column_grid
    if back:
        rows, cols = cols, rows
    return transpose_patch_grid(x.transpose(1, 2), extra, rows, cols).transpose(1, 2)


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
    column_grid: tuple[int, int, int] | None = None,
    backend: str = "auto",
    **options,
) -> torch.Tensor:
    """The selective scan (see the module docstring for shapes and semantics)."""
    impl = resolve_backend(backend, u.device.type)
    check_column_grid(column_grid, u.shape[-1])
    if column_grid and impl.reads_column_order:
        options["column_grid"] = column_grid
    elif column_grid:
        u, delta, B, C, z = (_permute_sequence(v, column_grid) for v in (u, delta, B, C, z))
        y = impl.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, **options)
        return _permute_sequence(y, column_grid, back=True)
    return impl.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, **options)


def selective_scan_pair(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                        column_grid=None, backend="auto", **options) -> torch.Tensor:
    """Both directions of a bidirectional block: u, delta (2 * batch, d, L), B, C (2 * batch, N, L), A (2, d, N),
    D, delta_bias (2, d), z (batch, d, L). Rows :batch scan as `reverse` says with A[0], D[0], delta_bias[0];
    rows batch: scan the other way with the second set. Returns (2 * batch, d, L)."""
    impl = resolve_backend(backend, u.device.type)
    check_column_grid(column_grid, u.shape[-1])
    if A.dim() != 3 or A.shape[0] != 2 or u.shape[0] % 2:
        raise WdmError(f"selective_scan_pair takes A of shape (2, d, N) and an even number of rows, "
                       f"not A {tuple(A.shape)} with {u.shape[0]} rows")
    if impl.selective_scan_pair is not None and (impl.reads_column_order or not column_grid):
        if column_grid:
            options["column_grid"] = column_grid
        return impl.selective_scan_pair(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, **options)
    half = u.shape[0] // 2
    ys = [
        selective_scan(u[rows], delta[rows], A[i], B[rows], C[rows], None if D is None else D[i], z,
                       None if delta_bias is None else delta_bias[i], delta_softplus, reverse != bool(i),
                       column_grid, backend, **options)
        for i, rows in enumerate((slice(None, half), slice(half, None)))
    ]
    return torch.cat(ys)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    reverse: bool = False,
    column_grid: tuple[int, int, int] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Depthwise causal conv1d: x (batch, d, L), weight (d, width), optional SiLU; `reverse` makes it
    anti-causal; `column_grid` convolves along the column-major order (see the module docstring)."""
    check_activation(activation)
    check_column_grid(column_grid, x.shape[-1])
    impl = resolve_backend(backend, x.device.type)
    if impl.max_conv_width is not None and weight.shape[-1] > impl.max_conv_width:
        impl = resolve_backend("torch", x.device.type)
    if column_grid and impl.reads_column_order:
        return impl.causal_conv1d(x, weight, bias, activation, reverse, column_grid)
    if column_grid:
        out = impl.causal_conv1d(_permute_sequence(x, column_grid), weight, bias, activation, reverse)
        return _permute_sequence(out, column_grid, back=True)
    return impl.causal_conv1d(x, weight, bias, activation, reverse)


def causal_conv1d_pair(x, weight, bias=None, activation=None, reverse=False, column_grid=None,
                       backend="auto") -> torch.Tensor:
    """Both directions' convs of one input: x (batch, d, L), weight (2, d, width), bias (2, d). Returns
    (2 * batch, d, L): rows :batch convolve as `reverse` says with weight[0], rows batch: the other way."""
    check_activation(activation)
    check_column_grid(column_grid, x.shape[-1])
    if weight.dim() != 3 or weight.shape[0] != 2:
        raise WdmError(f"causal_conv1d_pair takes a weight of shape (2, d, width), not {tuple(weight.shape)}")
    impl = resolve_backend(backend, x.device.type)
    narrow = impl.max_conv_width is None or weight.shape[-1] <= impl.max_conv_width
    if impl.causal_conv1d_pair is not None and narrow and (impl.reads_column_order or not column_grid):
        return impl.causal_conv1d_pair(x, weight, bias, activation, reverse, column_grid)
    return generic_causal_conv1d(backend, x, weight, bias, activation, reverse, column_grid)


def generic_causal_conv1d(backend, x, weight, bias, activation, reverse, column_grid):
    """A conv or a pair of them (weight (2, d, width)) through `backend`'s plain conv, one call per direction."""
    if weight.dim() == 2:
        return causal_conv1d(x, weight, bias, activation, reverse, column_grid, backend)
    return torch.cat([
        causal_conv1d(x, weight[i], None if bias is None else bias[i], activation, reverse != bool(i),
                      column_grid, backend)
        for i in range(2)
    ])


_triton_tried = False


def _load_builtin_backends() -> None:
    """Register our Triton backend on first use: importing triton is slow, and it is optional (CPU-only
    installs may lack it). The torch and mamba_ssm backends registered at import (they import nothing heavy)."""
    global _triton_tried
    if _triton_tried:
        return
    _triton_tried = True
    try:
        from wdmctl.scan import triton  # noqa: F401 - deferred: a heavy, optional dependency
    except ImportError:
        pass
