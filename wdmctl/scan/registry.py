"""The backend registry: what a selective-scan backend provides (`ScanBackend`), the backends registered so
far, and the argument checks every backend shares. The dispatching interface is wdmctl.scan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from wdmctl.errors import WdmError


@dataclass
class ScanBackend:
    """A selective-scan implementation.

    `priority` orders `auto`'s choice among available backends (higher first); `devices` says which
    device types it runs on; `is_available` is checked lazily so importing wdmctl never imports CUDA
    extensions. `reads_column_order`: its scan and conv take `column_grid` and read that order in place.
    `selective_scan_pair` / `causal_conv1d_pair`: its one-launch bidirectional forms (same signatures, a
    leading axis of 2 on the parameters), or None.
    """

    name: str
    selective_scan: Callable[..., torch.Tensor]
    causal_conv1d: Callable[..., torch.Tensor]
    is_available: Callable[[], bool]
    install_hint: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    priority: int = 0
    exportable: bool = False
    reads_column_order: bool = False
    selective_scan_pair: Callable[..., torch.Tensor] | None = None
    causal_conv1d_pair: Callable[..., torch.Tensor] | None = None
    max_conv_width: int | None = None   # wider convs go to the torch backend
    extra: dict = field(default_factory=dict)


BACKENDS: dict[str, ScanBackend] = {}
_AUTO: dict[str, ScanBackend] = {}   # "auto" per device type, resolved once (models ask in every block)


def register_backend(backend: ScanBackend) -> None:
    BACKENDS[backend.name] = backend
    _AUTO.clear()


def check_column_grid(column_grid, length: int) -> None:
    if column_grid is None:
        return
    extra, rows, cols = column_grid
    if extra < 0 or rows < 1 or cols < 1 or extra + rows * cols != length:
        raise WdmError(f"column_grid {tuple(column_grid)} does not describe {length} tokens "
                       "(extra tokens + rows * cols)")


def check_activation(activation):
    if activation not in (None, "silu", "swish"):
        raise WdmError(f"causal_conv1d activation must be None or 'silu', not {activation!r}")
