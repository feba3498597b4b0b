"""The causal conv1d (+ SiLU) kernels, forward and backward: depthwise, width <= 4, channels on the tile's
contiguous axis."""

from __future__ import annotations

import triton
import triton.language as tl

from wdmctl.scan.triton.common import _column_major, _sigmoid

# ----------------------------------------------------------------------------------------------------
# Causal conv1d (+ SiLU): depthwise, width W <= 4, channels on the tile's contiguous axis
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _conv_tap(x_base, t, s_xl, shift, L, md, step, NUM_EXTRA, GRID_W, GRID_ROWS: tl.constexpr):
    """x at order positions t + shift * step (step = -1 is `reverse`) as a (BT, BD) fp32 tile, zero outside
    [0, L) (the causal padding); positions map to memory through the token order (_column_major)."""
    pos = t + shift * step
    ok = (pos >= 0) & (pos < L)
    mem = _column_major(pos, NUM_EXTRA, GRID_W, GRID_ROWS)
    return tl.load(x_base + mem[:, None] * s_xl, mask=ok[:, None] & md[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv_pre(x_base, w_base, bias, t, s_xl, s_wk, j, L, md, step, NUM_EXTRA, GRID_W, W: tl.constexpr,
              GRID_ROWS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """The pre-activation at positions t + j * step: bias + sum_k w[k] x[. - (W-1-k) * step]."""
    acc = tl.zeros([BT, BD], dtype=tl.float32) + bias[None, :]
    for k in tl.static_range(W):
        wk = tl.load(w_base + k * s_wk, mask=md, other=0.0).to(tl.float32)
        acc += wk[None, :] * _conv_tap(x_base, t, s_xl, j - (W - 1 - k), L, md, step, NUM_EXTRA, GRID_W, GRID_ROWS)
    return acc


@triton.jit
def _conv_tile(x_ptr, w_ptr, bias_ptr, BATCH, DIM, s_xb, s_xd, s_wd, s_wp, HAS_BIAS: tl.constexpr,
               DIR: tl.constexpr, PAIR: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """This program's (BT positions, BD channels) tile: positions, channels, output row, channel mask, bias
    (0 when absent), x's row pointer per channel, this row's weights and its step (+1 causal, -1 reverse).
    With PAIR the 2 * BATCH output rows are two directions of one input: rows BATCH.. read x's row b - BATCH
    with the second weights (s_wp apart) and the opposite step."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    xrow = b
    step = DIR
    if PAIR:
        second = (b >= BATCH).to(tl.int64)
        xrow = b - second * BATCH
        w_ptr += second * s_wp
        bias_ptr += second * DIM
        step = DIR - 2 * DIR * second
    md = offs_d < DIM
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)
    return t, offs_d, b, md, bias, x_ptr + xrow * s_xb + offs_d[None, :] * s_xd, w_ptr + offs_d * s_wd, step


@triton.jit(do_not_specialize=["BATCH", "L", "NUM_EXTRA", "GRID_W"])
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, BATCH, DIM, L, NUM_EXTRA, GRID_W,
    s_xb, s_xd, s_xl, s_wd, s_wk, s_wp, s_ob, s_od, s_ol,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, DIR: tl.constexpr,
    PAIR: tl.constexpr, GRID_ROWS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """out[t] = act(bias + sum_k w[k] x[t - (W-1-k) * DIR]) for a (BT, BD) tile of order positions t;
    DIR = -1 is `reverse`."""
    t, offs_d, b, md, bias, x_base, w_base, step = _conv_tile(
        x_ptr, w_ptr, bias_ptr, BATCH, DIM, s_xb, s_xd, s_wd, s_wp, HAS_BIAS, DIR, PAIR, BT, BD)
    pre = _conv_pre(x_base, w_base, bias, t, s_xl, s_wk, 0, L, md, step, NUM_EXTRA, GRID_W, W, GRID_ROWS, BT, BD)
    if SILU:
        pre = pre * _sigmoid(pre)
    mt = t < L
    mem = _column_major(t, NUM_EXTRA, GRID_W, GRID_ROWS)
    tl.store(out_ptr + b * s_ob + mem[:, None] * s_ol + offs_d[None, :] * s_od, pre.to(out_ptr.dtype.element_ty),
             mask=mt[:, None] & md[None, :])


@triton.jit(do_not_specialize=["BATCH", "L", "NUM_EXTRA", "GRID_W"])
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, go_ptr, dx_ptr, dwp_ptr, dbp_ptr, BATCH, DIM, L, NUM_EXTRA, GRID_W,
    s_xb, s_xd, s_xl, s_wd, s_wk, s_wp, s_gb, s_gd, s_gl, s_dxb, s_dxd, s_dxl,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, DIR: tl.constexpr,
    PAIR: tl.constexpr, GRID_ROWS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """One pass, no scratch: dx[t] = sum_j w[W-1-j] dpre[t + j] needs dpre W-1 steps ahead, so the tile
    recomputes the pre-activations there (from L1-resident x) instead of reading a stored dpre.
    dw and dbias: per-tile partial sums, (tiles, W, D) and (tiles, D), summed by the caller."""
    t, offs_d, b, md, bias, x_base, w_base, step = _conv_tile(
        x_ptr, w_ptr, bias_ptr, BATCH, DIM, s_xb, s_xd, s_wd, s_wp, HAS_BIAS, DIR, PAIR, BT, BD)
    g_base = go_ptr + b * s_gb + offs_d[None, :] * s_gd
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    tile = b * tl.num_programs(0) + tl.program_id(0)
    for j in tl.static_range(W):
        dpre = _conv_tap(g_base, t, s_gl, j, L, md, step, NUM_EXTRA, GRID_W, GRID_ROWS)  # dout at t + j (0 outside)
        if SILU:
            pre = _conv_pre(x_base, w_base, bias, t, s_xl, s_wk, j, L, md, step, NUM_EXTRA, GRID_W, W, GRID_ROWS,
                            BT, BD)
            sg = _sigmoid(pre)
            dpre = dpre * sg * (1.0 + pre * (1.0 - sg))
        wj = tl.load(w_base + (W - 1 - j) * s_wk, mask=md, other=0.0).to(tl.float32)
        dx += wj[None, :] * dpre
        if j == 0:  # this tile's own positions: the weight and bias gradients
            for k in tl.static_range(W):
                xk = _conv_tap(x_base, t, s_xl, -(W - 1 - k), L, md, step, NUM_EXTRA, GRID_W, GRID_ROWS)
                tl.store(dwp_ptr + (tile * W + k) * DIM + offs_d, tl.sum(dpre * xk, axis=0), mask=md)
            tl.store(dbp_ptr + tile * DIM + offs_d, tl.sum(dpre, axis=0), mask=md)
    mt = t < L
    mem = _column_major(t, NUM_EXTRA, GRID_W, GRID_ROWS)
    tl.store(dx_ptr + b * s_dxb + mem[:, None] * s_dxl + offs_d[None, :] * s_dxd, dx.to(dx_ptr.dtype.element_ty),
             mask=mt[:, None] & md[None, :])
