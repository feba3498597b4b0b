"""The segmented forward (backend `triton-segmented`) against the fp64 oracle, and whole models on it against
triton and torch. Same machinery and tolerances as tests/test_triton_scan.py (whose import sets
TRITON_INTERPRET=1 without a GPU); the gradients go through the triton backend's backward, so the oracle
checks them too. On CPU: Triton's interpreter at tiny shapes; `-m gpu`: the compiled kernels at model sizes."""

from __future__ import annotations

import functools

import pytest
import torch

from test_triton_scan import (CUDA, check, compare_with_oracle, interpreter, pair_case, scan_case,  # noqa: F401
                              small_chunks, ts)

needs_gpu = pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")


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


def test_auto_never_picks_segmented():
    if ts is None:
        pytest.skip("triton is not installed")
    from wdmctl.scan import BACKENDS

    seg = BACKENDS["triton-segmented"]
    assert seg.priority < BACKENDS["triton"].priority and seg.priority < BACKENDS["mamba_ssm"].priority
    assert seg.is_available is BACKENDS["triton"].is_available and seg.reads_column_order


def test_bench_scan_times_segmented_per_count_beside_triton():
    # `bench scan --backends triton,triton-segmented --segments default,4`: which rows, and the ratio table
    from wdmctl.bench.scan import _segmented_speedups, _variants

    assert _variants("triton-segmented", ("model",), (None, 4)) == [("model", None), ("model", 4)]
    assert _variants("triton", ("model", "contiguous"), (None, 4)) == [("model", None), ("contiguous", None)]
    assert _variants("torch", ("model", "contiguous"), (4,)) == [("model", None)]
    shape = dict(batch=8, d_inner=1536, length=258, layout="model")
    rows = [dict(shape, backend="triton", forward_ms=1.0, forward_backward_ms=3.0),
            dict(shape, backend="triton-segmented", segments=4, forward_ms=0.5, forward_backward_ms=2.5),
            dict(shape, backend="triton-segmented", segments=8, skipped="out of memory")]
    assert _segmented_speedups(rows) == [dict(shape="8x1536x258", layout="model", segments=4, forward_x=2.0,
                                              forward_backward_x=1.2)]


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
@pytest.mark.parametrize("count", [3, 8])
@pytest.mark.gpu
@needs_gpu
def test_gpu_segmented_column_order_and_pairs(segments, dtype, reverse, pair, count):
    segments(count)
    x = pair_case(258, batch=1, d=96, n=16, dtype=dtype) if pair else scan_case(258, batch=2, d=96, n=16, dtype=dtype)
    check(compare_with_oracle(x, "cuda", reverse=reverse, column_grid=(2, 16, 16)), *tolerances(dtype),
          f"gpu segmented column S={count} rev={reverse} pair={pair} {dtype}")


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
