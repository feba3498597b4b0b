"""The segmented selective scan (backend `triton-segmented`): the sequence cut into S segments scanned in
parallel, forward and backward, with carry passes between segments (kernels and their passes:
segmented_kernels.py; the backward's two passes are scan_kernels.py's with SEGMENTED).

Why: at L = 258 and batch 8-64, _scan_fwd_kernel runs one program per (batch row, channel block), a thread per
channel (batch 8 x d_inner 1536: 12K threads where an H200 holds 270K); segments multiply that by S. The
backward passes are the same shape of loop with more registers (~67K threads fit an H200 at their budget):
batch 16 x d_inner 1024 is 16K threads, latency-bound.

Forward. Both variants need pass 1 (segment end states) and pass 2 (carries). Then either
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

Backward (SegmentedBackward). Segments are whole chunks of the backward (T = chunk * cdiv(cdiv(L, S), chunk)),
so the chunk states and the dA telescoping are the plain passes' and the result is the same up to rounding.
Pass 1 (forward time) needs the state entering each segment: the forward's passes 1-2, launched again at this
T (keeping the forward's would hold (S-1) H from forward to backward, and its segments are not whole chunks).
Pass 2 (reverse time) needs the state gradient entering each segment from the ones after it: dh over a segment
is linear in what enters it, so a pass from zero gradient per segment plus a descending carry gives it
exactly, as the forward's carry gives the states. Bytes on top of the plain backward's, S segments:
  the states: u, delta of S-1 segments, 2E (S-1)/S; the gradient ends: delta, z, dy of S-1 segments,
  3E (S-1)/S (2E without z); per-segment fp32 tiles: each carry written, read and rewritten and read once
  more (8 (S-1) H for both), accF and the dA partials per segment instead of per row (4 (S-1) H), the
  state at each segment's end for pass 2's restart (S H).
Total 5E (S-1)/S + 12 (S-1) H + S H. At batch 16, d 1024, L 1026, bf16, N = 16, S = 6 (T = 192): E = 33.6 MB,
H = 1.05 MB: 140 + 69 = 209 MB on top of the plain backward's ~680 MB, 1.3x the bytes, and 4 more launches
(two end-state passes, two carries) plus 2 small allocations.
"""

from __future__ import annotations

import os

import torch
import triton

from wdmctl.scan.triton.common import CHUNK
from wdmctl.scan.triton.launch import DEFAULT_SCAN_CONFIG, FWD_CONFIGS, _choose, _launch_options
from wdmctl.scan.triton.scan import (_bdl, _empty_like_layout, _flags, _key, _order_args, _pack, _scan_backward,
                                     scan_arguments)
from wdmctl.scan.triton.scan_kernels import _scan_bwd1_kernel, _scan_bwd2_kernel
from wdmctl.scan.triton.segmented_kernels import (_seg_carry_kernel, _seg_dh_state_kernel, _seg_scan_kernel,
                                                  _seg_state_kernel)

# Default segment count: enough channel-segments in flight to fill the GPU (an H200 holds ~270K threads, one
# per channel), but segments of at least MIN_SEGMENT_STEPS steps (shorter ones spend more on their state's
# two extra transfers than on their tokens). Unmeasured guesses: `bench scan` has to set them.
TARGET_THREADS = 128 * 1024
MIN_SEGMENT_STEPS = 32


# When the `triton` backend cuts a scan into segments by itself (segments_pay): few channels in flight (rows x
# d_inner; a pair's rows are 2 x batch) and a long sequence. Each rule is a list of (at least this many steps,
# at most this many channels) tiers, and takes the H200's measured wins and no more (model layout, segmented
# over plain at the default S; benchmarks/h200-issue16-scan-model-shapes.json, h200-issue16-scan-segmented-
# noconv.json and h200-issue16-rule/scan-rule-edges.json).
#  - With a backward (training), forward+backward: at L 4098, 2.30x at 12,288 channels (WDM-B/2's batch 8 at
#    4,096 tokens; 1.78x on the whole graphed step), 1.69x at 16,384, 1.64x at 18,432, 1.21x at 24,576;
#    2.18x at 12,288 x 2050 and 1.68x at 12,288 x 1026; losses: 0.95x at 16,384 x 1026 and 0.59-0.76x at 49K-98K
#    channels and L 258-1026.
#  - Forward only (sampling, FID): 2.27x at 12,288 x 4098, 1.13-1.73x at 16K-24K x 4098, 1.92-2.16x at
#    12,288 x 1026-2050, 1.6x at 16,384 x 1026; losses at 49K-98K channels (0.58-0.87x).
SEGMENT_TIERS = ((4096, 24 * 1024), (1024, 12 * 1024))
FORWARD_SEGMENT_TIERS = ((4096, 24 * 1024), (1024, 16 * 1024))


def segments_pay(rows: int, d: int, length: int, backward: bool = True) -> bool:
    """Whether the `triton` backend scans (rows, d, length) in segments: the measured wins above, in
    SEGMENT_TIERS with a backward to follow, FORWARD_SEGMENT_TIERS forward only."""
    tiers = SEGMENT_TIERS if backward else FORWARD_SEGMENT_TIERS
    return any(length >= min_length and rows * d <= max_channels for min_length, max_channels in tiers)


def segment_count(rows: int, d: int, length: int, segments: int | None = None) -> int:
    """S for a problem: `segments` when given (or WDM_TRITON_SCAN_SEGMENTS), else the default above; then
    clamped so that no segment is empty (at most L segments, and cdiv(L, cdiv(L, S)) of them)."""
    if segments is None and os.environ.get("WDM_TRITON_SCAN_SEGMENTS"):
        segments = int(os.environ["WDM_TRITON_SCAN_SEGMENTS"])
    if segments is None:
        segments = min(triton.cdiv(TARGET_THREADS, rows * d), max(1, length // MIN_SEGMENT_STEPS))
    segments = max(1, min(int(segments), length))
    return triton.cdiv(length, triton.cdiv(length, segments))


def backward_request(segments: int | None, backward: int | None = None) -> int | None:
    """The segment count the backward is asked for: `backward` when given, else WDM_TRITON_SCAN_BACKWARD_SEGMENTS
    when set, else the forward's request. 1 runs the plain backward after a segmented forward: the forward's
    gain where the segmented backward loses (the first H200 run: a 1.6x faster forward and a 1.2x slower
    backward at 16 x 1024 x 1026)."""
    if backward is None and os.environ.get("WDM_TRITON_SCAN_BACKWARD_SEGMENTS"):
        backward = int(os.environ["WDM_TRITON_SCAN_BACKWARD_SEGMENTS"])
    return segments if backward is None else backward


def backward_segments(rows: int, d: int, length: int, segments: int | None, chunk: int) -> tuple[int, int]:
    """(S, T) for the segmented backward: S from segment_count, then segments of a whole number of the
    backward's chunks, T = chunk * cdiv(cdiv(L, S), chunk), so that every chunk lies in one segment and the
    chunk bookkeeping is the plain passes'; S = cdiv(L, T) can come out smaller (at most cdiv(L, chunk))."""
    steps = chunk * triton.cdiv(triton.cdiv(length, segment_count(rows, d, length, segments)), chunk)
    return triton.cdiv(length, steps), steps


def _launch_segment_states(cfg, states, decay_sums, u, delta, At, bc, D, delta_bias, steps, nseg, order, flags):
    """Passes 1-2 of the segmented forward: the state entering each segment 1..S-1 into `states`
    (rows, S-1, N, d) fp32, slot s for segment s + 1; `decay_sums` (rows, S-1, d) is their scratch."""
    rows, d, length = u.shape
    n = At.shape[-2]
    pair = At.dim() == 3
    bd = cfg[0]
    _seg_state_kernel[(triton.cdiv(d, bd), rows, nseg - 1)](
        u, delta, At, bc, D, delta_bias, states, decay_sums, rows // 2 if pair else rows, d, length, n, steps, nseg,
        *order.values(), *_bdl(u), *_bdl(delta), **{k: v for k, v in flags.items() if k != "HAS_Z"}, BD=bd,
        **_launch_options(cfg))
    _seg_carry_kernel[(triton.cdiv(d, bd), rows)](
        At, states, decay_sums, rows // 2 if pair else rows, d, n, nseg, NP=flags["NP"], BD=bd, PAIR=pair,
        **_launch_options(cfg))


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
    hin = torch.empty(rows, max(nseg - 1, 1), n, d, device=u.device, dtype=torch.float32)
    dsum = torch.empty(rows, max(nseg - 1, 1), d, device=u.device, dtype=torch.float32)

    def launch(cfg):
        bd = cfg[0]
        if nseg > 1:
            _launch_segment_states(cfg, hin, dsum, u, delta, At, bc, D, delta_bias, steps, nseg, order, flags)
        _seg_scan_kernel[(triton.cdiv(d, bd), rows, nseg)](
            u, delta, At, bc, D, zz, delta_bias, y, hin, batch, d, length, n, steps, nseg, *order.values(),
            *_bdl(u), *_bdl(delta), *_bdl(zz), *_bdl(y), **flags, BD=bd, **_launch_options(cfg))

    key = (*_key(u, delta, B, z, flags), nseg)
    launch(_choose("seg", key, rows * d * nseg, launch, FWD_CONFIGS, DEFAULT_SCAN_CONFIG))
    return y


class SegmentedBackward:
    """The segmented backward's launches, which _scan_backward makes in place of its two plain ones
    (`segmented=`): it hands over the plain kernels' arguments and launch options. S >= 2 segments of T
    steps, T a multiple of the chunk (backward_segments).

    pass1: the state entering each segment (the forward's passes 1-2 at this T: _seg_state_kernel,
           _seg_carry_kernel), then _scan_bwd1_kernel with SEGMENTED over all segments from those states.
    pass2: the state gradient entering each segment from the ones after it (_seg_dh_state_kernel, segments
           1..S-1 backwards from a zero gradient, then _seg_carry_kernel descending), then _scan_bwd2_kernel
           with SEGMENTED over all segments from it.
    Both carries use one buffer, (rows, S-1, N, d) fp32: pass 1 is done with the states when pass 2 starts."""

    def __init__(self, dy, u, delta, packed, D, z, delta_bias, delta_softplus, reverse, column_grid, count, steps):
        rows, d, length = u.shape
        self.At, self.bc = packed
        self.pair = self.At.dim() == 3
        self.n = self.At.shape[-2]
        self.count, self.steps = count, steps
        self.dy, self.u, self.delta, self.D, self.delta_bias = dy, u, delta, D, delta_bias
        self.zz = z if z is not None else u   # never read when HAS_Z is off
        self.order, order_flags = _order_args(column_grid, length, self.pair)
        self.flags = _flags(D, z, delta_bias, delta_softplus, reverse, self.n, order_flags)
        self.carries = torch.empty(rows, count - 1, self.n, d, device=u.device, dtype=torch.float32)
        self.decay_sums = torch.empty(rows, count - 1, d, device=u.device, dtype=torch.float32)

    def pass1(self, cfg, args, options):
        rows, d, _ = self.u.shape
        _launch_segment_states(cfg, self.carries, self.decay_sums, self.u, self.delta, self.At, self.bc, self.D,
                               self.delta_bias, self.steps, self.count, self.order, self.flags)
        _scan_bwd1_kernel[(triton.cdiv(d, cfg[0]), rows, self.count)](
            *args, carry_ptr=self.carries, T=self.steps, NSEG=self.count, SEGMENTED=True, **options)

    def pass2(self, cfg, args, options):
        rows, d, length = self.u.shape
        batch = rows // 2 if self.pair else rows
        bd = cfg[0]
        _seg_dh_state_kernel[(triton.cdiv(d, bd), rows, self.count - 1)](
            self.delta, self.At, self.bc, self.zz, self.delta_bias, self.dy, self.carries, self.decay_sums, batch, d,
            length, self.n, self.steps, self.count, *self.order.values(), *_bdl(self.delta), *_bdl(self.zz),
            *_bdl(self.dy), **{k: v for k, v in self.flags.items() if k != "HAS_D"}, BD=bd, **_launch_options(cfg))
        _seg_carry_kernel[(triton.cdiv(d, bd), rows)](
            self.At, self.carries, self.decay_sums, batch, d, self.n, self.count, NP=self.flags["NP"], BD=bd,
            PAIR=self.pair, DESCENDING=True, **_launch_options(cfg))
        _scan_bwd2_kernel[(triton.cdiv(d, bd), rows, self.count)](
            *args, carry_ptr=self.carries, T=self.steps, NSEG=self.count, SEGMENTED=True, **options)


def _segmented_backward(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid=(),
                        segments=None, packed=None):
    """_scan_backward's gradients with both passes in segments (SegmentedBackward); with one segment (short
    sequences: segments are whole chunks) the plain backward itself."""
    rows, d, length = u.shape
    count, steps = backward_segments(rows, d, length, segments, CHUNK)
    packed = packed or _pack(A, B, C)
    segmented = None if count == 1 else SegmentedBackward(dy, u, delta, packed, D, z, delta_bias, delta_softplus,
                                                           reverse, column_grid, count, steps)
    return _scan_backward(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid,
                          packed=packed, segmented=segmented)


class _SegmentedScanFn(torch.autograd.Function):
    """The segmented forward and backward; saves what _SelectiveScanFn saves (the backward recomputes the
    states, segment entry states included) plus the requested segment count."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid, segments,
                backward_segments):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.flags = (delta_softplus, reverse, column_grid)
        ctx.backward_segments = backward_request(segments, backward_segments)
        ctx.packed = _pack(A, B, C)
        return _segmented_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, column_grid,
                                  segments, ctx.packed)

    @staticmethod
    def backward(ctx, dy):
        grads = _segmented_backward(dy, *ctx.saved_tensors, *ctx.flags, segments=ctx.backward_segments,
                                    packed=ctx.packed)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None, None, None)


def selective_scan_segmented(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             reverse=False, column_grid=None, segments=None, backward_segments=None, **_):
    """selective_scan_triton with the forward and the backward in segments; `segments` overrides S (see
    segment_count; the backward cuts whole chunks, backward_segments), `backward_segments` the backward's
    alone (backward_request: 1 is the plain backward). A of shape (2, d, N) makes it a
    bidirectional pair, as there. Under torch.compile it runs as the triton backend's custom op (unsegmented):
    the segmented scan has no custom op yet."""
    if u.numel() == 0:
        return torch.empty_like(u)
    A, D, delta_bias, grid = scan_arguments(A, D, delta_bias, column_grid)
    if torch.compiler.is_compiling():
        from wdmctl.scan.triton.custom_ops import _scan_op

        return _scan_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), grid)
    return _SegmentedScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), grid,
                                  segments, backward_segments)
