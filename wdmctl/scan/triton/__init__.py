"""Our Triton selective scan (forward and backward) and causal conv1d, behind the scan interface.

Split by kernel family, as mamba-ssm splits ops/triton: common.py (constants and inlined helpers),
scan_kernels.py and conv_kernels.py (the @triton.jit kernels), launch.py (configurations, autotuning, PTX),
scan.py and conv.py (host side and autograd), custom_ops.py (torch.compile); this file registers the backend.

Layout. One program owns one batch row and a block of BD channels; its state lives in registers as an
(N, BD) fp32 tile whose N states of a channel sit in one thread (the channel axis is the tile's last, fastest
axis, so Triton spreads channels over lanes and keeps N in-thread; with BD = 16 on one warp it splits them
over 2 lanes). Sums over N (y, du, ddelta) are then register adds, not shuffles. Time is a plain loop; each
iteration prefetches the next step's inputs so the loads of step t+1 overlap the arithmetic of step t. Every
tensor is read through its strides: a (batch, d, L) view of (batch, L, d) memory (what the model passes)
gives coalesced channel loads, and `reverse` only walks t from L-1 down to 0 (no flipped copies).

Backward without storing the (batch, d, L, N) states. With a_t = delta_t * A, x_t = delta_t u_t B_t,
g_t the gradient of the pre-gate output and dh_t the state gradient (dh_t = g_t C_t + e^{a_{t+1}} dh_{t+1}),
everything but the decay terms needs only dh (one reverse pass). The decay gradient
G_t = dL/da_t = dh_t e^{a_t} h_{t-1} couples dh with the previous state; it telescopes:

    G_t = G_{t+1} + F_t - R_t,   F_t = g_t C_t h_t  (forward quantities),   R_t = dh_t x_t  (reverse ones)

so pass 1 (forward time) recomputes h and writes f_t = sum_n A F_t per (b, t, d) plus dz and dC, and
pass 2 (reverse time) runs dh and accumulates ddelta_t = sum_n A G_t + u_t sum_n dh_t B_t. For dA we need
sum_t delta_t G_t per state; doing that with the telescoped G over the whole sequence would cancel
large terms (error ~ eps * L^1.5), so sequences are cut into chunks of CHUNK steps: pass 1 stores the
state at each chunk end (batch x chunks x N x d, 1/CHUNK of the full states), pass 2 computes G exactly at
each chunk start from it and telescopes only inside a chunk (error ~ eps * CHUNK).
"""

from __future__ import annotations

import dataclasses

import torch

from wdmctl.scan import mamba_ssm_scan
from wdmctl.scan.registry import BACKENDS, ScanBackend, register_backend
from wdmctl.scan.triton.common import INTERPRET
from wdmctl.scan.triton.conv import _CausalConv1dFn
from wdmctl.scan.triton.custom_ops import _conv_op, _scan_op
from wdmctl.scan.triton.scan import _SelectiveScanFn, scan_arguments
from wdmctl.scan.triton.segmented import segments_pay, selective_scan_segmented

# ----------------------------------------------------------------------------------------------------
# Entry points: the eager autograd Functions, or the custom ops under torch.compile
# ----------------------------------------------------------------------------------------------------

MAX_CONV_WIDTH = 4  # the conv kernels unroll up to 4 taps; `ScanBackend.max_conv_width` routes wider ones


def token_major(x: torch.Tensor | None) -> torch.Tensor | None:
    """x (batch, d, L) as a view of (batch, L, d) memory, the layout in which each step's channels are
    adjacent and the kernels' loads coalesce: one copy when x is not channel-contiguous (mamba-ssm's
    contiguous (batch, d, L), where a step's channels lie L elements apart), else x itself."""
    if x is None or x.stride(1) == 1 or x.shape[1] == 1:
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          reverse=False, column_grid=None, token_major_copies=False, **_):
    """The selective scan (wdmctl.scan's semantics) with our Triton kernels; differentiable. The column-major
    token order is read in place (no permuted copies). A of shape (2, d, N) makes it wdmctl.scan's
    selective_scan_pair: both directions in one launch per kernel, stacked on the batch axis so the kernels
    see twice the programs, each picking its direction's parameters; z is shared and its two gradients are
    added in the backward.

    Any strides are read as given. `token_major_copies` first copies u, delta and z that are not
    channel-contiguous into (batch, L, d) memory (`token_major`), so that callers with contiguous (batch, d, L)
    tensors run the kernels on the layout they are fastest on; y (and, through autograd, the copies' gradients)
    then come back as views of token-major memory. Whether the copies pay is measured by `bench scan`'s
    contiguous-token-major rows, so it is not the default."""
    if u.numel() == 0:
        return torch.empty_like(u)
    if token_major_copies:
        u, delta, z = token_major(u), token_major(delta), token_major(z)
    A, D, delta_bias, grid = scan_arguments(A, D, delta_bias, column_grid)
    scan = _scan_op if torch.compiler.is_compiling() else _SelectiveScanFn.apply
    return scan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), grid)


def selective_scan_triton_auto(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                               reverse=False, column_grid=None, token_major_copies=False, **_):
    """The `triton` backend's scan: selective_scan_segmented where segments pay (segmented.segments_pay: few
    channels in flight, a long sequence; 2.3x forward+backward at WDM-B/2's 4,096 tokens, batch 8, on the H200;
    a laxer rule when no backward follows), selective_scan_triton otherwise. The choice is by shape and by
    whether autograd records the call, so it is the same at every call of a CUDA-graphed step. `triton-plain`
    never segments, `triton-segmented` always does."""
    backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    # a pair's u holds both directions' rows already
    if not token_major_copies and segments_pay(*u.shape, backward=backward):
        return selective_scan_segmented(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid)
    return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid,
                                 token_major_copies)


def causal_conv1d_triton(x, weight, bias=None, activation=None, reverse=False, column_grid=None):
    """Depthwise causal conv1d (wdmctl.scan's semantics) with our Triton kernels: x (batch, d, L) with
    any strides, weight (d, width <= 4), optional SiLU, `reverse` anti-causal and the column-major order
    read in place, without permuted copies. Computes in fp32, returns x's dtype (like causal-conv1d).
    A weight of shape (2, d, width) convolves both directions of a pair in one launch (2 * batch rows)."""
    if weight.shape[-1] > MAX_CONV_WIDTH:
        raise ValueError(f"the Triton conv takes widths up to {MAX_CONV_WIDTH}, not {weight.shape[-1]}; "
                         f"wdmctl.scan.causal_conv1d routes wider convs to the torch backend")
    if x.numel() == 0:
        return x.new_empty(2 * x.shape[0] if weight.dim() == 3 else x.shape[0], *x.shape[1:])
    grid = [int(v) for v in column_grid] if column_grid else []
    conv = _conv_op if torch.compiler.is_compiling() else _CausalConv1dFn.apply
    return conv(x, weight, bias, activation in ("silu", "swish"), bool(reverse), grid)


# ----------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------

# The backend's conv: causal-conv1d's kernel for forward scans where it is installed (on the H100 it is 5-27%
# faster forward+backward at L = 258, the model's length; ours is 7% faster at 1026), ours otherwise. causal-
# conv1d has no reverse: it would need the input and output flipped, and the flips' copies and their backward
# cost more than its kernel saves (WDM-B/2's profile: 1.9 ms per step in 52 flips). Ours reads reverse through
# its DIR and beats the PyTorch fallback 6-15x forward. See docs/triton-scan.md.
def causal_conv1d_backend(x, weight, bias=None, activation=None, reverse=False, column_grid=None):
    """The triton backend's conv: causal-conv1d's kernel when installed and the scan runs forward in memory
    order, else ours (reverse, column-major order, bidirectional pairs)."""
    if mamba_ssm_scan._has("causal_conv1d") and not reverse and not column_grid and weight.dim() == 2:
        return mamba_ssm_scan.causal_conv1d_mamba(x, weight, bias, activation, reverse)
    return causal_conv1d_triton(x, weight, bias, activation, reverse, column_grid)


def is_available() -> bool:
    return torch.cuda.is_available() and not INTERPRET


register_backend(ScanBackend(
    name="triton",
    selective_scan=selective_scan_triton_auto,
    causal_conv1d=causal_conv1d_backend,
    is_available=is_available,
    install_hint="pip install triton (Linux with an NVIDIA GPU; it comes with PyTorch's CUDA wheels)",
    devices=("cuda",),
    reads_column_order=True,
    selective_scan_pair=selective_scan_triton_auto,   # A of shape (2, d, N) selects the pair kernels
    causal_conv1d_pair=causal_conv1d_backend,
    max_conv_width=MAX_CONV_WIDTH,
    priority=20,  # above mamba_ssm's 10: 2.1-3.5x faster forward+backward on the H100 (docs/triton-scan.md)
))

# The same kernels without the two token-order fusions: the column-major order goes through transposed
# copies and a bidirectional block makes one call per direction. Kept so that `bench train --backends
# triton,triton-unfused` measures what the fusions win (docs/triton-scan.md); `auto` never picks it.
register_backend(dataclasses.replace(BACKENDS["triton"], name="triton-unfused", reads_column_order=False,
                                     selective_scan_pair=None, causal_conv1d_pair=None, priority=15))

# The same kernels, never in segments (`triton` segments where segmented.segments_pay says so): the baseline
# that `bench train --backends triton-plain,triton` measures the rule against; `auto` never picks it.
register_backend(dataclasses.replace(BACKENDS["triton"], name="triton-plain", selective_scan=selective_scan_triton,
                                     selective_scan_pair=selective_scan_triton, priority=6))

# The same kernels always in segments (segmented.py: the sequence cut into segments scanned in parallel,
# forward and backward, with carry passes between them), at any shape, with `segments` / backward_segments
# (or WDM_TRITON_SCAN_SEGMENTS) choosing S; `auto` never picks it (priority below triton's and mamba_ssm's).
register_backend(dataclasses.replace(BACKENDS["triton"], name="triton-segmented",
                                     selective_scan=selective_scan_segmented,
                                     selective_scan_pair=selective_scan_segmented, priority=5))
