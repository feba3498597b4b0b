"""Our Triton selective scan (forward and backward) and causal conv1d, behind the scan interface.

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
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources, PTXASError

from wdmctl.scan import BACKENDS, ScanBackend, check_column_grid, register_backend

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
CHUNK = 64  # steps between stored states in the backward pass (accuracy vs 1/CHUNK extra memory)

# Without a GPU, Triton kernels can only run through its interpreter (CI's parity tests do that on CPU).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------
# Elementwise helpers (per channel, not per state). With one channel per thread they are not amortised
# over anything, so they use the hardware approximations (ex2/lg2/rcp, ~2 ulp) instead of the accurate
# library log and IEEE division, which cost ~60 instructions per step (measured in the SASS).
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return tl.fdiv(1.0, 1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def _softplus_and_slope(x):
    """(softplus(x), its derivative sigmoid(x)): log1p(exp(x)) for x <= 20, x above (torch's and mamba-ssm's
    threshold). log1p via Kahan's log(w) * e / (w - 1), w = 1 + e: exact where plain log(1 + e) loses the
    digits of a small delta (softplus of -7 is 1e-3)."""
    e = tl.exp2(tl.minimum(x, 20.0) * LOG2E)
    w = 1.0 + e
    wm1 = w - 1.0
    lp = tl.where(wm1 == 0.0, e, tl.log2(w) * LN2 * tl.fdiv(e, tl.where(wm1 == 0.0, 1.0, wm1)))
    small = x <= 20.0
    return tl.where(small, lp, x), tl.where(small, tl.fdiv(e, w), 1.0)


@triton.jit
def _channel_block(A_ptr, D_ptr, bias_ptr, DIM, N, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                   NP: tl.constexpr, BD: tl.constexpr):
    """This program's channels and states: offsets, masks, the (NP, BD) offsets of (N, D) tensors, and
    A * log2(e), D and delta_bias for them (zeros where absent). Padded states get A = 0 (and B = C = 0 from
    _pack_bc): their h stays exactly 0."""
    offs_d = tl.program_id(0) * BD + tl.arange(0, BD)
    md = offs_d < DIM
    offs_n = tl.arange(0, NP)
    mn = offs_n < N
    mnd = mn[:, None] & md[None, :]
    nd_off = offs_n[:, None] * DIM + offs_d[None, :]  # (N, D) fp32 scratch and A^T, channel-contiguous
    A2 = tl.load(A_ptr + nd_off, mask=mnd, other=0.0) * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros([BD], dtype=tl.float32)
    return offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, Dv


@triton.jit
def _load_step(pu, pdl, pz, pg, pf, pb, t, s_ul, s_dl, s_zl, s_gl, DIM, md,
               HAS_Z: tl.constexpr, HAS_G: tl.constexpr, HAS_F: tl.constexpr, NP: tl.constexpr):
    """One step's inputs at memory index t: u, delta, z, dy, f per channel (the ones a kernel lacks come back
    as u, unused), and B_t, C_t (NP each, from the packed buffer). Kernels load the next step's while they
    compute this one's."""
    u = tl.load(pu + t * s_ul, mask=md, other=0.0)
    dl = tl.load(pdl + t * s_dl, mask=md, other=0.0)
    g = u
    f = u
    z = u
    if HAS_G:
        g = tl.load(pg + t * s_gl, mask=md, other=0.0)
    if HAS_F:
        f = tl.load(pf + t * DIM, mask=md, other=0.0)
    Bt = tl.load(pb + t * 2 * NP)
    Ct = tl.load(pb + NP + t * 2 * NP)
    if HAS_Z:
        z = tl.load(pz + t * s_zl, mask=md, other=0.0)
    return u, dl, z, g, f, Bt, Ct


@triton.jit
def _column_major(p, NUM_EXTRA, GRID_W, GRID_ROWS: tl.constexpr):
    """Memory index of position p of a token order: p itself (GRID_ROWS = 0), or, for [NUM_EXTRA extra tokens,
    a GRID_ROWS x GRID_W patch grid stored row by row] scanned column by column, the memory index of the
    p-th token of that column-major order. GRID_ROWS is a compile-time constant, so the division is a
    multiply and a shift: the order costs a few integer instructions per step instead of two copies."""
    if GRID_ROWS > 0:
        j = tl.maximum(p - NUM_EXTRA, 0)
        col = j // GRID_ROWS
        p = tl.where(p < NUM_EXTRA, p, NUM_EXTRA + (j - col * GRID_ROWS) * GRID_W + col)
    return p


@triton.jit
def _memory_index(s, b, BATCH, L, NUM_EXTRA, GRID_W,
                  REVERSE: tl.constexpr, PAIR: tl.constexpr, GRID_ROWS: tl.constexpr):
    """Memory index of scan step s of batch row b: s counted from the end when the row scans in reverse
    (REVERSE; with PAIR, rows BATCH.. are the other direction of a bidirectional pair), then mapped through
    the token order (_column_major). Callers clamp s to [0, L): the last prefetch re-reads a valid element."""
    if PAIR:
        if REVERSE:
            rev = b < BATCH
        else:
            rev = b >= BATCH
        p = tl.where(rev, L - 1 - s, s)
    elif REVERSE:
        p = L - 1 - s
    else:
        p = s
    return _column_major(p, NUM_EXTRA, GRID_W, GRID_ROWS)


@triton.jit
def _delta(raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta, d delta / d raw) from the raw input: + delta_bias, then softplus."""
    if HAS_BIAS:
        raw = raw + bias
    if SOFTPLUS:
        return _softplus_and_slope(raw)
    else:
        return raw, tl.full(raw.shape, 1.0, tl.float32)


@triton.jit
def _program_setup(u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, go_ptr, f_ptr, part_ptr, BATCH, DIM, L, N,
               s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_gb, s_gd,
               HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr,
               PAIR: tl.constexpr):
    """What every scan kernel starts from: the batch row, this program's channel block (_channel_block),
    pointers to row b of u, delta, z, dy, B/C (packed), f, this block's dB or dC partials, and the chunk
    count (the forward passes placeholders for what it lacks; unused values compile away). With PAIR the
    2 * BATCH rows are two directions stacked: rows BATCH.. take the second set of A, D and delta_bias and
    read z's row b - BATCH (both directions gate with the same z)."""
    b = tl.program_id(1).to(tl.int64)
    zrow = b
    if PAIR:
        second = (b >= BATCH).to(tl.int64)
        zrow = b - second * BATCH
        A_ptr += second * N * DIM
        D_ptr += second * DIM
        bias_ptr += second * DIM
    offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, Dv = _channel_block(
        A_ptr, D_ptr, bias_ptr, DIM, N, HAS_D, HAS_BIAS, NP, BD)
    pu = u_ptr + b * s_ub + offs_d * s_ud
    pdl = dl_ptr + b * s_db + offs_d * s_dd
    pz = z_ptr + zrow * s_zb + offs_d * s_zd
    pg = go_ptr + b * s_gb + offs_d * s_gd
    pb = bc_ptr + b * L * 2 * NP + tl.arange(0, NP)
    pf = f_ptr + b * L * DIM + offs_d
    ppart = part_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * L * N + offs_n
    return b, offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, Dv, pu, pdl, pz, pg, pb, pf, ppart, tl.cdiv(L, CHUNK)


@triton.jit
def _first(a, b):
    return a


@triton.jit
def _store_channel_sum(x, part_ptr, b, offs_d, offs_n, mn, t, DIM, L, N, pblock,
                       LANE_SUM: tl.constexpr, LANE_SUM_IO: tl.constexpr, NP: tl.constexpr):
    """Store sum_d x[:, d] over this program's channels (x an (NP, BD) tile) as row t of a partial-sum
    buffer. With LANE_SUM (a PTX reduce-scatter from lane_sum_asm; only when every warp holds 32 whole
    channels) each warp sums its 32 channels and its lanes store the N results themselves: partial rows are
    per 32 channels, (batch, cdiv(DIM, 32), L, N). Otherwise tl.sum (a full butterfly per state plus a
    shared-memory round trip to store) into per-program rows, (batch, programs, L, N), at pblock."""
    if LANE_SUM != "":
        total = tl.inline_asm_elementwise(LANE_SUM, LANE_SUM_IO, [x], dtype=tl.float32, is_pure=True, pack=NP)
        lane = offs_d % 32
        # lane >> shift is the state whose total a lane ends up with (shift = 5 - log2 NP)
        shift: tl.constexpr = (NP < 2) + (NP < 4) + (NP < 8) + (NP < 16) + (NP < 32)
        n_of_lane = lane >> shift
        row = part_ptr + ((b * tl.cdiv(DIM, 32) + offs_d // 32) * L + t) * N + n_of_lane
        # the lanes that hold a state's total, in 32-channel groups that exist: a program's channels past DIM
        # can form whole groups beyond the buffer's last row (d = 70 in blocks of 64: group 3 of 0..2)
        keep = ((lane & ((1 << shift) - 1)) == 0) & (n_of_lane < N) & ((offs_d // 32) * 32 < DIM)
        # every state slot holds the same total: take the first (an in-thread "reduction" that compiles to
        # nothing; a masked store of the whole tile made Triton 3.6 stage it through shared memory)
        tl.store(row, tl.reduce(total, 0, _first), mask=keep)
    else:
        tl.store(pblock + t * N, tl.sum(x, axis=1), mask=mn)


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

    tn = _memory_index(0, b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
    # prefetched inputs of the next step (loop-carried so their loads overlap this step's math)
    u_n, dl_n, z_n, g_n, f_n, b_n, c_n = _load_step(pu, pdl, pz, pu, pu, pb, tn, s_ul, s_dl, s_zl, s_ul, DIM, md,
                                                    HAS_Z, False, False, NP)
    h = tl.zeros([NP, BD], dtype=tl.float32)
    for i in range(L):
        t = tn
        u = u_n.to(tl.float32)
        dl = dl_n.to(tl.float32)
        Bt = b_n
        Ct = c_n
        zt = z_n.to(tl.float32)
        tn = _memory_index(tl.minimum(i + 1, L - 1), b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
        u_n, dl_n, z_n, g_n, f_n, b_n, c_n = _load_step(pu, pdl, pz, pu, pu, pb, tn, s_ul, s_dl, s_zl, s_ul, DIM, md,
                                                        HAS_Z, False, False, NP)

        dl, _ = _delta(dl, bias, HAS_BIAS, SOFTPLUS)
        h = tl.exp2(dl[None, :] * A2) * h + (dl * u)[None, :] * Bt[:, None]
        y = tl.sum(h * Ct[:, None], axis=0)
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            y = y * zt * _sigmoid(zt)
        tl.store(py + t * s_yl, y.to(y_ptr.dtype.element_ty), mask=md)

# ----------------------------------------------------------------------------------------------------
# Backward pass 1: forward time. Recompute h; write dz, f = g * sum_n A C h, dC partials, chunk states.
# ----------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["BATCH", "DIM", "L", "N", *_CHANNEL_STRIDES])
def _scan_bwd1_kernel(
    u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, go_ptr,
    dz_ptr, f_ptr, dcp_ptr, accf_ptr, ck_ptr, ds_ptr,
    BATCH, DIM, L, N, NUM_EXTRA, GRID_W,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl,
    s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_dzb, s_dzd, s_dzl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr,
    LANE_SUM: tl.constexpr, LANE_SUM_IO: tl.constexpr, PAIR: tl.constexpr, GRID_ROWS: tl.constexpr,
):
    """Scratch layouts (all fp32, channel-contiguous): f (B, L, D); dC partials (B, D-blocks, L, N);
    accF (B, N, D) = sum_t F_t * (delta summed from the chunk start to t); ck (B, chunks, N, D) = state
    at each chunk's last step (the last chunk's unused); ds (B, chunks, D) = delta summed over each chunk.
    t indexes memory; the chunks are cut in scan order."""
    b, offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, Dv, pu, pdl, pz, pg, pb, pf, pdc, nc = _program_setup(
        u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, go_ptr, f_ptr, dcp_ptr, BATCH, DIM, L, N,
        s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_gb, s_gd, HAS_D, HAS_BIAS, NP, BD, CHUNK, PAIR)
    pdz = dz_ptr + b * s_dzb + offs_d * s_dzd

    h = tl.zeros([NP, BD], dtype=tl.float32)
    accf = tl.zeros([NP, BD], dtype=tl.float32)
    for c in range(nc):
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
    tl.store(accf_ptr + b * N * DIM + nd_off, accf, mask=mnd)

# ----------------------------------------------------------------------------------------------------
# Backward pass 2: reverse time. dh recurrence; du, ddelta, dB partials, dA, dD, d(delta_bias) per row.
# ----------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["BATCH", "DIM", "L", "N", *_CHANNEL_STRIDES])
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
):
    """Walks scan positions s = L-1 .. 0 (memory index t: _memory_index). `carry` holds
    e^{a_{s+1}} dh_{s+1}; S the A-weighted decay gradient sum_n A G_s, telescoped inside a chunk and
    reset exactly from the stored state at each chunk start; `loc` is delta summed from the chunk start
    to s."""
    b, offs_d, md, offs_n, mn, mnd, nd_off, A2, bias, Dv, pu, pdl, pz, pg, pb, pf, pdb, nc = _program_setup(
        u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, go_ptr, f_ptr, dbp_ptr, BATCH, DIM, L, N,
        s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_gb, s_gd, HAS_D, HAS_BIAS, NP, BD, CHUNK, PAIR)
    pdu = du_ptr + b * s_dub + offs_d * s_dud
    pddl = ddl_ptr + b * s_ddb + offs_d * s_ddd

    acc = tl.load(accf_ptr + b * N * DIM + nd_off, mask=mnd, other=0.0)
    carry = tl.zeros([NP, BD], dtype=tl.float32)
    S = tl.zeros([BD], dtype=tl.float32)
    dd_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)
    for ci in range(nc):
        c = nc - 1 - ci
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
            if HAS_Z:
                g = go * zt * _sigmoid(zt)
            else:
                g = go
            dh = carry + g[None, :] * Ct[:, None]
            carry = tl.exp2(dl[None, :] * A2) * dh
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
    tl.store(dap_ptr + b * N * DIM + nd_off, acc, mask=mnd)
    tl.store(ddp_ptr + b * DIM + offs_d, dd_acc, mask=md)
    tl.store(dbiasp_ptr + b * DIM + offs_d, dbias_acc, mask=md)


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


# ----------------------------------------------------------------------------------------------------
# Launch configurations: (BD, num_warps[, maxnreg]). BD >= 32 * num_warps keeps all N states of a channel in
# one thread (see the module docstring); BD = 64 * num_warps gives each thread two channels. maxnreg caps
# the registers per thread (ptxas' .maxnreg) to fit more warps on an SM.
# ----------------------------------------------------------------------------------------------------

FWD_CONFIGS = ((32, 1), (16, 1), (64, 2), (64, 1), (128, 2))
# The backward kernels hold ~3 state tiles plus B_t, C_t of this step and the next: two channels per thread
# spill, so one at most. BD = 16 on one warp makes Triton split each channel's states over 2 lanes: half
# the registers, twice the warps, a shuffle per sum over N. Tried and dropped (never chosen by the tuner
# on the H100, docs/triton-scan.md): BD 8, 2-warp blocks, B_t/C_t loaded at use instead of a step ahead,
# and the sums over channels for dB/dC on the tensor cores instead of warp shuffles.
# The backward passes are latency-bound (a step's dependency chain, 8-10 resident warps per SM at 193 / 238
# registers): the capped configs trade a few instructions (168: no spills, +13 per step in the SASS; 128:
# spills outside the time loop) for 12 and 16 warps per SM.
BWD_CONFIGS = ((32, 1), (16, 1), (32, 1, 168), (32, 1, 128))
DEFAULT_SCAN_CONFIG = (64, 2)
DEFAULT_BWD_CONFIG = (64, 2)
TUNE_MIN_CHANNELS = 8192  # batch * d below this: small problems (tests) skip tuning and its compiles
_TUNED: dict[tuple, tuple] = {}


def _choose(kind: str, key: tuple, channels: int, launch, configs, default):
    """Pick a config (BD, num_warps, or a conv tile) for one kernel and problem: the env override
    WDM_TRITON_SCAN_CONFIG="BD,warps[,maxnreg]" (scan kernels, for profiling), the default for small problems and the
    interpreter, else the fastest config measured once on the real arguments (every config writes only its
    own outputs, so trial runs are harmless)."""
    override = os.environ.get("WDM_TRITON_SCAN_CONFIG")
    if override and not kind.startswith("conv"):
        return tuple(int(v) for v in override.split(","))
    if INTERPRET or channels < TUNE_MIN_CHANNELS:
        return default
    full_key = (kind, *key)
    if full_key not in _TUNED:
        timings = {}
        for cfg in configs:
            try:
                timings[cfg] = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
            except (OutOfResources, PTXASError):  # a config that does not fit is skipped
                continue
        _TUNED[full_key] = min(timings, key=timings.get)
    return _TUNED[full_key]


def tuned_configs() -> dict[str, tuple]:
    """The configs chosen so far, for benchmark reports: {"kind key...": (BD, num_warps)}."""
    return {" ".join(str(k) for k in key): cfg for key, cfg in _TUNED.items()}


def _launch_options(cfg: tuple) -> dict[str, int]:
    """num_warps (and maxnreg where the config caps registers) of a scan config (BD, num_warps[, maxnreg])."""
    options = {"num_warps": cfg[1]}
    if len(cfg) > 2 and cfg[2]:
        options["maxnreg"] = cfg[2]
    return options


def lane_sum_asm(np_: int) -> tuple[str, str]:
    """PTX (and its operand constraints) that sums an (NP, 32 lanes) tile over the warp's lanes by
    reduce-scatter: at each level every lane keeps half of its values and swaps the other half with the lane
    whose bit `mask` differs (16, 8, ... : NP/2 + NP/4 + ... + 1 shuffles), then plain butterflies over the
    remaining lane bits. Lane l ends with the total of state l >> (5 - log2 NP), returned in every output.
    A full butterfly per state (what tl.sum does) takes 5 NP shuffles and adds: 80 of each at NP = 16, against
    16 here. Operands: $0 .. $(NP-1) out, $NP .. $(2 NP - 1) in (inline_asm_elementwise with pack = NP)."""
    if np_ < 1 or np_ > 32 or np_ & (np_ - 1):
        raise ValueError(f"lane_sum_asm needs a power of two up to 32 states, not {np_}")
    lines = ["{", ".reg .pred %p;", ".reg .b32 %lane, %bit;", "mov.u32 %lane, %laneid;"]
    values, mask, level = [f"${np_ + k}" for k in range(np_)], 16, 0
    while len(values) > 1:  # reduce-scatter: lanes with bit `mask` set keep the upper half
        half = len(values) // 2
        lines.append(f"and.b32 %bit, %lane, {mask};")
        lines.append("setp.ne.u32 %p, %bit, 0;")
        kept = []
        for k in range(half):
            keep, send, recv, total = (f"%k{level}_{k}", f"%s{level}_{k}", f"%r{level}_{k}", f"%a{level}_{k}")
            lines.append(f".reg .f32 {keep}, {send}, {recv}, {total};")
            lines.append(f"selp.f32 {keep}, {values[k + half]}, {values[k]}, %p;")
            lines.append(f"selp.f32 {send}, {values[k]}, {values[k + half]}, %p;")
            lines.append(f"shfl.sync.bfly.b32 {recv}, {send}, {mask}, 0x1f, 0xffffffff;")
            lines.append(f"add.f32 {total}, {keep}, {recv};")
            kept.append(total)
        values, mask, level = kept, mask // 2, level + 1
    value = values[0]
    while mask >= 1:  # the lanes that hold the same state: plain butterfly
        recv, total = f"%r{level}", f"%a{level}"
        lines.append(f".reg .f32 {recv}, {total};")
        lines.append(f"shfl.sync.bfly.b32 {recv}, {value}, {mask}, 0x1f, 0xffffffff;")
        lines.append(f"add.f32 {total}, {value}, {recv};")
        value, mask, level = total, mask // 2, level + 1
    lines += [f"mov.b32 ${k}, {value};" for k in range(np_)] + ["}"]
    return "\n".join(lines), ",".join(["=f"] * np_ + ["f"] * np_)


def _lane_sum_flags(cfg: tuple[int, int], np_: int) -> dict[str, str]:
    """The kernels' LANE_SUM constexprs for a (BD, num_warps) config: the PTX channel sum where every warp
    holds 32 whole channels and all states of each (BD = 32 * num_warps, N <= 32, compiled), else "" (tl.sum).
    The interpreter cannot run PTX."""
    bd, warps = cfg[:2]
    if INTERPRET or bd != 32 * warps or np_ > 32:
        return dict(LANE_SUM="", LANE_SUM_IO="")
    asm, io = lane_sum_asm(np_)
    return dict(LANE_SUM=asm, LANE_SUM_IO=io)


def _partial_rows(cfg: tuple[int, int], d: int, lane_sum: dict[str, str]) -> int:
    """Partial-sum rows per batch row for dB / dC: one per 32 channels with the PTX channel sum, else one
    per program."""
    return triton.cdiv(d, 32) if lane_sum["LANE_SUM"] else triton.cdiv(d, cfg[0])


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


def _scan_backward(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid=(), packed=None):
    """All gradients: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None where the input was None.
    A pair's rows write their own dz rows, added per direction here (as autograd adds two branches')."""
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
    dz = _empty_like_layout(z, batch=batch) if z is not None else None
    dzz = dz if dz is not None else dy  # never written when HAS_Z is off
    per_direction_rows = batch // 2 if pair else batch
    f = torch.empty(batch, length, d, device=dev, dtype=f32)
    accf = torch.empty(batch, n, d, device=dev, dtype=f32)
    ck = torch.empty(batch, nc, n, d, device=dev, dtype=f32)
    ds = torch.empty(batch, nc, d, device=dev, dtype=f32)
    common = (*_bdl(u), *_bdl(delta), *_bdl(zz), *_bdl(dy))
    out = {}

    def launch1(cfg):
        bd = cfg[0]
        lane_sum = _lane_sum_flags(cfg, flags["NP"])
        out["dcp"] = torch.empty(batch, _partial_rows(cfg, d, lane_sum), length, n, device=dev, dtype=f32)
        _scan_bwd1_kernel[(triton.cdiv(d, bd), batch)](
            u, delta, At, bc, D, zz, delta_bias, dy, dzz, f, out["dcp"], accf, ck, ds,
            per_direction_rows, d, length, n, *order.values(), *common, *_bdl(dzz), **flags, **lane_sum, BD=bd, CHUNK=chunk,
            **_launch_options(cfg))
        out["dC"] = out["dcp"].sum(1)  # part of what a config costs (smaller BD, more partials): timed too

    launch1(_choose("bwd1", key, batch * d, launch1, BWD_CONFIGS, DEFAULT_BWD_CONFIG))

    du = _empty_like_layout(u)
    ddelta = _empty_like_layout(delta)
    dap = torch.empty(batch, n, d, device=dev, dtype=f32)
    ddp = torch.empty(batch, d, device=dev, dtype=f32)
    dbiasp = torch.empty(batch, d, device=dev, dtype=f32)

    def launch2(cfg):
        bd = cfg[0]
        lane_sum = _lane_sum_flags(cfg, flags["NP"])
        out["dbp"] = torch.empty(batch, _partial_rows(cfg, d, lane_sum), length, n, device=dev, dtype=f32)
        _scan_bwd2_kernel[(triton.cdiv(d, bd), batch)](
            u, delta, At, bc, D, zz, delta_bias, dy, f, accf, ck, ds,
            du, ddelta, out["dbp"], dap, ddp, dbiasp,
            per_direction_rows, d, length, n, *order.values(), *common, *_bdl(du), *_bdl(ddelta),
            **flags, **lane_sum, BD=bd, CHUNK=chunk, **_launch_options(cfg))
        out["dB"] = out["dbp"].sum(1)

    launch2(_choose("bwd2", key, batch * d, launch2, BWD_CONFIGS, DEFAULT_BWD_CONFIG))

    # partial sums over channel blocks / batch rows: deterministic, unlike atomics
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


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          reverse=False, column_grid=None, **_):
    """The selective scan (wdmctl.scan's semantics) with our Triton kernels; differentiable. The column-major
    token order is read in place (no permuted copies). A of shape (2, d, N) makes it wdmctl.scan's
    selective_scan_pair: both directions in one launch per kernel, stacked on the batch axis so the kernels
    see twice the programs, each picking its direction's parameters; z is shared and its two gradients are
    added in the backward."""
    if u.numel() == 0:
        return torch.empty_like(u)
    A = A.float()
    D = D.float() if D is not None else None
    delta_bias = delta_bias.float() if delta_bias is not None else None
    grid = [int(v) for v in column_grid] if column_grid else []
    scan = _scan_op if torch.compiler.is_compiling() else _SelectiveScanFn.apply
    return scan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), grid)



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


def causal_conv1d_triton(x, weight, bias=None, activation=None, reverse=False, column_grid=None):
    """Depthwise causal conv1d (wdmctl.scan's semantics) with our Triton kernels: x (batch, d, L) with
    any strides, weight (d, width <= 4), optional SiLU, `reverse` anti-causal and the column-major order
    read in place, without permuted copies. Computes in fp32, returns x's dtype (like causal-conv1d).
    A weight of shape (2, d, width) convolves both directions of a pair in one launch (2 * batch rows)."""
    if weight.shape[-1] > 4:  # widths over 4: no unrolled kernel
        from wdmctl.scan import generic_causal_conv1d

        return generic_causal_conv1d("torch", x, weight, bias, activation, reverse, column_grid)
    if x.numel() == 0:
        return x.new_empty(2 * x.shape[0] if weight.dim() == 3 else x.shape[0], *x.shape[1:])
    grid = [int(v) for v in column_grid] if column_grid else []
    conv = _conv_op if torch.compiler.is_compiling() else _CausalConv1dFn.apply
    return conv(x, weight, bias, activation in ("silu", "swish"), bool(reverse), grid)


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
    from wdmctl.scan.mamba_ssm_scan import _has, causal_conv1d_mamba

    if _has("causal_conv1d") and not reverse and not column_grid and weight.dim() == 2:
        return causal_conv1d_mamba(x, weight, bias, activation, reverse)
    return causal_conv1d_triton(x, weight, bias, activation, reverse, column_grid)


def is_available() -> bool:
    return torch.cuda.is_available() and not INTERPRET


register_backend(ScanBackend(
    name="triton",
    selective_scan=selective_scan_triton,
    causal_conv1d=causal_conv1d_backend,
    is_available=is_available,
    install_hint="pip install triton (Linux with an NVIDIA GPU; it comes with PyTorch's CUDA wheels)",
    devices=("cuda",),
    reads_column_order=True,
    selective_scan_pair=selective_scan_triton,   # A of shape (2, d, N) selects the pair kernels
    causal_conv1d_pair=causal_conv1d_backend,
    priority=20,  # above mamba_ssm's 10: 2.1-3.5x faster forward+backward on the H100 (docs/triton-scan.md)
))

# The same kernels without the two token-order fusions: the column-major order goes through transposed
# copies and a bidirectional block makes one call per direction. Kept so that `bench train --backends
# triton,triton-unfused` measures what the fusions win (docs/triton-scan.md); `auto` never picks it.
register_backend(dataclasses.replace(BACKENDS["triton"], name="triton-unfused", reads_column_order=False,
                                     selective_scan_pair=None, causal_conv1d_pair=None, priority=15))
