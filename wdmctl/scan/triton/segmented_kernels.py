"""The segmented selective scan's kernels (backend `triton-segmented`; host side in segmented.py).

The sequence (in scan order) is cut into S segments of T steps; the grid gains an axis of segments, so S times
as many programs are in flight as in the plain kernels' (batch row, channel block) grid.

Forward, T = cdiv(L, S):
    pass 1 (_seg_state_kernel, segments 0..S-2): scan the segment from a zero state; store its end state
            h_end (batch, S-1, N, D) and its delta sum (batch, S-1, D). The segment's decay product
            prod_t exp(delta_t A) is exp2(A log2(e) * sum_t delta_t): one exponent per (b, d, n), never
            overflowing (delta >= 0 and A <= 0 make every factor <= 1, and so their product).
    pass 2 (_seg_carry_kernel, one program per (channel block, row)): h_in[s+1] = decay[s] h_in[s] + h_end[s],
            sequentially over the S-1 segments, written over h_end in place (slot s = the state entering s+1).
    pass 3 (_seg_scan_kernel, all S segments): re-scan the segment from its h_in and write y.

Backward, T a multiple of the backward's chunk (so every chunk lies in one segment):
    passes 1-2 as above at this T: the state entering each segment;
    _scan_bwd1_kernel with SEGMENTED (scan_kernels.py), all segments, each from its entering state;
    _seg_dh_state_kernel (segments 1..S-1): the state gradient dh backwards over the segment from zero after
            it, storing e^{a} dh at its first step and its delta sum (batch, S-1, ...), slot s for segment s+1;
    _seg_carry_kernel with DESCENDING: the gradient entering segment s from the ones after it,
            carry[s] = decay[s+1] carry[s+1] + end[s+1], in log space like the forward's (every factor <= 1);
    _scan_bwd2_kernel with SEGMENTED, all segments, each from its carried gradient.

Everything else (strides, reverse, the column-major order, pairs, z, D, delta_bias, softplus) goes through
the same helpers as the plain kernels, so a step computes exactly what it computes there.
"""

from __future__ import annotations

import triton
import triton.language as tl

from wdmctl.scan.triton.common import (_delta, _forward_range, _load_step, _memory_index, _pre_gate_grad,
                                       _program_setup, _segment_bounds, _slot_or_zero, _state_grad_step)
from wdmctl.scan.triton.scan_kernels import _CHANNEL_STRIDES


@triton.jit(do_not_specialize=["BATCH", "DIM", "L", "N", "T", "NSEG", *_CHANNEL_STRIDES])
def _seg_state_kernel(
    u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, bias_ptr, hend_ptr, dsum_ptr,
    BATCH, DIM, L, N, T, NSEG, NUM_EXTRA, GRID_W,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, PAIR: tl.constexpr, GRID_ROWS: tl.constexpr,
):
    """Pass 1: the end state (from zero) and delta sum of one segment. Reads u, delta and B only (no z, no C).
    hend (batch, NSEG - 1, N, D) and dsum (batch, NSEG - 1, D), fp32, channel-contiguous."""
    b, offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, Dv, pu, pdl, _pz, _pg, pb, _pf, _pp, _nc = _program_setup(
        u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, u_ptr, bias_ptr, u_ptr, u_ptr, u_ptr, BATCH, DIM, L, N,
        s_ub, s_ud, s_db, s_dd, s_ub, s_ud, s_ub, s_ud, HAS_D, HAS_BIAS, NP, BD, 1, PAIR)
    start, stop = _segment_bounds(tl.program_id(2), L, T)
    tn = _memory_index(tl.minimum(start, L - 1), b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
    u_n, dl_n, z_n, g_n, f_n, b_n, c_n = _load_step(pu, pdl, pu, pu, pu, pb, tn, s_ul, s_dl, s_ul, s_ul, DIM, md,
                                                    False, False, False, NP)
    h = tl.zeros([NP, BD], dtype=tl.float32)
    dsum = tl.zeros([BD], dtype=tl.float32)
    for i in range(start, stop):
        u = u_n.to(tl.float32)
        dl = dl_n.to(tl.float32)
        Bt = b_n
        tn = _memory_index(tl.minimum(i + 1, stop - 1), b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
        u_n, dl_n, z_n, g_n, f_n, b_n, c_n = _load_step(pu, pdl, pu, pu, pu, pb, tn, s_ul, s_dl, s_ul, s_ul, DIM,
                                                        md, False, False, False, NP)
        dl, _ = _delta(dl, bias, HAS_BIAS, SOFTPLUS)
        h = tl.exp2(dl[None, :] * A2) * h + (dl * u)[None, :] * Bt[:, None]
        dsum += dl
    slot = b * (NSEG - 1) + tl.program_id(2)
    tl.store(hend_ptr + slot * N * DIM + nd_off, h, mask=mnd)
    tl.store(dsum_ptr + slot * DIM + offs_d, dsum, mask=md)


@triton.jit(do_not_specialize=["BATCH", "DIM", "N", "NSEG"])
def _seg_carry_kernel(A_ptr, hend_ptr, dsum_ptr, BATCH, DIM, N, NSEG,
                      NP: tl.constexpr, BD: tl.constexpr, PAIR: tl.constexpr, DESCENDING: tl.constexpr = False):
    """Pass 2: compose the carries over segments, in place: slot s becomes the state entering segment s + 1
    (h = decay[s] h + h_end[s] over s = 0 .. NSEG - 2). DESCENDING runs the slots from the last down: the
    backward's gradient carry, where slot s holds segment s + 1's values (see _seg_dh_state_kernel) and becomes
    the carry leaving segment s + 1 towards segment s."""
    b = tl.program_id(1).to(tl.int64)
    if PAIR:
        A_ptr += (b >= BATCH).to(tl.int64) * N * DIM
    offs_d = tl.program_id(0) * BD + tl.arange(0, BD)
    md = offs_d < DIM
    offs_n = tl.arange(0, NP)
    mnd = (offs_n < N)[:, None] & md[None, :]
    nd_off = offs_n[:, None] * DIM + offs_d[None, :]
    A2 = tl.load(A_ptr + nd_off, mask=mnd, other=0.0) * 1.4426950408889634
    h = tl.zeros([NP, BD], dtype=tl.float32)
    for i in range(NSEG - 1):
        if DESCENDING:
            s = NSEG - 2 - i
        else:
            s = i
        slot = b * (NSEG - 1) + s
        dsum = tl.load(dsum_ptr + slot * DIM + offs_d, mask=md, other=0.0)
        h = tl.exp2(dsum[None, :] * A2) * h + tl.load(hend_ptr + slot * N * DIM + nd_off, mask=mnd, other=0.0)
        tl.store(hend_ptr + slot * N * DIM + nd_off, h, mask=mnd)


@triton.jit(do_not_specialize=["BATCH", "DIM", "L", "N", "T", "NSEG", *_CHANNEL_STRIDES])
def _seg_scan_kernel(
    u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, hin_ptr,
    BATCH, DIM, L, N, T, NSEG, NUM_EXTRA, GRID_W,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl,
    s_zb, s_zd, s_zl, s_yb, s_yd, s_yl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, PAIR: tl.constexpr, GRID_ROWS: tl.constexpr,
):
    """Pass 3: y over one segment, starting from the carried state h_in (zero for segment 0)."""
    b, offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, Dv, pu, pdl, pz, _pg, pb, _pf, _pp, _nc = _program_setup(
        u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, u_ptr, y_ptr, y_ptr, BATCH, DIM, L, N,
        s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ub, s_ud, HAS_D, HAS_BIAS, NP, BD, 1, PAIR)
    py = y_ptr + b * s_yb + offs_d * s_yd
    seg = tl.program_id(2)
    start, stop = _segment_bounds(seg, L, T)
    # the state entering this segment: pass 2's slot seg - 1; segment 0 starts from zero
    h = _slot_or_zero(hin_ptr, b, seg - 1, seg > 0, NSEG, N, DIM, nd_off, mnd)
    _forward_range(h, start, stop, py, s_yl, pu, pdl, pz, pb, b, BATCH, L, NUM_EXTRA, GRID_W, s_ul, s_dl, s_zl,
                   DIM, md, bias, A2, Dv, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, REVERSE, NP, PAIR, GRID_ROWS)


# ----------------------------------------------------------------------------------------------------
# The segmented backward: the state gradient's segment ends (the passes over segments are scan_kernels.py's
# backward kernels with SEGMENTED; the state entering each segment is the forward's passes 1-2)
# ----------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["BATCH", "DIM", "L", "N", "T", "NSEG", *_CHANNEL_STRIDES])
def _seg_dh_state_kernel(
    dl_ptr, A_ptr, bc_ptr, z_ptr, bias_ptr, go_ptr, dhend_ptr, dsum_ptr,
    BATCH, DIM, L, N, T, NSEG, NUM_EXTRA, GRID_W,
    s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, PAIR: tl.constexpr, GRID_ROWS: tl.constexpr,
):
    """The backward's end states, segments 1..S-1 (segment program_id(2) + 1): dh_t = g_t C_t + e^{a_{t+1}} dh_{t+1}
    backwards over the segment from a zero gradient after it. Stores e^{a_start} dh_start (the segment's
    contribution to the gradient carried into the one before) and the segment's delta sum at slot
    segment - 1 of dhend (batch, NSEG - 1, N, D) and dsum (batch, NSEG - 1, D). Reads delta, z, dy and C only.
    Whatever gradient enters the segment from after it reaches its start decayed by exp(A sum_t delta_t): the
    descending carry pass (_seg_carry_kernel) composes the two."""
    b, offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, _Dv, _pu, pdl, pz, pg, pb, _pf, _pp, _nc = _program_setup(
        dl_ptr, dl_ptr, A_ptr, bc_ptr, dl_ptr, z_ptr, bias_ptr, go_ptr, dl_ptr, dl_ptr, BATCH, DIM, L, N,
        s_db, s_dd, s_db, s_dd, s_zb, s_zd, s_gb, s_gd, False, HAS_BIAS, NP, BD, 1, PAIR)
    start, stop = _segment_bounds(tl.program_id(2) + 1, L, T)
    tn = _memory_index(stop - 1, b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
    _dl, dl_n, z_n, g_n, _f, _b, c_n = _load_step(pdl, pdl, pz, pg, pdl, pb, tn, s_dl, s_dl, s_zl, s_gl, DIM, md,
                                                 HAS_Z, True, False, NP)
    carry = tl.zeros([NP, BD], dtype=tl.float32)
    dsum = tl.zeros([BD], dtype=tl.float32)
    for j in range(stop - start):
        dl = dl_n.to(tl.float32)
        go = g_n.to(tl.float32)
        Ct = c_n
        zt = z_n.to(tl.float32)
        tn = _memory_index(tl.maximum(stop - 2 - j, start), b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR,
                           GRID_ROWS)
        _dl, dl_n, z_n, g_n, _f, _b, c_n = _load_step(pdl, pdl, pz, pg, pdl, pb, tn, s_dl, s_dl, s_zl, s_gl, DIM,
                                                     md, HAS_Z, True, False, NP)
        dl, _ = _delta(dl, bias, HAS_BIAS, SOFTPLUS)
        _dh, carry = _state_grad_step(carry, _pre_gate_grad(go, zt, HAS_Z), Ct, dl, A2)
        dsum += dl
    slot = b * (NSEG - 1) + tl.program_id(2)
    tl.store(dhend_ptr + slot * N * DIM + nd_off, carry, mask=mnd)
    tl.store(dsum_ptr + slot * DIM + offs_d, dsum, mask=md)
