"""The Mamba branch's 2-D local conv (`mixer_conv = "2d"`, the presets' default between issue 15's two ablations), fused for CUDA:
SiLU(depthwise 3x3 conv of the patch grid + bias) on (batch, L, channels) tokens, L = extra + rows * cols,
read and written in that layout (`grid_conv_silu`).

In PyTorch the conv is a permute to NCHW, cuDNN's depthwise conv, a permute back, the extra tokens' centre
tap, a cat and a SiLU: five or six kernels each way, each a full pass over a (batch, L, d_inner) tensor.
Here one kernel forward (nine taps from L1/L2, fp32 accumulation, SiLU, the output rounded once into the
input's dtype) and two backward: the pre-activation gradient (recomputing the pre-activation, with the
weight and bias gradients as per-tile partial sums) and the input gradient (the transposed conv of it).
A pair (weights of shape (2, d, 1, 3, 3)) convolves one input with both directions' weights of a
bidirectional block in one launch, rows stacked on the batch axis as `MambaMixer._both_directions_at_once`
wants them, and its backward adds the two directions' input gradients in the kernel.

The fused path runs on CUDA tensors when Triton is installed; the PyTorch expression everywhere else: on CPU,
in ONNX export, under torch.compile, and in Triton's interpreter only when `interpret=True` is asked for (the
CPU tests), as `norm_modulate` decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wdmctl.models.norm_modulate import tl, triton, use_fused_kernels

TAPS = 9  # 3 x 3; tap k sits at row offset k // 3 - 1, column offset k % 3 - 1
# (BT tokens, BC channels, num_warps) tiles, timed once per problem by the scan backend's tuner
FWD_CONFIGS = ((32, 64, 4), (16, 128, 4), (64, 64, 8), (32, 128, 8), (8, 256, 4))
BWD_CONFIGS = ((32, 64, 4), (16, 128, 4), (64, 64, 8), (32, 128, 8))


def reference_grid_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grid) -> torch.Tensor:
    """The PyTorch expression the kernels implement: x (batch, L, d) tokens [extra tokens, a rows x cols patch
    grid row by row], weight (d, 1, 3, 3), bias (d,); the patches get the depthwise 3x3 conv (zero padding),
    the extra tokens its centre tap, then SiLU. A pair's weight (2, d, 1, 3, 3) and bias (2, d) give both
    convs stacked, (2 * batch, L, d)."""
    if weight.dim() == 5:
        return torch.cat([reference_grid_conv_silu(x, weight[i], bias[i], grid) for i in range(2)])
    extra, rows, cols = grid
    b, _, channels = x.shape
    patches = x[:, extra:].reshape(b, rows, cols, channels).permute(0, 3, 1, 2)
    patches = F.conv2d(patches, weight, bias, padding=1, groups=channels)
    patches = patches.permute(0, 2, 3, 1).reshape(b, rows * cols, channels)
    extras = x[:, :extra] * weight[:, 0, 1, 1].to(x.dtype) + bias.to(x.dtype)
    return F.silu(torch.cat([extras, patches.to(extras.dtype)], dim=1))


def grid_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grid,
                   interpret: bool = False) -> torch.Tensor:
    """reference_grid_conv_silu(x, weight, bias, grid), fused on CUDA (see the module docstring); x may be any
    strided (batch, L, d) view (in_proj's half). Returns x's dtype, computed in fp32."""
    if not use_fused_kernels(x, interpret):
        return reference_grid_conv_silu(x, weight, bias, grid)
    extra, rows, cols = (int(v) for v in grid)
    if extra < 0 or rows < 1 or cols < 1 or extra + rows * cols != x.shape[1]:
        raise ValueError(f"grid {tuple(grid)} does not describe {x.shape[1]} tokens (extra tokens + rows * cols)")
    with torch.autocast(x.device.type, enabled=False):
        return _GridConvSilu.apply(x, weight, bias, (extra, rows, cols))


if triton is not None:
    @triton.jit
    def _tap(base, t, offs_c, mc, s_l, s_c, L, NUM_EXTRA, ROWS, K, COLS: tl.constexpr):
        """Tap K of tokens t: the (BT, BC) fp32 tile of their grid neighbours at offset (K // 3 - 1, K % 3 - 1),
        zero outside the grid (the conv's padding) and past L; an extra token's only tap is itself (K = 4)."""
        j = tl.maximum(t - NUM_EXTRA, 0)
        r = j // COLS + (K // 3 - 1)
        c = j % COLS + (K % 3 - 1)
        ok = (t >= NUM_EXTRA) & (t < L) & (r >= 0) & (r < ROWS) & (c >= 0) & (c < COLS)
        mem = NUM_EXTRA + r * COLS + c
        if K == 4:
            ok = ok | (t < NUM_EXTRA)
            mem = tl.where(t < NUM_EXTRA, t, mem)
        return tl.load(base + mem[:, None] * s_l + offs_c[None, :] * s_c, mask=ok[:, None] & mc[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _tile(x_ptr, w_ptr, bias_ptr, BATCH, C, s_xb, PAIR: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """This program's tokens, channels, channel mask, output row b, x's row and this row's weights and bias
        (a pair's rows BATCH.. read x's row b - BATCH with the second set)."""
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
        mc = offs_c < C
        b = tl.program_id(2).to(tl.int64)
        xrow = b
        if PAIR:
            second = (b >= BATCH).to(tl.int64)
            xrow = b - second * BATCH
            w_ptr += second * C * 9
            bias_ptr += second * C
        bias = tl.load(bias_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)
        return t, offs_c, mc, b, x_ptr + xrow * s_xb, w_ptr + offs_c * 9, bias

    @triton.jit
    def _pre(x_base, w_base, bias, t, offs_c, mc, s_xl, s_xc, L, NUM_EXTRA, ROWS, COLS: tl.constexpr,
             BT: tl.constexpr, BC: tl.constexpr):
        """The pre-activation bias + sum_k w[k] tap_k(x) of a (BT, BC) tile."""
        pre = tl.zeros([BT, BC], dtype=tl.float32) + bias[None, :]
        for k in tl.static_range(9):
            wk = tl.load(w_base + k, mask=mc, other=0.0).to(tl.float32)
            pre += wk[None, :] * _tap(x_base, t, offs_c, mc, s_xl, s_xc, L, NUM_EXTRA, ROWS, k, COLS)
        return pre

    @triton.jit(do_not_specialize=["BATCH", "L", "NUM_EXTRA", "ROWS"])
    def _grid_conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, BATCH, C, L, NUM_EXTRA, ROWS, s_xb, s_xl, s_xc,
                              COLS: tl.constexpr, PAIR: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """out[b, t] = silu(pre) for a (BT tokens, BC channels) tile; out is contiguous (rows, L, C)."""
        t, offs_c, mc, b, x_base, w_base, bias = _tile(x_ptr, w_ptr, bias_ptr, BATCH, C, s_xb, PAIR, BT, BC)
        pre = _pre(x_base, w_base, bias, t, offs_c, mc, s_xl, s_xc, L, NUM_EXTRA, ROWS, COLS, BT, BC)
        out = pre * tl.sigmoid(pre)
        tl.store(out_ptr + (b * L + t[:, None]) * C + offs_c[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(t < L)[:, None] & mc[None, :])

    @triton.jit(do_not_specialize=["BATCH", "L", "NUM_EXTRA", "ROWS"])
    def _grid_conv_bwd_pre_kernel(x_ptr, w_ptr, bias_ptr, go_ptr, dpre_ptr, dwp_ptr, dbp_ptr, BATCH, C, L, NUM_EXTRA,
                                  ROWS, s_xb, s_xl, s_xc, s_gb, s_gl, s_gc, COLS: tl.constexpr, PAIR: tl.constexpr,
                                  BT: tl.constexpr, BC: tl.constexpr):
        """dpre = dout * silu'(pre) (pre recomputed) into fp32 (rows, L, C) scratch, and this tile's sums over
        its tokens of dpre * tap_k(x) (the weight gradient, (tiles, 9, C)) and of dpre (the bias's, (tiles, C))."""
        t, offs_c, mc, b, x_base, w_base, bias = _tile(x_ptr, w_ptr, bias_ptr, BATCH, C, s_xb, PAIR, BT, BC)
        pre = _pre(x_base, w_base, bias, t, offs_c, mc, s_xl, s_xc, L, NUM_EXTRA, ROWS, COLS, BT, BC)
        tile_mask = (t < L)[:, None] & mc[None, :]
        dout = tl.load(go_ptr + b * s_gb + t[:, None] * s_gl + offs_c[None, :] * s_gc, mask=tile_mask,
                       other=0.0).to(tl.float32)
        sg = tl.sigmoid(pre)
        dpre = dout * sg * (1.0 + pre * (1.0 - sg))
        tl.store(dpre_ptr + (b * L + t[:, None]) * C + offs_c[None, :], dpre, mask=tile_mask)
        tile = b * tl.num_programs(0) + tl.program_id(0)
        for k in tl.static_range(9):
            xk = _tap(x_base, t, offs_c, mc, s_xl, s_xc, L, NUM_EXTRA, ROWS, k, COLS)
            tl.store(dwp_ptr + (tile * 9 + k) * C + offs_c, tl.sum(dpre * xk, axis=0), mask=mc)
        tl.store(dbp_ptr + tile * C + offs_c, tl.sum(dpre, axis=0), mask=mc)

    @triton.jit(do_not_specialize=["BATCH", "L", "NUM_EXTRA", "ROWS"])
    def _grid_conv_bwd_dx_kernel(dpre_ptr, w_ptr, dx_ptr, BATCH, C, L, NUM_EXTRA, ROWS, s_dxb, s_dxl, s_dxc,
                                 COLS: tl.constexpr, PAIR: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """dx[b, t] = sum_k w[k] dpre[t - offset_k] (the transposed conv: tap 8 - k is offset -offset_k), summed
        over both directions of a pair; x's row b gets rows b and b + BATCH of dpre."""
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
        mc = offs_c < C
        b = tl.program_id(2).to(tl.int64)
        dx = tl.zeros([BT, BC], dtype=tl.float32)
        for direction in tl.static_range(1 + PAIR):
            base = dpre_ptr + (b + direction * BATCH) * L * C
            for k in tl.static_range(9):
                wk = tl.load(w_ptr + (direction * C + offs_c) * 9 + k, mask=mc, other=0.0).to(tl.float32)
                dx += wk[None, :] * _tap(base, t, offs_c, mc, C, 1, L, NUM_EXTRA, ROWS, 8 - k, COLS)
        tl.store(dx_ptr + b * s_dxb + t[:, None] * s_dxl + offs_c[None, :] * s_dxc, dx.to(dx_ptr.dtype.element_ty),
                 mask=(t < L)[:, None] & mc[None, :])


def _run(kind, kernel, configs, x, rows, grid, pair, arguments, layout=()):
    """Launch `kernel` over (token tiles, channel tiles, rows) with the config the scan backend's tuner picks
    for this problem (`wdmctl.scan.triton.launch._choose`, which also times the configs once per problem).
    `arguments(cfg)` gives the pointers before the sizes and the strides after them (per config, as partial
    sums depend on the tile)."""
    from wdmctl.scan.triton.launch import _choose  # deferred: triton is optional, and heavy to import

    batch, length, channels = x.shape
    extra, grid_rows, cols = grid

    def launch(cfg):
        bt, bc, warps = cfg
        pointers, strides = arguments(cfg)
        kernel[(triton.cdiv(length, bt), triton.cdiv(channels, bc), rows)](
            *pointers, batch, channels, length, extra, grid_rows, *strides, COLS=cols, PAIR=pair, BT=bt, BC=bc,
            num_warps=warps)

    key = (*x.shape, str(x.dtype), rows, *grid, *layout)
    launch(_choose(kind, key, rows * channels, launch, configs, configs[0]))


class _GridConvSilu(torch.autograd.Function):
    """Autograd wrapper: saves x and the weights; the backward recomputes the pre-activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, grid):
        batch, length, channels = x.shape
        pair = weight.dim() == 5
        rows = 2 * batch if pair else batch
        # (directions, d, 9) and (directions, d) fp32: what the kernels index (a pair's second set 9 d apart)
        w = weight.reshape(-1, channels, TAPS).float().contiguous()
        b = bias.reshape(-1, channels).float().contiguous()
        out = torch.empty(rows, length, channels, device=x.device, dtype=x.dtype)
        _run("conv2d_fwd", _grid_conv_fwd_kernel, FWD_CONFIGS, x, rows, grid, pair,
             lambda cfg: ((x, w, b, out), x.stride()), (x.stride(-1) == 1,))
        ctx.save_for_backward(x, w, b)
        ctx.grid, ctx.pair = grid, pair
        ctx.like = (weight.shape, weight.dtype, bias.shape, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, b = ctx.saved_tensors
        weight_shape, weight_dtype, bias_shape, bias_dtype = ctx.like
        batch, length, channels = x.shape
        rows, directions = dout.shape[0], 2 if ctx.pair else 1
        dpre = torch.empty(rows, length, channels, device=x.device, dtype=torch.float32)
        partials = {}

        def pre_arguments(cfg):
            tiles = rows * triton.cdiv(length, cfg[0])
            partials["dw"] = torch.empty(tiles, TAPS, channels, device=x.device, dtype=torch.float32)
            partials["db"] = torch.empty(tiles, channels, device=x.device, dtype=torch.float32)
            return (x, w, b, dout, dpre, partials["dw"], partials["db"]), (*x.stride(), *dout.stride())

        layout = (x.stride(-1) == 1, dout.stride(-1) == 1)
        _run("conv2d_bwd_pre", _grid_conv_bwd_pre_kernel, BWD_CONFIGS, x, rows, ctx.grid, ctx.pair, pre_arguments,
             layout)
        dx = torch.empty(batch, length, channels, device=x.device, dtype=x.dtype)
        # one program per row of x: a pair's two directions' gradients are added in the kernel
        _run("conv2d_bwd_dx", _grid_conv_bwd_dx_kernel, BWD_CONFIGS, x, batch, ctx.grid, ctx.pair,
             lambda cfg: ((dpre, w, dx), dx.stride()), layout)
        dweight = partials["dw"].view(directions, -1, TAPS, channels).sum(1).transpose(1, 2)
        dbias = partials["db"].view(directions, -1, channels).sum(1)
        return (dx, dweight.reshape(weight_shape).to(weight_dtype), dbias.reshape(bias_shape).to(bias_dtype), None)
