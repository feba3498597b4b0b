"""The selective-scan kernels: forward, and the two backward passes (forward time, then reverse time)."""

from __future__ import annotations

import triton
import triton.language as tl

from wdmctl.scan.triton.common import (LN2, _delta, _forward_range, _load_step, _memory_index, _pre_gate_grad,
                                       _program_setup, _segment_bounds, _sigmoid, _slot_or_zero, _state_grad_step,
                                       _store_channel_sum)

# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------

# The state's register layout follows Triton's layout for the (N, BD) tiles we load (A^T, scratch). Those
# are indexed n * DIM + d with DIM unspecialised: contiguous along d but of unknown alignment, so Triton
# puts consecutive lanes on consecutive channels, one element per thread per row, and every state of a
# channel in that channel's thread. (A vectorised or n-contiguous A tile would split a channel's states
# over lanes: a shuffle per state in every sum over N.) Channel strides are kept opaque (not specialised
# to 1) for the same reason: vectorised channel loads would need a layout conversion each step. Channel
# loads stay coalesced (32 neighbouring channels per warp instruction), just not vectorised.
_CHANNEL_STRIDES = ["s_ud", "s_dd", "s_zd", "s_yd", "s_gd", "s_dzd", "s_dud", "s_ddd"]


@triton.jit(do_not_specialize=["BATCH", "DIM", "L", "N", *_CHANNEL_STRIDES])
def _scan_fwd_kernel(
    u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    BATCH, DIM, L, N, NUM_EXTRA, GRID_W,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl,
    s_zb, s_zd, s_zl, s_yb, s_yd, s_yl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, PAIR: tl.constexpr, GRID_ROWS: tl.constexpr,
):
    """y[b, d, t] for one batch row and BD channels; h is an (NP, BD) register tile. A_ptr is A^T: (N, D)
    fp32; bc_ptr holds B_t and C_t side by side, (batch, L, 2, NP) fp32 (see _pack_bc)."""
    b, offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, Dv, pu, pdl, pz, _pg, pb, _pf, _pp, _nc = _program_setup(
        u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, u_ptr, y_ptr, y_ptr, BATCH, DIM, L, N,
        s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ub, s_ud, HAS_D, HAS_BIAS, NP, BD, 1, PAIR)
    py = y_ptr + b * s_yb + offs_d * s_yd
    _forward_range(tl.zeros([NP, BD], dtype=tl.float32), 0, L, py, s_yl, pu, pdl, pz, pb, b, BATCH, L, NUM_EXTRA,
                   GRID_W, s_ul, s_dl, s_zl, DIM, md, bias, A2, Dv, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, REVERSE, NP,
                   PAIR, GRID_ROWS)


# ----------------------------------------------------------------------------------------------------
# Backward pass 1: forward time. Recompute h; write dz, f = g * sum_n A C h, dC partials, chunk states.
# ----------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["BATCH", "DIM", "L", "N", "T", "NSEG", *_CHANNEL_STRIDES])
def _scan_bwd1_kernel(
    u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, go_ptr,
    dz_ptr, f_ptr, dcp_ptr, accf_ptr, ck_ptr, ds_ptr,
    BATCH, DIM, L, N, NUM_EXTRA, GRID_W,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl,
    s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_dzb, s_dzd, s_dzl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr,
    LANE_SUM: tl.constexpr, LANE_SUM_IO: tl.constexpr, PAIR: tl.constexpr, GRID_ROWS: tl.constexpr,
    carry_ptr=None, T=None, NSEG=None, SEGMENTED: tl.constexpr = False,
):
    """Scratch layouts (all fp32, channel-contiguous): f (B, L, D); dC partials (B, D-blocks, L, N);
    accF (B, N, D) = sum_t F_t * (delta summed from the chunk start to t); ck (B, chunks, N, D) = state
    at each chunk's last step (the last chunk's unused); ds (B, chunks, D) = delta summed over each chunk.
    t indexes memory; the chunks are cut in scan order.
    SEGMENTED (the segmented backward, segmented.py): program_id(2) is a segment of T steps, T a multiple of
    CHUNK, so that its chunks are this kernel's; it starts from the state entering it (carry_ptr: (B, NSEG - 1,
    N, D), slot s for segment s + 1) and writes accF per (row, segment), (B * NSEG, N, D). The arguments
    default to the plain kernel, which compiles without them."""
    b, offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, Dv, pu, pdl, pz, pg, pb, pf, pdc, nc = _program_setup(
        u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, go_ptr, f_ptr, dcp_ptr, BATCH, DIM, L, N,
        s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_gb, s_gd, HAS_D, HAS_BIAS, NP, BD, CHUNK, PAIR)
    pdz = dz_ptr + b * s_dzb + offs_d * s_dzd

    if SEGMENTED:
        seg = tl.program_id(2)
        seg_start, seg_stop = _segment_bounds(seg, L, T)
        h = _slot_or_zero(carry_ptr, b, seg - 1, seg > 0, NSEG, N, DIM, nd_off, mnd)
        c_lo, c_hi, row = seg_start // CHUNK, tl.cdiv(seg_stop, CHUNK), b * NSEG + seg
    else:
        h = tl.zeros([NP, BD], dtype=tl.float32)
        c_lo, c_hi, row = 0, nc, b
    accf = tl.zeros([NP, BD], dtype=tl.float32)
    for c in range(c_lo, c_hi):
        start = c * CHUNK
        stop = tl.minimum(start + CHUNK, L)
        # each chunk loads its first step afresh: nothing prefetched is carried across chunks (carrying B_t
        # and C_t through both loops made Triton load them in another layout and convert every step)
        tn = _memory_index(start, b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
        u_n, dl_n, z_n, g_n, f_n, b_n, c_n = _load_step(pu, pdl, pz, pg, pu, pb, tn, s_ul, s_dl, s_zl, s_gl, DIM,
                                                        md, HAS_Z, True, False, NP)
        loc = tl.zeros([BD], dtype=tl.float32)
        for s in range(start, stop):
            t = tn
            u = u_n.to(tl.float32)
            dl = dl_n.to(tl.float32)
            go = g_n.to(tl.float32)
            Bt = b_n
            Ct = c_n
            zt = z_n.to(tl.float32)
            tn = _memory_index(tl.minimum(s + 1, L - 1), b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
            u_n, dl_n, z_n, g_n, f_n, b_n, c_n = _load_step(pu, pdl, pz, pg, pu, pb, tn, s_ul, s_dl, s_zl, s_gl,
                                                            DIM, md, HAS_Z, True, False, NP)

            dl, _ = _delta(dl, bias, HAS_BIAS, SOFTPLUS)
            h = tl.exp2(dl[None, :] * A2) * h + (dl * u)[None, :] * Bt[:, None]
            hc = h * Ct[:, None]
            y = tl.sum(hc, axis=0)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                sz = _sigmoid(zt)
                g = go * zt * sz
                tl.store(pdz + t * s_dzl, (go * y * sz * (1.0 + zt * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=md)
            else:
                g = go
            tl.store(pf + t * DIM, g * tl.sum(A2 * hc, axis=0) * LN2, mask=md)
            _store_channel_sum(h * g[None, :], dcp_ptr, b, offs_d, offs_n, mn, t, DIM, L, N, pdc, LANE_SUM, LANE_SUM_IO, NP)
            loc += dl
            accf += hc * (g * loc)[None, :]
        # the chunk's delta sum and final state
        tl.store(ds_ptr + (b * nc + c) * DIM + offs_d, loc, mask=md)
        tl.store(ck_ptr + (b * nc + c) * N * DIM + nd_off, h, mask=mnd)
    tl.store(accf_ptr + row * N * DIM + nd_off, accf, mask=mnd)

# ----------------------------------------------------------------------------------------------------
# Backward pass 2: reverse time. dh recurrence; du, ddelta, dB partials, dA, dD, d(delta_bias) per row.
# ----------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["BATCH", "DIM", "L", "N", "T", "NSEG", *_CHANNEL_STRIDES])
def _scan_bwd2_kernel(
    u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, go_ptr,
    f_ptr, accf_ptr, ck_ptr, ds_ptr,
    du_ptr, ddl_ptr, dbp_ptr, dap_ptr, ddp_ptr, dbiasp_ptr,
    BATCH, DIM, L, N, NUM_EXTRA, GRID_W,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl,
    s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr,
    LANE_SUM: tl.constexpr, LANE_SUM_IO: tl.constexpr, PAIR: tl.constexpr, GRID_ROWS: tl.constexpr,
    carry_ptr=None, T=None, NSEG=None, SEGMENTED: tl.constexpr = False,
):
    """Walks scan positions s = L-1 .. 0 (memory index t: _memory_index). `carry` holds
    e^{a_{s+1}} dh_{s+1}; S the A-weighted decay gradient sum_n A G_s, telescoped inside a chunk and
    reset exactly from the stored state at each chunk start; `loc` is delta summed from the chunk start
    to s. SEGMENTED: one segment (see _scan_bwd1_kernel), from the gradient carried into it from the segments
    after it (carry_ptr, slot s = e^{a} dh at segment s + 1's first step; zero after the last segment); dA, dD
    and d(delta_bias) partials per (row, segment)."""
    b, offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, Dv, pu, pdl, pz, pg, pb, pf, pdb, nc = _program_setup(
        u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, go_ptr, f_ptr, dbp_ptr, BATCH, DIM, L, N,
        s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_gb, s_gd, HAS_D, HAS_BIAS, NP, BD, CHUNK, PAIR)
    pdu = du_ptr + b * s_dub + offs_d * s_dud
    pddl = ddl_ptr + b * s_ddb + offs_d * s_ddd

    if SEGMENTED:
        seg = tl.program_id(2)
        seg_start, seg_stop = _segment_bounds(seg, L, T)
        c_lo, c_hi, row = seg_start // CHUNK, tl.cdiv(seg_stop, CHUNK), b * NSEG + seg
        carry = _slot_or_zero(carry_ptr, b, seg, seg < NSEG - 1, NSEG, N, DIM, nd_off, mnd)
        # S restarts from G at the next segment's first step, carry * (the state at this segment's last step,
        # pass 1's of chunk c_hi - 1), as below after every chunk; the dA term G closes (G times this segment's
        # last chunk's delta sum) is the next segment's program's to add
        hlast = tl.load(ck_ptr + (b * nc + c_hi - 1) * N * DIM + nd_off, mask=mnd, other=0.0)
        S = tl.sum(A2 * (carry * hlast), axis=0) * LN2
    else:
        c_lo, c_hi, row = 0, nc, b
        carry = tl.zeros([NP, BD], dtype=tl.float32)
        S = tl.zeros([BD], dtype=tl.float32)
    acc = tl.load(accf_ptr + row * N * DIM + nd_off, mask=mnd, other=0.0)
    dd_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)
    for ci in range(c_hi - c_lo):
        c = c_hi - 1 - ci
        start = c * CHUNK
        stop = tl.minimum(start + CHUNK, L)
        loc = tl.load(ds_ptr + (b * nc + c) * DIM + offs_d, mask=md, other=0.0)
        # each chunk loads its last step afresh (see _scan_bwd1_kernel)
        tn = _memory_index(stop - 1, b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
        u_n, dl_n, z_n, g_n, f_n, b_n, c_n = _load_step(pu, pdl, pz, pg, pf, pb, tn, s_ul, s_dl, s_zl, s_gl, DIM,
                                                        md, HAS_Z, True, True, NP)
        for j in range(stop - start):
            s = stop - 1 - j
            t = tn
            u = u_n.to(tl.float32)
            raw = dl_n.to(tl.float32)
            go = g_n.to(tl.float32)
            f = f_n
            Bt = b_n
            Ct = c_n
            zt = z_n.to(tl.float32)
            tn = _memory_index(tl.maximum(s - 1, 0), b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
            u_n, dl_n, z_n, g_n, f_n, b_n, c_n = _load_step(pu, pdl, pz, pg, pf, pb, tn, s_ul, s_dl, s_zl, s_gl,
                                                            DIM, md, HAS_Z, True, True, NP)

            dl, slope = _delta(raw, bias, HAS_BIAS, SOFTPLUS)
            g = _pre_gate_grad(go, zt, HAS_Z)
            dh, carry = _state_grad_step(carry, g, Ct, dl, A2)
            dhb = dh * Bt[:, None]
            sdhb = tl.sum(dhb, axis=0)
            dtu = dl * u
            S += f - dtu * tl.sum(A2 * dhb, axis=0) * LN2
            ddt = S + u * sdhb
            acc -= dhb * (dtu * loc)[None, :]
            loc -= dl
            _store_channel_sum(dh * dtu[None, :], dbp_ptr, b, offs_d, offs_n, mn, t, DIM, L, N, pdb, LANE_SUM, LANE_SUM_IO, NP)
            du = dl * sdhb
            if HAS_D:
                du += Dv * g
                dd_acc += g * u
            ddt = ddt * slope
            dbias_acc += ddt
            tl.store(pdu + t * s_dul, du.to(du_ptr.dtype.element_ty), mask=md)
            tl.store(pddl + t * s_ddl, ddt.to(ddl_ptr.dtype.element_ty), mask=md)
        # chunk c is done and carry = e^{a_s} dh_s at its first step s: G_s = carry * h_{s-1} exactly, which
        # closes chunk c-1's dA sum (G_s times that chunk's delta sum) and restarts S. For c = 0 there is no
        # earlier chunk: read slot 0 and weigh it by 0.
        cp = tl.maximum(c - 1, 0)
        hprev = tl.load(ck_ptr + (b * nc + cp) * N * DIM + nd_off, mask=mnd, other=0.0)
        dsp = tl.load(ds_ptr + (b * nc + cp) * DIM + offs_d, mask=md, other=0.0) * (c > 0).to(tl.float32)
        G = carry * hprev
        acc += G * dsp[None, :]
        S = tl.sum(A2 * G, axis=0) * LN2
    tl.store(dap_ptr + row * N * DIM + nd_off, acc, mask=mnd)
    tl.store(ddp_ptr + row * DIM + offs_d, dd_acc, mask=md)
    tl.store(dbiasp_ptr + row * DIM + offs_d, dbias_acc, mask=md)
