"""The causal conv1d on the host side: launches and the eager autograd Function."""

from __future__ import annotations

import torch
import triton

from wdmctl.scan.triton.conv_kernels import _conv_bwd_kernel, _conv_fwd_kernel
from wdmctl.scan.triton.launch import _choose
from wdmctl.scan.triton.scan import _bdl, _empty_like_layout, _order_args, _per_direction

# ----------------------------------------------------------------------------------------------------
# Causal conv1d: host side
# ----------------------------------------------------------------------------------------------------

# (BT, BD, num_warps) tiles; memory-bound, so the tuner mostly trades halo re-reads against occupancy
CONV_FWD_CONFIGS = ((32, 64, 4), (64, 64, 4), (128, 64, 8), (64, 128, 8), (16, 128, 4))
CONV_BWD_CONFIGS = ((32, 64, 4), (16, 64, 2), (16, 128, 4), (64, 64, 8), (32, 32, 2))


def _conv_key(x, weight, bias, silu, reverse, order_flags):
    return (*x.shape, *weight.shape, str(x.dtype), x.stride(1) == 1, bias is not None, silu, reverse,
            *sorted(order_flags.items()))


def _conv_weight_strides(weight: torch.Tensor) -> tuple[int, int, int]:
    """(channel, tap, direction) strides of a (d, width) or a pair's (2, d, width) weight."""
    return weight.stride(-2), weight.stride(-1), weight.stride(0) if weight.dim() == 3 else 0


def _conv_forward(x, weight, bias, silu, reverse, column_grid=()):
    """A weight of shape (2, d, width) makes a bidirectional pair: out has 2 * batch rows, rows batch..
    convolve x the other way with weight[1], bias[1]."""
    batch, d, length = x.shape
    pair = weight.dim() == 3
    rows = 2 * batch if pair else batch
    out = _empty_like_layout(x, batch=rows)
    order, order_flags = _order_args(column_grid, length, pair)

    def launch(cfg):
        bt, bd, warps = cfg
        _conv_fwd_kernel[(triton.cdiv(length, bt), triton.cdiv(d, bd), rows)](
            x, weight, bias, out, batch, d, length, *order.values(), *_bdl(x), *_conv_weight_strides(weight),
            *_bdl(out), W=weight.shape[-1], HAS_BIAS=bias is not None, SILU=silu, DIR=-1 if reverse else 1,
            **order_flags, BT=bt, BD=bd, num_warps=warps)

    key = _conv_key(x, weight, bias, silu, reverse, order_flags)
    launch(_choose("conv_fwd", key, rows * d, launch, CONV_FWD_CONFIGS, CONV_FWD_CONFIGS[0]))
    return out


def _conv_backward(dout, x, weight, bias, silu, reverse, column_grid=()):
    batch, d, length = x.shape
    pair = weight.dim() == 3
    rows = 2 * batch if pair else batch
    width = weight.shape[-1]
    dx = _empty_like_layout(x, batch=rows)
    order, order_flags = _order_args(column_grid, length, pair)
    out = {}

    def launch(cfg):
        bt, bd, warps = cfg
        nt = triton.cdiv(length, bt)
        out["dwp"] = torch.empty(rows * nt, width, d, device=x.device, dtype=torch.float32)
        out["dbp"] = torch.empty(rows * nt, d, device=x.device, dtype=torch.float32)
        _conv_bwd_kernel[(nt, triton.cdiv(d, bd), rows)](
            x, weight, bias, dout, dx, out["dwp"], out["dbp"], batch, d, length, *order.values(),
            *_bdl(x), *_conv_weight_strides(weight), *_bdl(dout), *_bdl(dx),
            W=width, HAS_BIAS=bias is not None, SILU=silu, DIR=-1 if reverse else 1,
            **order_flags, BT=bt, BD=bd, num_warps=warps)

    key = _conv_key(x, weight, bias, silu, reverse, order_flags)
    launch(_choose("conv_bwd", key, rows * d, launch, CONV_BWD_CONFIGS, CONV_BWD_CONFIGS[0]))
    dw = _per_direction(out["dwp"], pair).transpose(-1, -2).to(weight.dtype)
    db = _per_direction(out["dbp"], pair).to(bias.dtype) if bias is not None else None
    if pair:  # both directions read x: their gradients add up
        dx = dx[:batch] + dx[batch:]
    return dx, dw, db


class _CausalConv1dFn(torch.autograd.Function):
    """Autograd wrapper for the Triton causal conv1d; the backward recomputes the activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse, column_grid):
        ctx.save_for_backward(x, weight, bias)
        ctx.flags = (silu, reverse, column_grid)
        return _conv_forward(x, weight, bias, silu, reverse, column_grid)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = _conv_backward(dout, x, weight, bias, *ctx.flags)
        need = ctx.needs_input_grad
        return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None, None, None
