"""The segmented selective-scan forward (backend `triton-segmented`): the sequence cut into S segments scanned in
parallel, with a carry pass (kernels and their passes: segmented_kernels.py). The backward is the triton
backend's (_scan_backward recomputes the states itself; it needs nothing saved from the forward).

Why: at L = 258 and batch 8-64, _scan_fwd_kernel runs one program per (batch row, channel block), a thread per
channel (batch 8 x d_inner 1536: 12K threads where an H200 holds 270K); segments multiply that by S.

Which variant. Both need pass 1 (segment end states) and pass 2 (carries). Then either
  (a) re-scan each segment from its carried state (what this does), or
  (b) scan each segment once from zero writing y, and correct it afterwards: y_t += silu(z_t) C_t . (P_t h_in),
      P_t the running decay product (recomputed from delta: as many exponentials as a re-scan).
Bytes, with E = batch * d * L * esize (one (batch, d, L) sequence tensor) and H = batch * d * N * 4 (one fp32
state per channel); B and C are read once per pass from the packed (batch, L, 2, NP) fp32 buffer, 1/24 of E
for bf16 at d = 1536 and N = 16:
  (a) pass 1 reads u, delta of segments 0..S-2: 2E (S-1)/S;  pass 3 reads u, delta, z, writes y: 4E.
      States: pass 1 writes S-1 of them, pass 2 reads and rewrites them, pass 3 reads them: 4 (S-1) H.
      Total 4E + 2E (S-1)/S + 4 (S-1) H.
  (b) pass 1 reads u, delta, z, writes y: 4E; the correction reads delta, z, y and writes y for segments
      1..S-1: 4E (S-1)/S; states as in (a). Total 4E + 4E (S-1)/S + 4 (S-1) H, and y rounded twice in bf16.
(a) moves 2E (S-1)/S fewer bytes. At batch 64, d 1536, L 258, bf16, S = 4: E = 50.7 MB, H = 6.3 MB;
(a) = 203 + 76 + 75 = 354 MB (plus 3 x 2.1 MB of B, C) against 203 (+ 2.1) MB for the unsegmented forward,
1.7x the bytes; at batch 8 everything but the inputs' first read stays in the 50 MB L2. The unsegmented
forward runs at a small fraction of the bandwidth there (latency-bound), which is what segments buy back.
The carry pass as its own launch (pass 2) keeps the state traffic linear in S; composing every earlier
segment's carry inside pass 3 would save a launch but read S (S-1) / 2 states.
"""

from __future__ import annotations

import os

import torch
import triton

from wdmctl.scan.triton.launch import DEFAULT_SCAN_CONFIG, FWD_CONFIGS, _choose, _launch_options
from wdmctl.scan.triton.scan import (_bdl, _empty_like_layout, _flags, _key, _order_args, _pack, _scan_backward,
                                     scan_arguments)
from wdmctl.scan.triton.segmented_kernels import _seg_carry_kernel, _seg_scan_kernel, _seg_state_kernel

# Default segment count: enough channel-segments in flight to fill the GPU (an H200 holds ~270K threads, one
# per channel), but segments of at least MIN_SEGMENT_STEPS steps (shorter ones spend more on their state's
# two extra transfers than on their tokens). Unmeasured guesses: `bench scan` has to set them.
TARGET_THREADS = 128 * 1024
MIN_SEGMENT_STEPS = 32


def segment_count(rows: int, d: int, length: int, segments: int | None = None) -> int:
    """S for a problem: `segments` when given (or WDM_TRITON_SCAN_SEGMENTS), else the default above; then
    clamped so that no segment is empty (at most L segments, and cdiv(L, cdiv(L, S)) of them)."""
    if segments is None and os.environ.get("WDM_TRITON_SCAN_SEGMENTS"):
        segments = int(os.environ["WDM_TRITON_SCAN_SEGMENTS"])
    if segments is None:
        segments = min(triton.cdiv(TARGET_THREADS, rows * d), max(1, length // MIN_SEGMENT_STEPS))
    segments = max(1, min(int(segments), length))
    return triton.cdiv(length, triton.cdiv(length, segments))


def _segmented_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid=(), segments=None,
                       packed=None):
    """y as _scan_forward computes it (same arguments, pairs included), in S segments (segment_count)."""
    rows, d, length = u.shape
    n = A.shape[-1]
    pair = A.dim() == 3
    batch = rows // 2 if pair else rows
    nseg = segment_count(rows, d, length, segments)
    steps = triton.cdiv(length, nseg)
    y = _empty_like_layout(u)
    At, bc = packed or _pack(A, B, C)
    order, order_flags = _order_args(column_grid, length, pair)
    flags = _flags(D, z, delta_bias, delta_softplus, reverse, n, order_flags)
    zz = z if z is not None else u  # never read when HAS_Z is off
    np_ = flags["NP"]
    hin = torch.empty(rows, max(nseg - 1, 1), n, d, device=u.device, dtype=torch.float32)
    dsum = torch.empty(rows, max(nseg - 1, 1), d, device=u.device, dtype=torch.float32)
    state_flags = {k: v for k, v in flags.items() if k != "HAS_Z"}

    def launch(cfg):
        bd = cfg[0]
        if nseg > 1:
            _seg_state_kernel[(triton.cdiv(d, bd), rows, nseg - 1)](
                u, delta, At, bc, D, delta_bias, hin, dsum, batch, d, length, n, steps, nseg, *order.values(),
                *_bdl(u), *_bdl(delta), **state_flags, BD=bd, **_launch_options(cfg))
            _seg_carry_kernel[(triton.cdiv(d, bd), rows)](
                At, hin, dsum, batch, d, n, nseg, NP=np_, BD=bd, PAIR=pair, **_launch_options(cfg))
        _seg_scan_kernel[(triton.cdiv(d, bd), rows, nseg)](
            u, delta, At, bc, D, zz, delta_bias, y, hin, batch, d, length, n, steps, nseg, *order.values(),
            *_bdl(u), *_bdl(delta), *_bdl(zz), *_bdl(y), **flags, BD=bd, **_launch_options(cfg))

    key = (*_key(u, delta, B, z, flags), nseg)
    launch(_choose("seg", key, rows * d * nseg, launch, FWD_CONFIGS, DEFAULT_SCAN_CONFIG))
    return y


class _SegmentedScanFn(torch.autograd.Function):
    """The segmented forward; the backward is the triton backend's, which recomputes the states (see
    _SelectiveScanFn: same saved tensors)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid, segments):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.flags = (delta_softplus, reverse, column_grid)
        ctx.packed = _pack(A, B, C)
        return _segmented_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid,
                                  segments, ctx.packed)

    @staticmethod
    def backward(ctx, dy):
        grads = _scan_backward(dy, *ctx.saved_tensors, *ctx.flags, packed=ctx.packed)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None, None)


def selective_scan_segmented(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             reverse=False, column_grid=None, segments=None, **_):
    """selective_scan_triton with the segmented forward; `segments` overrides S (see segment_count). A of
    shape (2, d, N) makes it a bidirectional pair, as there. Under torch.compile it runs as the triton
    backend's custom op (the unsegmented forward): the segmented one has no custom op yet."""
    if u.numel() == 0:
        return torch.empty_like(u)
    A, D, delta_bias, grid = scan_arguments(A, D, delta_bias, column_grid)
    if torch.compiler.is_compiling():
        from wdmctl.scan.triton.custom_ops import _scan_op

        return _scan_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), grid)
    return _SegmentedScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), grid,
                                  segments)
