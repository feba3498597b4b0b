"""The selective scan on the host side: argument packing, the forward and backward launches, and the
eager autograd Function."""

from __future__ import annotations

import torch
import triton

from wdmctl.scan.registry import check_column_grid
from wdmctl.scan.triton.common import CHUNK
from wdmctl.scan.triton.launch import (BWD_CONFIGS, DEFAULT_BWD_CONFIG, DEFAULT_SCAN_CONFIG, FWD_CONFIGS, _choose,
                                       _lane_sum_flags, _launch_options, _partial_rows)
from wdmctl.scan.triton.scan_kernels import _scan_bwd1_kernel, _scan_bwd2_kernel, _scan_fwd_kernel

def _bdl(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, d, L) strides of a (batch, d, L) tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def _empty_like_layout(x: torch.Tensor, dtype: torch.dtype | None = None, batch: int | None = None) -> torch.Tensor:
    """An empty (batch, d, L) tensor in x's memory order: (batch, L, d) memory viewed transposed when x is
    channel-contiguous (what the model passes and wants back), else plain contiguous. `batch` overrides
    x's (a bidirectional pair's outputs have twice its rows)."""
    rows, d, length = x.shape
    batch = batch or rows
    dtype = dtype or x.dtype
    if x.stride(1) == 1 and x.stride(2) != 1:
        return torch.empty(batch, length, d, device=x.device, dtype=dtype).transpose(1, 2)
    return torch.empty(batch, d, length, device=x.device, dtype=dtype)


def _pack_bc(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """B_t and C_t of every step side by side in fp32, N zero-padded to a power of two: (batch, L, 2, NP).
    Every thread needs all N of them each step; one small copy (2 * batch * L * NP floats) saves each
    program per step the masks and bf16 conversions of 2N scalar loads."""
    batch, n, length = B.shape
    bc = B.new_zeros(batch, length, 2, triton.next_power_of_2(n), dtype=torch.float32)
    bc[:, :, 0, :n] = B.transpose(1, 2)
    bc[:, :, 1, :n] = C.transpose(1, 2)
    return bc


def _order_args(column_grid, length: int, pair: bool) -> tuple[dict, dict]:
    """Token-order launch arguments: runtime (NUM_EXTRA, GRID_W) and compile-time (PAIR, GRID_ROWS) ones.
    column_grid = (extra tokens, rows, cols) scans the patch grid column by column (None or () keeps order)."""
    if not column_grid:
        return dict(NUM_EXTRA=0, GRID_W=1), dict(PAIR=pair, GRID_ROWS=0)
    check_column_grid(column_grid, length)
    extra, rows, cols = (int(v) for v in column_grid)
    return dict(NUM_EXTRA=extra, GRID_W=cols), dict(PAIR=pair, GRID_ROWS=rows)


def _flags(D, z, delta_bias, delta_softplus, reverse, n, order):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(delta_softplus), REVERSE=bool(reverse), NP=triton.next_power_of_2(n), **order)


def _per_direction(partials: torch.Tensor, pair: bool) -> torch.Tensor:
    """Sum per-row partials (rows, ...) over the batch: one total, or one per direction of a pair."""
    if pair:
        return partials.view(2, partials.shape[0] // 2, *partials.shape[1:]).sum(1)
    return partials.sum(0)


def _key(u, delta, B, z, flags):
    """What makes a tuned config reusable: sizes, dtypes, layouts and the compile-time flags."""
    return (*u.shape, B.shape[1], str(u.dtype), str(B.dtype), u.stride(1) == 1, delta.stride(1) == 1,
            None if z is None else z.stride(1) == 1, *sorted(flags.items()))


def _pack(A, B, C):
    """What every scan kernel reads A, B and C from: A^T (N, D) channel-contiguous (see _CHANNEL_STRIDES) and
    B_t, C_t packed per step (_pack_bc). Made once per forward and kept for the backward (4 launches)."""
    return A.transpose(-1, -2).contiguous(), _pack_bc(B, C)


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid=(), packed=None):
    """y (see the scan interface). A of shape (2, d, N) makes it a bidirectional pair: u, delta, B, C and y
    have 2 * batch rows, rows batch.. scan the other way with A[1], D[1], delta_bias[1], and z (batch rows)
    gates both."""
    rows, d, length = u.shape
    n = A.shape[-1]
    pair = A.dim() == 3
    y = _empty_like_layout(u)
    At, bc = packed or _pack(A, B, C)
    order, order_flags = _order_args(column_grid, length, pair)
    flags = _flags(D, z, delta_bias, delta_softplus, reverse, n, order_flags)
    zz = z if z is not None else u  # never read when HAS_Z is off; any valid pointer and strides will do

    def launch(cfg):
        bd = cfg[0]
        _scan_fwd_kernel[(triton.cdiv(d, bd), rows)](
            u, delta, At, bc, D, zz, delta_bias, y, rows // 2 if pair else rows, d, length, n, *order.values(),
            *_bdl(u), *_bdl(delta), *_bdl(zz), *_bdl(y),
            **flags, BD=bd, **_launch_options(cfg))

    launch(_choose("fwd", _key(u, delta, B, z, flags), rows * d, launch, FWD_CONFIGS, DEFAULT_SCAN_CONFIG))
    return y


def _scan_backward(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid=(), packed=None,
                   segmented=None):
    """All gradients: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None where the input was None.
    A pair's rows write their own dz rows, added per direction here (as autograd adds two branches').
    `segmented` (segmented.py's SegmentedBackward) runs each pass in segments instead: it launches its kernels
    with the plain kernels' arguments plus its own, and the partials of dA, dD and d(delta_bias) are per (row,
    segment), rows * segments of them (rows here)."""
    batch, d, length = u.shape
    n = A.shape[-1]
    pair = A.dim() == 3
    dev = u.device
    f32 = torch.float32
    order, order_flags = _order_args(column_grid, length, pair)
    flags = _flags(D, z, delta_bias, delta_softplus, reverse, n, order_flags)
    key = _key(u, delta, B, z, flags)
    zz = z if z is not None else u
    At, bc = packed or _pack(A, B, C)
    chunk = CHUNK  # read at call time, so tests can shrink it to cross chunk boundaries at small L
    nc = triton.cdiv(length, chunk)
    if segmented is None:
        nseg, kind = 1, "bwd"
    else:  # tuned apart from the plain passes, per segment count
        nseg, kind, key = segmented.count, "seg_bwd", (*key, segmented.count)
    dz = _empty_like_layout(z, batch=batch) if z is not None else None
    dzz = dz if dz is not None else dy  # never written when HAS_Z is off
    per_direction_rows = batch // 2 if pair else batch
    f = torch.empty(batch, length, d, device=dev, dtype=f32)
    accf = torch.empty(batch * nseg, n, d, device=dev, dtype=f32)
    ck = torch.empty(batch, nc, n, d, device=dev, dtype=f32)
    ds = torch.empty(batch, nc, d, device=dev, dtype=f32)
    common = (*_bdl(u), *_bdl(delta), *_bdl(zz), *_bdl(dy))
    out = {}

    def launch1(cfg):
        bd = cfg[0]
        lane_sum = _lane_sum_flags(cfg, flags["NP"])
        out["dcp"] = torch.empty(batch, _partial_rows(cfg, d, lane_sum), length, n, device=dev, dtype=f32)
        args = (u, delta, At, bc, D, zz, delta_bias, dy, dzz, f, out["dcp"], accf, ck, ds,
                per_direction_rows, d, length, n, *order.values(), *common, *_bdl(dzz))
        options = dict(**flags, **lane_sum, BD=bd, CHUNK=chunk, **_launch_options(cfg))
        if segmented is None:
            _scan_bwd1_kernel[(triton.cdiv(d, bd), batch)](*args, **options)
        else:
            segmented.pass1(cfg, args, options)
        out["dC"] = out["dcp"].sum(1)  # part of what a config costs (smaller BD, more partials): timed too

    launch1(_choose(kind + "1", key, batch * d * nseg, launch1, BWD_CONFIGS, DEFAULT_BWD_CONFIG))

    du = _empty_like_layout(u)
    ddelta = _empty_like_layout(delta)
    dap = torch.empty(batch * nseg, n, d, device=dev, dtype=f32)
    ddp = torch.empty(batch * nseg, d, device=dev, dtype=f32)
    dbiasp = torch.empty(batch * nseg, d, device=dev, dtype=f32)

    def launch2(cfg):
        bd = cfg[0]
        lane_sum = _lane_sum_flags(cfg, flags["NP"])
        out["dbp"] = torch.empty(batch, _partial_rows(cfg, d, lane_sum), length, n, device=dev, dtype=f32)
        args = (u, delta, At, bc, D, zz, delta_bias, dy, f, accf, ck, ds, du, ddelta, out["dbp"], dap, ddp, dbiasp,
                per_direction_rows, d, length, n, *order.values(), *common, *_bdl(du), *_bdl(ddelta))
        options = dict(**flags, **lane_sum, BD=bd, CHUNK=chunk, **_launch_options(cfg))
        if segmented is None:
            _scan_bwd2_kernel[(triton.cdiv(d, bd), batch)](*args, **options)
        else:
            segmented.pass2(cfg, args, options)
        out["dB"] = out["dbp"].sum(1)

    launch2(_choose(kind + "2", key, batch * d * nseg, launch2, BWD_CONFIGS, DEFAULT_BWD_CONFIG))

    # partial sums over channel blocks / batch rows (and segments: row-major (row, segment), so a pair's first
    # direction's come first, as _per_direction wants): deterministic, unlike atomics
    dB = out["dB"].to(B.dtype).transpose(1, 2)
    dC = out["dC"].to(C.dtype).transpose(1, 2)
    dA = _per_direction(dap, pair).transpose(-1, -2).to(A.dtype)
    dD = _per_direction(ddp, pair).to(D.dtype) if D is not None else None
    dbias = _per_direction(dbiasp, pair).to(delta_bias.dtype) if delta_bias is not None else None
    if pair and dz is not None:
        dz = dz[: batch // 2] + dz[batch // 2:]
    return du, ddelta, dA, dB, dC, dD, dz, dbias


class _SelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper: the forward keeps the inputs and the packed A^T, B, C (1/24 of u's bytes for WDM-B/2);
    the backward recomputes the states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.flags = (delta_softplus, reverse, column_grid)
        ctx.packed = _pack(A, B, C)
        return _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid, ctx.packed)

    @staticmethod
    def backward(ctx, dy):
        grads = _scan_backward(dy, *ctx.saved_tensors, *ctx.flags, packed=ctx.packed)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None)


def scan_arguments(A, D, delta_bias, column_grid):
    """What every entry point hands the kernels: the parameters in fp32 and the column grid as a list of ints
    (empty for the row-major order)."""
    return (A.float(), D.float() if D is not None else None, delta_bias.float() if delta_bias is not None else None,
            [int(v) for v in column_grid] if column_grid else [])
