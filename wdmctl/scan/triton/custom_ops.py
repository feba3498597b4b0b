"""The same kernels as opaque torch.library custom ops, for torch.compile."""

from __future__ import annotations

from typing import Optional

import torch

from wdmctl.scan.triton.scan import _empty_like_layout, _scan_backward, _scan_forward
from wdmctl.scan.triton.conv import _conv_backward, _conv_forward

# ----------------------------------------------------------------------------------------------------
# torch.compile: the same kernels as opaque custom ops
# ----------------------------------------------------------------------------------------------------
# Dynamo cannot trace into the autograd Functions above (their launches take symbolic sizes and fail with
# "'SymNodeVariable' object has no attribute 'value'"). Under torch.compile the scan and the conv therefore
# run as custom ops, whose fake implementations give only the outputs' shapes, dtypes and strides, so the
# rest of the model compiles around them. Eager mode keeps the Functions: a custom op's dispatch costs
# microseconds per call, and sampling at small batch is bound by exactly such host time.

def _empty_transposed(like: torch.Tensor) -> torch.Tensor:
    """A tensor of like's shape as the backward returns its gradient: memory with the last two axes swapped,
    viewed back (dB, dC: (batch, L, N) memory; dA: (N, d); the conv's dweight: (width, d))."""
    return like.new_empty(*like.shape[:-2], like.shape[-1], like.shape[-2]).transpose(-1, -2)


@torch.library.custom_op("wdmctl::triton_selective_scan", mutates_args=())
def _scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
             delta_softplus: bool, reverse: bool, column_grid: list[int]) -> torch.Tensor:
    return _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid)


@_scan_op.register_fake
def _scan_op_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid):
    return _empty_like_layout(u)


@torch.library.custom_op("wdmctl::triton_selective_scan_backward", mutates_args=())
def _scan_backward_op(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                      delta_bias: Optional[torch.Tensor], delta_softplus: bool, reverse: bool,
                      column_grid: list[int]) -> list[torch.Tensor]:
    grads = _scan_backward(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid)
    return [g if g is not None else u.new_empty(0) for g in grads]   # a custom op returns no None


@_scan_backward_op.register_fake
def _scan_backward_op_fake(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid):
    absent = u.new_empty(0)
    return [_empty_like_layout(u), _empty_like_layout(delta), _empty_transposed(A),
            _empty_transposed(B), _empty_transposed(C), D.new_empty(D.shape) if D is not None else absent,
            _empty_like_layout(z) if z is not None else absent,
            delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else absent]


def _scan_op_setup(ctx, inputs, output):
    *tensors, delta_softplus, reverse, column_grid = inputs
    ctx.save_for_backward(*tensors)
    ctx.flags = (delta_softplus, reverse, column_grid)


def _scan_op_backward(ctx, dy):
    tensors = ctx.saved_tensors
    grads = _scan_backward_op(dy, *tensors, *ctx.flags)
    return (*(g if t is not None else None for g, t in zip(grads, tensors)), None, None, None)


_scan_op.register_autograd(_scan_op_backward, setup_context=_scan_op_setup)


@torch.library.custom_op("wdmctl::triton_causal_conv1d", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool,
             reverse: bool, column_grid: list[int]) -> torch.Tensor:
    return _conv_forward(x, weight, bias, silu, reverse, column_grid)


@_conv_op.register_fake
def _conv_op_fake(x, weight, bias, silu, reverse, column_grid):
    return _empty_like_layout(x, batch=x.shape[0] * (2 if weight.dim() == 3 else 1))


@torch.library.custom_op("wdmctl::triton_causal_conv1d_backward", mutates_args=())
def _conv_backward_op(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      silu: bool, reverse: bool, column_grid: list[int]) -> list[torch.Tensor]:
    dx, dw, db = _conv_backward(dout, x, weight, bias, silu, reverse, column_grid)
    return [dx, dw, db if db is not None else x.new_empty(0)]


@_conv_backward_op.register_fake
def _conv_backward_op_fake(dout, x, weight, bias, silu, reverse, column_grid):
    return [_empty_like_layout(x), _empty_transposed(weight),
            bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)]


def _conv_op_setup(ctx, inputs, output):
    x, weight, bias, silu, reverse, column_grid = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.flags = (silu, reverse, column_grid)


def _conv_op_backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _conv_backward_op(dout, x, weight, bias, *ctx.flags)
    return dx, dw, db if bias is not None else None, None, None, None


_conv_op.register_autograd(_conv_op_backward, setup_context=_conv_op_setup)
