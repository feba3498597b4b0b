"""The segmented scan (backend `triton-segmented`: forward and backward in segments) against the fp64 oracle,
and whole models on it against triton and torch. Same machinery and tolerances as tests/test_triton_scan.py
(whose import sets TRITON_INTERPRET=1 without a GPU). On CPU: Triton's interpreter at tiny shapes, with short
backward chunks so that short sequences are cut into segments at all (backward segments are whole chunks);
`-m gpu`: the compiled kernels at model sizes."""

from __future__ import annotations

import functools

import pytest
import torch

from test_triton_scan import (CUDA, GRADS, check, compare_with_oracle, interpreter, pair_case, rel,  # noqa: F401
                              scan_case, small_chunks, ts)

needs_gpu = pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")


def reverse_scans_and_gradients(scans: dict, x: dict) -> dict:
    """{name: [y, and the gradient of every input in GRADS]} of each scan entry on the same inputs, reverse
    order, softplus, loss sum(y^2)."""
    results = {}
    for name, scan in scans.items():
        leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}
        out = scan(**leaves, delta_softplus=True, reverse=True)
        out.float().square().sum().backward()
        results[name] = [out] + [leaves[k].grad for k in GRADS]
    return results


@pytest.fixture
def segments(monkeypatch):
    """Route compare_with_oracle's scan through the segmented backend with S segments: call with S."""
    def use(count):
        monkeypatch.setattr(ts, "selective_scan_triton", functools.partial(ts.selective_scan_segmented, segments=count))
    return use


def test_segment_count_leaves_no_segment_empty(monkeypatch):
    if ts is None:
        pytest.skip("triton is not installed")
    count = ts.segment_count
    monkeypatch.delenv("WDM_TRITON_SCAN_SEGMENTS", raising=False)
    for length in range(1, 40):
        for wanted in (1, 2, 3, 4, 7, 50):
            s = count(1, 1, length, wanted)
            steps = -(-length // s)
            assert 1 <= s <= min(wanted, length) and (s - 1) * steps < length, (length, wanted, s)
    assert count(8, 1536, 258) == 8   # the default: batch 8 x d 1536 is 12K channels, segments of >= 32 steps
    assert count(64, 3072, 258) == 1  # already 197K channels in flight
    monkeypatch.setenv("WDM_TRITON_SCAN_SEGMENTS", "3")
    assert count(64, 3072, 258) == 3


def test_auto_never_picks_segmented_or_plain():
    if ts is None:
        pytest.skip("triton is not installed")
    from wdmctl.scan import BACKENDS

    for name in ("triton-segmented", "triton-plain"):
        forced = BACKENDS[name]
        assert forced.priority < BACKENDS["triton"].priority and forced.priority < BACKENDS["mamba_ssm"].priority
        assert forced.is_available is BACKENDS["triton"].is_available and forced.reads_column_order
    assert BACKENDS["triton-plain"].selective_scan is ts.selective_scan_triton


def test_segments_pay_where_the_h200_measured_a_win():
    # the `triton` backend's rule against the H200 rows it comes from (model layout, segmented / plain)
    if ts is None:
        pytest.skip("triton is not installed")
    # forward+backward: wins at L 4098 up to 24K channels, and at 12K channels from L 1026
    for shape in [(8, 1536, 4098), (16, 1024, 4098), (8, 2304, 4098), (16, 1536, 4098),  # 2.30x 1.69x 1.64x 1.21x
                  (8, 1536, 2050), (8, 1536, 1026)]:                                    # 2.18x 1.68x
        assert ts.segments_pay(*shape), shape
    for shape in [(16, 1024, 1026), (32, 1536, 1026), (16, 3072, 1026),    # 0.95x, 0.72x, 0.71x
                  (64, 1536, 258), (64, 1024, 258), (64, 3072, 258),       # 0.73x, 0.59x, 1.00x
                  (8, 1536, 258),                                          # short: not measured to win
                  (16, 1536, 2050), (32, 1536, 4098)]:                     # 24K at 2,048 tokens, 49K: not measured
        assert not ts.segments_pay(*shape), shape
    # forward only (sampling): 2.27x at 8 x 1536 x 4098, 1.13x at 16 x 1536 x 4098, 1.6x at 16 x 1024 x 1026;
    # 0.58-0.87x at 49K+ channels
    for shape in [(8, 1536, 4098), (16, 1536, 4098), (16, 1024, 1026), (8, 1536, 1026)]:
        assert ts.segments_pay(*shape, backward=False), shape
    for shape in [(32, 1536, 1026), (16, 3072, 1026), (64, 1536, 258), (64, 1024, 258), (8, 1536, 258),
                  (16, 1536, 2050), (128, 1536, 4098)]:   # the last: sampling at batch 64 with guidance
        assert not ts.segments_pay(*shape, backward=False), shape


@pytest.mark.parametrize("pair", [False, True])
def test_interpreter_triton_segments_where_it_pays(interpreter, small_chunks, backward_counts, monkeypatch, pair):
    # the `triton` backend's entry: segmented (y and gradients bit for bit selective_scan_segmented's) when
    # segments_pay says so, for a pair too (its u already holds both directions' rows), and never with
    # token-major copies; the plain kernels otherwise
    from wdmctl.scan import triton as backend
    from wdmctl.scan.triton import segmented

    asked = []
    monkeypatch.setattr(segmented, "SEGMENT_TIERS", ((30, 64),))   # the interpreter's sequences are short
    monkeypatch.setattr(backend, "segments_pay",
                        lambda *shape, backward: asked.append((*shape, backward)) or segmented.segments_pay(
                            *shape, backward=backward))
    monkeypatch.setenv("WDM_TRITON_SCAN_SEGMENTS", "3")
    x = pair_case(33, batch=1, d=5, n=3, dtype=torch.bfloat16) if pair else scan_case(33, batch=2, d=5, n=3,
                                                                                        dtype=torch.bfloat16)
    forms = {"auto": backend.selective_scan_triton_auto, "segmented": backend.selective_scan_segmented,
             "auto-copies": functools.partial(backend.selective_scan_triton_auto, token_major_copies=True),
             "plain": backend.selective_scan_triton}
    results = reverse_scans_and_gradients(forms, x)
    assert asked == [(2, 5, 33, True)]    # asked once (copies skip the rule), with the pair's 2 rows
    asked.clear()
    assert backward_counts == [3, 3]      # auto and segmented cut their backward, plain and copies did not
    for name, auto, segmented_result, copies, plain in zip(("y", *GRADS), *results.values()):
        assert torch.equal(auto, segmented_result) and torch.equal(copies, plain), name
    monkeypatch.setattr(segmented, "SEGMENT_TIERS", ((34, 64),))   # one step longer than the case: plain
    assert torch.equal(reverse_scans_and_gradients({"auto": backend.selective_scan_triton_auto}, x)["auto"][0],
                       results["plain"][0])
    # forward only: the forward rule's length threshold decides, not the training one's
    leaves = {k: v.detach() for k, v in x.items()}
    monkeypatch.setattr(segmented, "FORWARD_SEGMENT_TIERS", ((30, 64),))
    with torch.no_grad():
        assert torch.equal(backend.selective_scan_triton_auto(**leaves, delta_softplus=True, reverse=True),
                           results["segmented"][0])
    monkeypatch.setattr(segmented, "FORWARD_SEGMENT_TIERS", ((34, 64),))
    assert torch.equal(backend.selective_scan_triton_auto(**leaves, delta_softplus=True, reverse=True),
                       results["plain"][0])          # no input needs a gradient: forward only as well
    assert asked == [(2, 5, 33, True), (2, 5, 33, False), (2, 5, 33, False)]


def test_bench_scan_times_segmented_per_count_beside_triton():
    # `bench scan --backends triton,triton-segmented --segments default,4`: which rows, and the ratio table
    from wdmctl.bench.scan import _segmented_speedups, _variants

    assert _variants("triton-segmented", ("model",), (None, 4)) == [("model", None), ("model", 4)]
    assert _variants("triton", ("model", "contiguous"), (None, 4)) == [("model", None), ("contiguous", None)]
    assert _variants("torch", ("model", "contiguous"), (4,)) == [("model", None)]
    shape = dict(batch=8, d_inner=1536, length=258, layout="model")
    rows = [dict(shape, backend="triton", forward_ms=1.0, forward_backward_ms=3.0),
            dict(shape, backend="triton-segmented", segments=4, forward_ms=0.5, forward_backward_ms=3.75),
            dict(shape, backend="triton-segmented", segments=8, skipped="out of memory")]
    # a faster forward, a slower backward: the segmented forward with triton's backward is 3.0 / (0.5 + 2.0)
    assert _segmented_speedups(rows) == [dict(shape="8x1536x258", layout="model", segments=4, forward_x=2.0,
                                              forward_backward_x=0.8, forward_segmented_backward_plain_x=1.2)]
    # with triton-plain rows in the run, they are the base (triton may itself have run in segments)
    rows[0]["backend"] = "triton-plain"
    rows.append(dict(shape, backend="triton", forward_ms=0.5, forward_backward_ms=3.75))
    assert _segmented_speedups(rows)[0]["forward_x"] == 2.0
    assert _variants("triton-plain", ("model", "contiguous-token-major"), (4,)) == [("model", None),
                                                                                    ("contiguous-token-major", None)]


CASES = [  # (L, S, reverse, layout, dtype): S = 1, 2, 3 and S not dividing L (7 / 3, 33 / 4, 33 / 5)
    (1, 1, False, "model", torch.float32), (1, 3, True, "model", torch.float32),
    (7, 2, False, "contiguous", torch.float32), (7, 3, True, "model", torch.float32),
    (33, 4, False, "strided", torch.float32), (33, 5, True, "model", torch.float32),
    (33, 3, False, "model", torch.bfloat16), (7, 7, True, "model", torch.bfloat16),
]


def tolerances(dtype):
    return (5e-5, 5e-4) if dtype == torch.float32 else (1e-2, 1e-2)


@pytest.mark.parametrize("length,count,reverse,layout,dtype", CASES)
def test_interpreter_segmented_matches_oracle(interpreter, small_chunks, segments, length, count, reverse, layout,
                                              dtype):
    # d = 5 of a 64-channel block, N = 3 padded to 4
    segments(count)
    x = scan_case(length, batch=2, d=5, n=3, dtype=dtype, layout=layout)
    check(compare_with_oracle(x, "cpu", reverse=reverse), *tolerances(dtype),
          f"interp segmented L={length} S={count} rev={reverse} {layout} {dtype}")


@pytest.mark.parametrize("grid,count,dtype", [((2, 4, 4), 3, torch.float32), ((2, 5, 5), 2, torch.float32),
                                              ((2, 5, 5), 4, torch.bfloat16)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pair", [False, True])
def test_interpreter_segmented_column_order_and_pairs(interpreter, small_chunks, segments, grid, count, dtype,
                                                      reverse, pair):
    # the model's 258 = 2 + 16 x 16 tokens in small: 18 = 2 + 4 x 4 and 27 = 2 + 5 x 5 (27 / 2 and 27 / 4 uneven)
    segments(count)
    length = grid[0] + grid[1] * grid[2]
    x = pair_case(length, batch=1, d=5, n=3, dtype=dtype) if pair else scan_case(length, batch=2, d=5, n=3,
                                                                                  dtype=dtype)
    check(compare_with_oracle(x, "cpu", reverse=reverse, column_grid=grid), *tolerances(dtype),
          f"interp segmented column {grid} S={count} rev={reverse} pair={pair} {dtype}")


def test_interpreter_segmented_without_options(interpreter, small_chunks, segments):
    segments(3)
    x = scan_case(11, batch=2, d=3, n=4, layout="contiguous", drop=("z", "D", "delta_bias"), softplus=False)
    check(compare_with_oracle(x, "cpu", softplus=False), 5e-5, 5e-4, "interp segmented no options")


# ----------------------------------------------------------------------------------------------------
# The segmented backward (CPU, interpreter)
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def chunk(monkeypatch):
    """Set the backward's chunk length in steps: call with it. Backward segments are whole chunks, so a
    sequence of L steps is cut into at most cdiv(L, chunk) of them."""
    def use(steps):
        monkeypatch.setattr(ts, "CHUNK", steps)
    return use


@pytest.fixture
def backward_counts(monkeypatch):
    """The segment count of every backward that ran in segments (a plain backward, S = 1, adds nothing)."""
    counts = []
    init = ts.SegmentedBackward.__init__

    def spy(self, *args):
        init(self, *args)
        counts.append(self.count)

    monkeypatch.setattr(ts.SegmentedBackward, "__init__", spy)
    return counts


def test_backward_segments_are_whole_chunks():
    if ts is None:
        pytest.skip("triton is not installed")
    for chunk in (1, 2, 8, 64):
        for length in range(1, 300, 7):
            for wanted in (1, 2, 3, 5, 17, 400):
                count, steps = ts.backward_segments(1, 1, length, wanted, chunk)
                assert steps % chunk == 0 and 1 <= count <= min(wanted, length), (chunk, length, wanted)
                assert (count - 1) * steps < length <= count * steps, (chunk, length, wanted)   # none empty
    assert ts.backward_segments(16, 1024, 1026, 8, 64) == (6, 192)   # 8 asked: segments of 3 chunks
    assert ts.backward_segments(2, 5, 7, 3, 8) == (1, 8)             # shorter than a chunk: not cut


BACKWARD_CASES = [  # (L, S asked, chunk, S the backward runs: segment lengths, reverse, layout, dtype)
    (1, 3, 1, 1, True, "model", torch.float32),          # one step: nothing to cut
    (7, 2, 2, 2, False, "contiguous", torch.float32),    # 4 + 3
    (7, 3, 1, 3, True, "model", torch.float32),          # 3 + 3 + 1
    (7, 5, 1, 4, False, "strided", torch.bfloat16),      # 2 + 2 + 2 + 1
    (33, 2, 8, 2, True, "model", torch.float32),         # 24 + 9
    (33, 3, 8, 3, False, "model", torch.bfloat16),       # 16 + 16 + 1
    (33, 5, 2, 5, True, "model", torch.float32),         # 4 x 8 + 1
    (130, 2, 64, 2, False, "model", torch.float32),      # the code's 64-step chunks: 128 + 2
    (130, 3, 64, 3, True, "model", torch.bfloat16),      # 64 + 64 + 2
    (130, 5, 8, 5, False, "contiguous", torch.float32),  # 4 chunks a segment: 4 x 32 + 2
]


@pytest.mark.parametrize("length,count,steps,ran,reverse,layout,dtype", BACKWARD_CASES)
def test_interpreter_segmented_backward_matches_oracle(interpreter, segments, chunk, backward_counts, length, count,
                                                       steps, ran, reverse, layout, dtype):
    # every gradient (u, delta, A, B, C, D, z, delta_bias) vs the fp64 oracle; d = 5 of a 64-channel block
    segments(count)
    chunk(steps)
    x = scan_case(length, batch=2, d=5, n=3, dtype=dtype, layout=layout)
    check(compare_with_oracle(x, "cpu", reverse=reverse), *tolerances(dtype),
          f"interp segmented backward L={length} S={count} chunk={steps} rev={reverse} {layout} {dtype}")
    assert backward_counts == ([ran] if ran > 1 else [])


def test_interpreter_segmented_backward_channel_blocks(interpreter, segments, chunk, backward_counts, monkeypatch):
    # 20 channels in blocks of 16: two programs per (row, segment), so two rows of dB / dC partials per step
    monkeypatch.setattr(ts, "DEFAULT_BWD_CONFIG", (16, 1))
    segments(3)
    chunk(4)
    x = scan_case(19, batch=2, d=20, n=3)
    check(compare_with_oracle(x, "cpu", reverse=True), 5e-5, 5e-4, "interp segmented backward BD=16")
    assert backward_counts == [3]


@pytest.mark.parametrize("pair,reverse,count,ran,dtype", [(False, True, 5, 5, torch.float32),
                                                          (True, False, 3, 3, torch.float32),
                                                          (True, True, 5, 5, torch.bfloat16),
                                                          (False, False, 3, 3, torch.bfloat16)])
def test_interpreter_segmented_backward_column_order_and_pairs(interpreter, segments, chunk, backward_counts, pair,
                                                               reverse, count, ran, dtype):
    # 18 = 2 + 4 x 4 tokens in 2-step chunks: S 3 cuts 6 + 6 + 6, S 5 cuts 4 + 4 + 4 + 4 + 2
    segments(count)
    chunk(2)
    x = pair_case(18, batch=1, d=5, n=3, dtype=dtype) if pair else scan_case(18, batch=2, d=5, n=3, dtype=dtype)
    check(compare_with_oracle(x, "cpu", reverse=reverse, column_grid=(2, 4, 4)), *tolerances(dtype),
          f"interp segmented backward column S={count} rev={reverse} pair={pair} {dtype}")
    assert backward_counts == [ran]


@pytest.mark.parametrize("drop,softplus", [(("z",), True), (("D",), True), (("delta_bias",), True),
                                           (("z", "D", "delta_bias"), False)])
def test_interpreter_segmented_backward_without_options(interpreter, segments, chunk, backward_counts, drop,
                                                        softplus):
    segments(3)
    chunk(4)   # 19 steps: 8 + 8 + 3
    x = scan_case(19, batch=2, d=3, n=4, layout="model", drop=drop, softplus=softplus)
    check(compare_with_oracle(x, "cpu", softplus=softplus), 5e-5, 5e-4,
          f"interp segmented backward drop={drop} softplus={softplus}")
    assert backward_counts == [3]


def scan_outputs_and_gradients(x, device, **options):
    """selective_scan's output and every gradient (None where the input is None) for one set of leaves."""
    from wdmctl.scan import selective_scan

    ins = {k: (v.to(device).detach().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    out = selective_scan(**ins, delta_softplus=True, **options)
    out.float().square().sum().backward()
    return [out] + [ins[k].grad if ins[k] is not None else None for k in GRADS]


def test_interpreter_segmented_backward_is_deterministic(interpreter, chunk, backward_counts, monkeypatch):
    # through the interface (backend="triton-segmented", segments=5): two runs agree bit for bit
    from wdmctl.scan import BACKENDS

    monkeypatch.setattr(BACKENDS["triton-segmented"], "is_available", lambda: True)
    monkeypatch.setattr(BACKENDS["triton-segmented"], "devices", ("cpu",))
    chunk(2)
    x = pair_case(18, batch=1, d=5, n=3, dtype=torch.bfloat16)
    runs = [scan_outputs_and_gradients(x, "cpu", backend="triton-segmented", segments=5, column_grid=(2, 4, 4))
            for _ in range(2)]
    assert backward_counts == [5, 5]
    for name, first, second in zip(("y", *GRADS), *runs):
        assert torch.equal(first, second), name


def test_interpreter_one_segment_is_the_plain_backward(interpreter, small_chunks, backward_counts):
    # segments=1 runs the triton backend's kernels: its results, bit for bit
    x = scan_case(33, batch=2, d=5, n=3, dtype=torch.bfloat16)
    results = reverse_scans_and_gradients({"triton": ts.selective_scan_triton,
                                           "one segment": functools.partial(ts.selective_scan_segmented, segments=1)}, x)
    assert backward_counts == []
    for name, first, second in zip(("y", *GRADS), *results.values()):
        assert torch.equal(first, second), name


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_interpreter_segmented_forward_with_the_plain_backward(interpreter, small_chunks, backward_counts,
                                                               monkeypatch, how):
    # backward_segments=1 (or WDM_TRITON_SCAN_BACKWARD_SEGMENTS=1): the forward in 3 segments, the backward the
    # triton backend's own: y bit for bit the segmented one's, every gradient bit for bit triton's
    x = scan_case(33, batch=2, d=5, n=3, dtype=torch.bfloat16)
    hybrid = functools.partial(ts.selective_scan_segmented, segments=3)
    if how == "argument":
        hybrid = functools.partial(hybrid, backward_segments=1)
    else:
        monkeypatch.setenv("WDM_TRITON_SCAN_BACKWARD_SEGMENTS", "1")
    scans = {"triton": ts.selective_scan_triton, "hybrid": hybrid,
             "segmented": functools.partial(ts.selective_scan_segmented, segments=3, backward_segments=3)}
    from wdmctl.scan.triton import segmented

    forwards = []   # the segment count of every segmented forward
    count = segmented.segment_count
    monkeypatch.setattr(segmented, "segment_count", lambda *a, **k: forwards.append(count(*a, **k)) or forwards[-1])
    results = reverse_scans_and_gradients(scans, x)
    assert forwards[0] == 3             # the hybrid's forward ran in 3 segments
    assert backward_counts == [3]       # and only the fully segmented run cut its backward
    assert torch.equal(results["hybrid"][0], results["segmented"][0])
    for name, first, second in zip(GRADS, results["hybrid"][1:], results["triton"][1:]):
        assert torch.equal(first, second), name


def model_results(device, options, backends=("triton-segmented", "triton", "torch")):
    """A tiny umamba's output and every parameter's gradient per backend (as check_options_on_backends)."""
    from wdmctl.models.wdmamba import WDMamba

    torch.manual_seed(0)
    model = WDMamba(arch="umamba", sample_size=8, in_channels=3, patch_size=2, width=16, depth=2,
                    num_classes=3, d_state=4, expand=1, **options).to(device)
    x = torch.randn(2, 3, 8, 6, device=device)   # a 4 x 3 patch grid
    t, y = torch.tensor([5.0, 700.0], device=device), torch.tensor([0, 3], device=device)
    results = {}
    for backend in backends:
        model.set_scan_backend(backend)
        model.zero_grad(set_to_none=True)
        out = model(x, t, y)
        out.square().mean().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in model.parameters()]
    for backend in backends[1:]:
        for seg, other in zip(results[backends[0]], results[backend]):
            torch.testing.assert_close(seg, other, rtol=1e-4, atol=1e-5)


MODEL_OPTIONS = [dict(), dict(scan="bidirectional"), dict(scan="bidirectional", mixer_conv="2d")]


@pytest.mark.parametrize("options", MODEL_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "preset")
def test_interpreter_model_segmented_matches_triton_and_torch(interpreter, small_chunks, monkeypatch, options):
    from wdmctl.scan import BACKENDS

    for name in ("triton", "triton-segmented"):   # the interpreter runs on CPU tensors
        monkeypatch.setattr(BACKENDS[name], "is_available", lambda: True)
        monkeypatch.setattr(BACKENDS[name], "devices", ("cpu",))
    monkeypatch.setenv("WDM_TRITON_SCAN_SEGMENTS", "3")   # 14 tokens: segments of 5, 5, 4
    model_results("cpu", options)


# ----------------------------------------------------------------------------------------------------
# GPU (pytest -m gpu): the compiled kernels
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,count", [(7, 3), (258, 2), (258, 5), (258, 8), (1026, 4), (1026, 33)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@needs_gpu
def test_gpu_segmented_matches_oracle(segments, length, count, reverse, dtype):
    segments(count)
    x = scan_case(length, batch=2, d=96, n=16, dtype=dtype)
    check(compare_with_oracle(x, "cuda", reverse=reverse), *tolerances(dtype),
          f"gpu segmented L={length} S={count} rev={reverse} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("count,backward_count", [(3, 3), (8, 5)])
@pytest.mark.gpu
@needs_gpu
def test_gpu_segmented_column_order_and_pairs(segments, backward_counts, dtype, reverse, pair, count,
                                              backward_count):
    # the backward cuts whole 64-step chunks: 3 asked gives 128 + 128 + 2, 8 asked 4 x 64 + 2
    segments(count)
    x = pair_case(258, batch=1, d=96, n=16, dtype=dtype) if pair else scan_case(258, batch=2, d=96, n=16, dtype=dtype)
    check(compare_with_oracle(x, "cuda", reverse=reverse, column_grid=(2, 16, 16)), *tolerances(dtype),
          f"gpu segmented column S={count} rev={reverse} pair={pair} {dtype}")
    assert backward_counts == [backward_count]


@pytest.mark.gpu
@needs_gpu
def test_gpu_segmented_default_count_and_every_config(monkeypatch):
    # S from segment_count at a model-like size, and every forward config the tuner may pick
    monkeypatch.setattr(ts, "selective_scan_triton", ts.selective_scan_segmented)
    for cfg in ts.FWD_CONFIGS:   # d = 96 x batch 2 is below the tuner's threshold: the default config runs
        monkeypatch.setattr(ts, "DEFAULT_SCAN_CONFIG", cfg)
        x = scan_case(258, batch=2, d=96, n=16, dtype=torch.bfloat16)
        check(compare_with_oracle(x, "cuda"), 1e-2, 1e-2, f"gpu segmented cfg={cfg}")


@pytest.mark.parametrize("options", MODEL_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "preset")
@pytest.mark.gpu
@needs_gpu
def test_gpu_model_segmented_matches_triton_and_torch(monkeypatch, options):
    monkeypatch.setenv("WDM_TRITON_SCAN_SEGMENTS", "3")
    model_results("cuda", options)


@pytest.mark.parametrize("length,count,ran", [(258, 2, 2), (258, 5, 5), (1026, 4, 4), (1026, 17, 17),
                                              (4100, 33, 33)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@needs_gpu
def test_gpu_segmented_backward_matches_oracle(segments, backward_counts, length, count, ran, reverse, dtype):
    # the code's 64-step chunks: 258 / 5 cuts 4 x 64 + 2, 1026 / 17 cuts 16 x 64 + 2, 4100 / 33 cuts 32 x 128 + 4
    segments(count)
    x = scan_case(length, batch=2, d=96, n=16, dtype=dtype)
    check(compare_with_oracle(x, "cuda", reverse=reverse), *tolerances(dtype),
          f"gpu segmented backward L={length} S={count} rev={reverse} {dtype}")
    assert backward_counts == [ran]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@needs_gpu
def test_gpu_triton_auto_segments_long_sequences(monkeypatch, backward_counts, dtype):
    # the `triton` backend's own entry, 192 channels, against the fp64 oracle: segmented (default S) at 4100
    # and 1026 steps (the rule's two tiers), the plain kernels at 1000 (under both)
    monkeypatch.delenv("WDM_TRITON_SCAN_SEGMENTS", raising=False)
    for length in (4100, 1026, 1000):
        x = scan_case(length, batch=2, d=96, n=16, dtype=dtype)
        check(compare_with_oracle(x, "cuda", scan=ts.selective_scan_triton_auto), *tolerances(dtype),
              f"gpu triton auto L={length} {dtype}")
    assert len(backward_counts) == 2 and min(backward_counts) > 1   # L = 4100 and 1026 ran in segments
    # forward only at 1026 steps (sampling): in segments, the segmented scan's output bit for bit
    inputs = {k: v.cuda() for k, v in scan_case(1026, batch=2, d=96, n=16, dtype=dtype).items()}
    with torch.no_grad():
        assert torch.equal(ts.selective_scan_triton_auto(**inputs, delta_softplus=True),
                           ts.selective_scan_segmented(**inputs, delta_softplus=True))


@pytest.mark.parametrize("cfg", ts.BWD_CONFIGS if ts else [])
@pytest.mark.gpu
@needs_gpu
def test_gpu_segmented_backward_every_config(segments, backward_counts, monkeypatch, cfg):
    # every backward config the tuner may pick, PTX lane sums and capped registers included; d = 96 leaves a
    # partial 32-channel group and a partial block
    monkeypatch.setattr(ts, "DEFAULT_BWD_CONFIG", cfg)
    segments(8)
    x = scan_case(1026, batch=2, d=96, n=16, dtype=torch.bfloat16)
    check(compare_with_oracle(x, "cuda", reverse=True), 1e-2, 1e-2, f"gpu segmented backward cfg={cfg}")
    assert backward_counts == [6]   # 8 asked: segments of 3 chunks


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-3)])
@pytest.mark.parametrize("count", [None, 8])
@pytest.mark.gpu
@needs_gpu
def test_gpu_segmented_backward_matches_triton_at_model_size(backward_counts, dtype, tol, count):
    # the shape the segmented backward is for (batch 16 x d_inner 1024 x 1026 tokens, the model's layout; S
    # from the default rule, and 8), against the plain triton backward on the same inputs; the tuner runs
    from wdmctl.bench.scan import scan_inputs

    x = scan_inputs(16, 1024, 1026, 16, dtype, "model", seed=3)
    plain = scan_outputs_and_gradients(x, "cuda", backend="triton")
    seg = scan_outputs_and_gradients(x, "cuda", backend="triton-segmented", segments=count)
    assert len(backward_counts) == 1 and backward_counts[0] > 1
    errs = {name: rel(a, b) for name, a, b in zip(("y", *GRADS), seg, plain) if b is not None}
    check(errs, tol, tol, f"gpu segmented vs triton 16x1024x1026 S={count} {dtype}")


@pytest.mark.gpu
@needs_gpu
def test_gpu_segmented_backward_is_deterministic(backward_counts):
    # two runs agree bit for bit (partial sums per segment reduced by torch, no atomics), and the outputs and
    # gradients keep the inputs' channel-contiguous layout
    x = {k: (v.cuda() if v is not None else None)
         for k, v in scan_case(1026, batch=4, d=256, dtype=torch.bfloat16).items()}
    runs = [scan_outputs_and_gradients(x, "cuda", backend="triton-segmented", segments=6) for _ in range(2)]
    assert backward_counts == [6, 6]
    assert runs[0][0].stride(1) == 1 and runs[0][1].stride(1) == 1
    for name, first, second in zip(("y", *GRADS), *runs):
        assert torch.equal(first, second), name
