"""The two ends of a Mamba block's adaLN, fused for CUDA: RMSNorm + modulation in one Triton kernel each
way (`norm_modulate`), and the gated residual x + gate * h in one each way (`gated_residual`).

Every Mamba block computes h = RMSNorm(x) * (1 + scale[b]) + shift[b] on its fp32 residual stream, and under
autocast the in_proj then casts h to bf16. In PyTorch that is a chain of elementwise kernels and reductions
each way, each reading or writing a full (batch, tokens, width) fp32 tensor. Here: one kernel each way plus
the small partial sums for the norm weight, shift and scale, the output written directly in the autocast
dtype (rounded once, as the cast would). In WDM-B/2's graphed training step (H100, docs/triton-scan.md) it
removed ~180 launches (about 7 per call) and took elementwise work from 19.3 to 15.1 ms and reductions from
4.1 to 2.8 ms.

The gated residual adds the mixer's output h (bf16 under autocast) to the fp32 residual stream with a
per-(batch, channel) gate: PyTorch runs a multiply into an fp32 temporary and an add forward, and two
multiplies, a reduction and a cast backward. Here one kernel each way; the backward returns the incoming
gradient itself as the stream's gradient (the identity needs no copy).

Both pick the fused path on CUDA tensors when Triton is installed, and the PyTorch expression everywhere
else: on CPU, during ONNX export (the exporter traces the plain ops), under torch.compile (which fuses them
itself), and in Triton's interpreter only when `interpret=True` is asked for (the CPU tests).
`WDMCTL_FUSED_KERNELS=0` in the environment turns the fused path off everywhere (these kernels and the 2-D
conv's), so a user who suspects them can compare against the PyTorch expression without editing code.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: the PyTorch expression is used
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FUSED_ENV = "WDMCTL_FUSED_KERNELS"  # "0" turns the fused elementwise/conv kernels off (not the scan backend)
MAX_WIDTH = 8192  # the fused kernels hold a token's whole row in one program
ROWS = 8  # tokens per program: the backward's partial sums for the norm weight, shift and scale are per program


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (batch, width) shift and scale broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def reference_norm_modulate(x, norm: nn.RMSNorm, shift, scale):
    """The PyTorch expression the fused kernels implement."""
    return modulate(norm(x), shift, scale)


def use_fused_kernels(x: torch.Tensor, interpret: bool) -> bool:
    """The fused path (here and in grid_conv.py): CUDA tensors with Triton (or the interpreter when asked), not
    in ONNX export or under torch.compile."""
    if os.environ.get(FUSED_ENV, "1") == "0":
        return False
    fused = triton is not None and (x.is_cuda and not INTERPRET or interpret and INTERPRET)
    return fused and not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling()


def norm_modulate(x: torch.Tensor, norm: nn.RMSNorm, shift: torch.Tensor, scale: torch.Tensor,
                  interpret: bool = False) -> torch.Tensor:
    """modulate(norm(x), shift, scale) for x (batch, tokens, width); fused on CUDA (see the module docstring).
    Returns the autocast dtype under autocast on the fused path (what the next Linear would cast to)."""
    if not use_fused_kernels(x, interpret) or norm.weight is None or x.shape[-1] > MAX_WIDTH:
        return reference_norm_modulate(x, norm, shift, scale)
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    with torch.autocast(x.device.type, enabled=False):
        return _NormModulate.apply(x, norm.weight, shift, scale, float(eps), out_dtype)


if triton is not None:
    @triton.jit
    def _row(ptr, b, s_b, t, s_l, cols, mask):
        """Token t of batch row b as fp32 (zeros past the width); t = s_l = 0 for per-row vectors."""
        return tl.load(ptr + b * s_b + t * s_l + cols, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, shift_ptr, scale_ptr, out_ptr, rstd_ptr, L, D, eps,
                    s_xb, s_xl, s_ob, s_ol, s_shb, s_scb, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        """Program (row block j, batch b): tokens j*ROWS .. +ROWS of batch row b."""
        b = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        gain = 1.0 + _row(scale_ptr, b, s_scb, 0, 0, cols, mask)
        shift = _row(shift_ptr, b, s_shb, 0, 0, cols, mask)
        for r in range(ROWS):
            t = tl.program_id(0) * ROWS + r
            if t < L:
                x = _row(x_ptr, b, s_xb, t, s_xl, cols, mask)
                rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
                h = x * rstd * w * gain + shift
                tl.store(out_ptr + b * s_ob + t * s_ol + cols, h.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(rstd_ptr + b * L + t, rstd)

    @triton.jit
    def _bwd_kernel(x_ptr, w_ptr, scale_ptr, rstd_ptr, dh_ptr, dx_ptr, dwp_ptr, dshiftp_ptr, dscalep_ptr,
                    L, D, s_xb, s_xl, s_gb, s_gl, s_dxb, s_dxl, s_scb, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        """dx per token; per-program partial sums over its tokens of the norm weight's, shift's and scale's
        gradients, (batch, row blocks, D) each, summed by the caller (deterministic, no atomics)."""
        b = tl.program_id(1).to(tl.int64)
        j = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        gain = 1.0 + _row(scale_ptr, b, s_scb, 0, 0, cols, mask)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
        dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r in range(ROWS):
            t = j * ROWS + r
            if t < L:
                x = _row(x_ptr, b, s_xb, t, s_xl, cols, mask)
                dh = _row(dh_ptr, b, s_gb, t, s_gl, cols, mask)
                rstd = tl.load(rstd_ptr + b * L + t)
                xhat = x * rstd
                normed = xhat * w
                dshift += dh
                dscale += dh * normed
                g = dh * gain          # gradient of the normed activations
                dw += g * xhat
                gw = g * w             # gradient of xhat
                dx = rstd * (gw - xhat * (tl.sum(gw * xhat, axis=0) / D))
                tl.store(dx_ptr + b * s_dxb + t * s_dxl + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        part = (b * tl.num_programs(0) + j) * D + cols
        tl.store(dwp_ptr + part, dw, mask=mask)
        tl.store(dshiftp_ptr + part, dshift, mask=mask)
        tl.store(dscalep_ptr + part, dscale, mask=mask)


def reference_gated_residual(x, gate, h):
    """The PyTorch expression of the gated residual: x + gate * h, gate (batch, width) over tokens."""
    return x + gate[:, None] * h


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, interpret: bool = False) -> torch.Tensor:
    """x + gate[:, None] * h for x (batch, tokens, width) (the residual stream), gate (batch, width), h like x
    in any float dtype; returns x's dtype, as the PyTorch expression does. Fused on CUDA (module docstring)."""
    if not use_fused_kernels(x, interpret) or h.shape != x.shape or x.shape[-1] > MAX_WIDTH:
        return reference_gated_residual(x, gate, h)
    with torch.autocast(x.device.type, enabled=False):
        return _GatedResidual.apply(x, gate, h)


if triton is not None:
    @triton.jit
    def _gate_fwd_kernel(x_ptr, gate_ptr, h_ptr, out_ptr, L, D, s_xb, s_xl, s_gb, s_hb, s_hl, s_ob, s_ol,
                         BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        gate = _row(gate_ptr, b, s_gb, 0, 0, cols, mask)
        for r in range(ROWS):
            t = tl.program_id(0) * ROWS + r
            if t < L:
                x = _row(x_ptr, b, s_xb, t, s_xl, cols, mask)
                h = _row(h_ptr, b, s_hb, t, s_hl, cols, mask)
                tl.store(out_ptr + b * s_ob + t * s_ol + cols, (x + gate * h).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gate_bwd_kernel(gate_ptr, h_ptr, dout_ptr, dh_ptr, dgatep_ptr, L, D, s_gb, s_hb, s_hl, s_db, s_dl,
                         s_dhb, s_dhl, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        """dh per token; the gate's gradient as per-program partial sums over its tokens, (batch, row blocks, D)."""
        b = tl.program_id(1).to(tl.int64)
        j = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        gate = _row(gate_ptr, b, s_gb, 0, 0, cols, mask)
        dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r in range(ROWS):
            t = j * ROWS + r
            if t < L:
                dout = _row(dout_ptr, b, s_db, t, s_dl, cols, mask)
                h = _row(h_ptr, b, s_hb, t, s_hl, cols, mask)
                dgate += dout * h
                tl.store(dh_ptr + b * s_dhb + t * s_dhl + cols, (dout * gate).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dgatep_ptr + (b * tl.num_programs(0) + j) * D + cols, dgate, mask=mask)


def _launch_shape(x: torch.Tensor) -> tuple[tuple[int, int], dict]:
    batch, length, width = x.shape
    block = triton.next_power_of_2(width)
    return (triton.cdiv(length, ROWS), batch), dict(BLOCK_D=block, ROWS=ROWS, num_warps=min(8, max(1, block // 256)))


class _NormModulate(torch.autograd.Function):
    """Autograd wrapper; the forward saves x and the per-token 1/rms (one float per token)."""

    @staticmethod
    def forward(ctx, x, weight, shift, scale, eps, out_dtype):
        batch, length, width = x.shape
        # rows may be strided (shift and scale are views of one (batch, 3, width) tensor); elements must not
        x, shift, scale = (v if v.stride(-1) == 1 else v.contiguous() for v in (x, shift, scale))
        out = torch.empty(batch, length, width, device=x.device, dtype=out_dtype)
        rstd = torch.empty(batch, length, device=x.device, dtype=torch.float32)
        grid, meta = _launch_shape(x)
        _fwd_kernel[grid](x, weight, shift, scale, out, rstd, length, width, eps,
                          x.stride(0), x.stride(1), out.stride(0), out.stride(1), shift.stride(0), scale.stride(0),
                          **meta)
        ctx.save_for_backward(x, weight, scale, rstd)
        ctx.dtypes = (shift.dtype, scale.dtype)
        return out

    @staticmethod
    def backward(ctx, dh):
        x, weight, scale, rstd = ctx.saved_tensors
        batch, length, width = x.shape
        if dh.stride(-1) != 1:
            dh = dh.contiguous()
        grid, meta = _launch_shape(x)
        dx = torch.empty_like(x)
        partials = torch.empty(3, batch, grid[0], width, device=x.device, dtype=torch.float32)
        _bwd_kernel[grid](x, weight, scale, rstd, dh, dx, partials[0], partials[1], partials[2], length, width,
                          x.stride(0), x.stride(1), dh.stride(0), dh.stride(1), dx.stride(0), dx.stride(1),
                          scale.stride(0), **meta)
        dweight = partials[0].sum((0, 1)).to(weight.dtype)
        dshift, dscale = partials[1:].sum(2).unbind(0)
        return dx, dweight, dshift.to(ctx.dtypes[0]), dscale.to(ctx.dtypes[1]), None, None


class _GatedResidual(torch.autograd.Function):
    """Autograd wrapper; the forward saves the gate and h."""

    @staticmethod
    def forward(ctx, x, gate, h):
        batch, length, width = x.shape
        x, gate, h = (v if v.stride(-1) == 1 else v.contiguous() for v in (x, gate, h))
        dtype = torch.promote_types(torch.result_type(x, h), gate.dtype)  # the expression's type promotion
        out = torch.empty(batch, length, width, device=x.device, dtype=dtype)
        grid, meta = _launch_shape(x)
        _gate_fwd_kernel[grid](x, gate, h, out, length, width, x.stride(0), x.stride(1), gate.stride(0),
                               h.stride(0), h.stride(1), out.stride(0), out.stride(1), **meta)
        ctx.save_for_backward(gate, h)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, h = ctx.saved_tensors
        batch, length, width = h.shape
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        grid, meta = _launch_shape(h)
        dh = torch.empty_like(h)
        partials = torch.empty(batch, grid[0], width, device=h.device, dtype=torch.float32)
        _gate_bwd_kernel[grid](gate, h, dout, dh, partials, length, width, gate.stride(0), h.stride(0), h.stride(1),
                               dout.stride(0), dout.stride(1), dh.stride(0), dh.stride(1), **meta)
        dx = dout if dout.dtype == ctx.x_dtype else dout.to(ctx.x_dtype)
        return dx, partials.sum(1).to(gate.dtype), dh
