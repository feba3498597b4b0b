"""Shared pieces of the Triton backend: the constants, the elementwise and index helpers every kernel inlines,
and how a program finds its channels and tokens."""

from __future__ import annotations

import os

import triton
import triton.language as tl


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
CHUNK = 64  # steps between stored states in the backward pass (accuracy vs 1/CHUNK extra memory)

# Without a GPU, Triton kernels can only run through its interpreter (CI's parity tests do that on CPU).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------
# Elementwise helpers (per channel, not per state). With one channel per thread they are not amortised
# over anything, so they use the hardware approximations (ex2/rcp, ~2 ulp) instead of IEEE division and the
# natural-log library call, which cost ~60 instructions per step (measured in the SASS). tl.log2 stays the accurate one (a
# ~15-FFMA polynomial, not MUFU.LG2: `wdmctl bench sass`): Kahan's log1p below needs it exact near 1.
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
def _forward_step(h, dl, u, Bt, Ct, zt, A2, Dv, HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    """One token of the forward recurrence (delta already through bias/softplus): the new state h (N, BD) and
    the output y = <C, h> (+ D u) (* silu(z)), for _forward_range."""
    h = tl.exp2(dl[None, :] * A2) * h + (dl * u)[None, :] * Bt[:, None]
    y = tl.sum(h * Ct[:, None], axis=0)
    if HAS_D:
        y += Dv * u
    if HAS_Z:
        y = y * zt * _sigmoid(zt)
    return h, y


@triton.jit
def _forward_range(h, start, stop, py, s_yl, pu, pdl, pz, pb, b, BATCH, L, NUM_EXTRA, GRID_W, s_ul, s_dl, s_zl,
                   DIM, md, bias, A2, Dv, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, NP: tl.constexpr, PAIR: tl.constexpr,
                   GRID_ROWS: tl.constexpr):
    """Scan steps start .. stop - 1 from the state h, storing each output y at py + t * s_yl in py's dtype; the
    next step's inputs are prefetched (loop-carried, so their loads overlap this step's math). The plain
    forward runs 0 .. L from zero; the segmented forward's pass 3 runs one segment from its carried state."""
    tn = _memory_index(tl.minimum(start, L - 1), b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
    u_n, dl_n, z_n, g_n, f_n, b_n, c_n = _load_step(pu, pdl, pz, pu, pu, pb, tn, s_ul, s_dl, s_zl, s_ul, DIM, md,
                                                    HAS_Z, False, False, NP)
    for i in range(start, stop):
        t = tn
        u = u_n.to(tl.float32)
        dl = dl_n.to(tl.float32)
        Bt = b_n
        Ct = c_n
        zt = z_n.to(tl.float32)
        tn = _memory_index(tl.minimum(i + 1, stop - 1), b, BATCH, L, NUM_EXTRA, GRID_W, REVERSE, PAIR, GRID_ROWS)
        u_n, dl_n, z_n, g_n, f_n, b_n, c_n = _load_step(pu, pdl, pz, pu, pu, pb, tn, s_ul, s_dl, s_zl, s_ul, DIM,
                                                        md, HAS_Z, False, False, NP)
        dl, _ = _delta(dl, bias, HAS_BIAS, SOFTPLUS)
        h, y = _forward_step(h, dl, u, Bt, Ct, zt, A2, Dv, HAS_D, HAS_Z)
        tl.store(py + t * s_yl, y.to(py.dtype.element_ty), mask=md)


@triton.jit
def _pre_gate_grad(go, zt, HAS_Z: tl.constexpr):
    """g_t, the gradient of the output before the SiLU(z) gate: dy * silu(z), or dy without z."""
    if HAS_Z:
        return go * zt * _sigmoid(zt)
    else:
        return go


@triton.jit
def _state_grad_step(carry, g, Ct, dl, A2):
    """One reverse step of dh_t = g_t C_t + e^{a_{t+1}} dh_{t+1}, from carry = e^{a_{t+1}} dh_{t+1}: returns dh_t
    and the carry to the step before, e^{a_t} dh_t (delta already through bias/softplus)."""
    dh = carry + g[None, :] * Ct[:, None]
    return dh, tl.exp2(dl[None, :] * A2) * dh


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
def _segment_bounds(seg, L, T):
    """[start, stop) of segment seg in scan steps; empty past the end."""
    start = tl.minimum(seg * T, L)
    return start, tl.minimum(start + T, L)


@triton.jit
def _slot_or_zero(ptr, b, slot, valid, NSEG, N, DIM, nd_off, mnd):
    """Slot `slot` of row b of a (batch, NSEG - 1, N, DIM) carry buffer, or zeros where not `valid` (the first
    segment has no state entering it, the last no gradient). The read is clamped to an existing slot and then
    discarded: with one segment the buffer is never written, and uninitialised memory times 0 can be NaN."""
    row = b * (NSEG - 1) + tl.maximum(tl.minimum(slot, NSEG - 2), 0)
    return tl.where(valid, tl.load(ptr + row * N * DIM + nd_off, mask=mnd, other=0.0), 0.0)


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
