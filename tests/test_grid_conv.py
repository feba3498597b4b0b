"""The fused 2-D local conv + SiLU (wdmctl/models/grid_conv.py) against its PyTorch expression and a float64
oracle: forward and gradients, single and pair (both directions' weights at once), extra tokens 1 and 2,
odd grids and channel counts, fp32 and bf16, strided inputs (in_proj's half). On CPU through Triton's
interpreter (CI); on a GPU compiled (`pytest -m gpu`). Errors are relative L2 norms."""

from __future__ import annotations

import pytest
import torch

from wdmctl.models import grid_conv as module
from wdmctl.models.norm_modulate import INTERPRET
from wdmctl.models.grid_conv import grid_conv_silu, reference_grid_conv_silu

CUDA = torch.cuda.is_available()
interpreted = pytest.mark.skipif(module.triton is None or CUDA or not INTERPRET,
                                 reason="needs triton and no GPU (the interpreter; the gpu tests cover a GPU)")
on_gpu = pytest.mark.skipif(module.triton is None or not CUDA, reason="needs a CUDA device and triton")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def conv_case(batch, extra, rows, cols, channels, pair, dtype, device, seed=0):
    """x as the mixer passes it (the first half of a (batch, L, 2 d) in_proj output: strided tokens), weights
    and bias (fp32 parameters; a pair's with a leading axis of 2), and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    length = extra + rows * cols
    x = torch.randn(batch, length, 2 * channels, generator=g)[..., :channels]
    directions = (2,) if pair else ()
    weight = torch.randn(*directions, channels, 1, 3, 3, generator=g) * 0.4
    bias = torch.randn(*directions, channels, generator=g) * 0.2
    dout = torch.randn((2 if pair else 1) * batch, length, channels, generator=g)
    return x.to(device, dtype), weight.to(device), bias.to(device), dout.to(device, dtype)


def run(fn, x, weight, bias, dout, grid, **kwargs):
    ins = [v.detach().clone().requires_grad_(True) for v in (x, weight, bias)]
    out = fn(*ins, grid, **kwargs)
    out.backward(dout.to(out.dtype))
    return {"out": out, "dx": ins[0].grad, "dweight": ins[1].grad, "dbias": ins[2].grad}


def check_against_oracle(monkeypatch, device, batch, extra, rows, cols, channels, pair, dtype, **kwargs):
    """The fused conv vs the PyTorch expression in float64 on the same (rounded) inputs; output and gradients
    come back in the inputs' dtypes."""
    x, weight, bias, dout = conv_case(batch, extra, rows, cols, channels, pair, dtype, device)
    grid = (extra, rows, cols)
    ref = run(reference_grid_conv_silu, *(v.double() for v in (x, weight, bias, dout)), grid)
    with monkeypatch.context() as patch:
        patch.setattr(module, "reference_grid_conv_silu", None)  # the fused path must not fall back
        got = run(grid_conv_silu, x, weight, bias, dout, grid, **kwargs)
    assert got["out"].shape == ref["out"].shape and got["out"].dtype == dtype and got["dx"].dtype == dtype
    assert got["dweight"].dtype == torch.float32 and got["dweight"].shape == weight.shape
    tol = 1e-6 if dtype == torch.float32 else 5e-3   # bf16: the output and dx rounded once
    errors = {k: rel(got[k], ref[k]) for k in ref}
    assert all(e < tol for e in errors.values()), errors


CASES = [  # batch, extra, rows, cols, channels, pair
    (2, 1, 3, 5, 7, False),
    (1, 2, 4, 3, 5, False),
    (2, 2, 3, 5, 7, True),
    (1, 1, 1, 6, 3, True),   # one grid row: every vertical tap is padding
]


@interpreted
@pytest.mark.parametrize("batch,extra,rows,cols,channels,pair", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interpreter_grid_conv_matches_oracle(monkeypatch, batch, extra, rows, cols, channels, pair, dtype):
    check_against_oracle(monkeypatch, "cpu", batch, extra, rows, cols, channels, pair, dtype, interpret=True)


@interpreted
def test_interpreter_grid_conv_matches_the_torch_expression_bit_close(monkeypatch):
    # fp32 against the expression the model ran before (cuDNN/oneDNN's conv, not the oracle): same numbers
    x, weight, bias, dout = conv_case(2, 2, 5, 3, 6, True, torch.float32, "cpu", seed=4)
    ref = run(reference_grid_conv_silu, x, weight, bias, dout, (2, 5, 3))
    got = run(grid_conv_silu, x, weight, bias, dout, (2, 5, 3), interpret=True)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)


@interpreted
def test_interpreter_grid_conv_tiles_and_partials(monkeypatch):
    # a tile smaller than the grid and channels past a block: several token tiles' weight-gradient partials
    monkeypatch.setattr(module, "FWD_CONFIGS", ((4, 4, 1),))
    monkeypatch.setattr(module, "BWD_CONFIGS", ((4, 4, 1),))
    check_against_oracle(monkeypatch, "cpu", 2, 2, 3, 4, 6, True, torch.float32, interpret=True)


def test_grid_conv_uses_the_torch_expression_on_cpu_and_under_compile(monkeypatch):
    # no interpret flag on CPU tensors, and torch.compile / ONNX export trace the PyTorch ops
    calls = []
    monkeypatch.setattr(module, "_GridConvSilu", None)
    real = module.reference_grid_conv_silu
    monkeypatch.setattr(module, "reference_grid_conv_silu", lambda *a: calls.append(1) or real(*a))
    x, weight, bias, _ = conv_case(1, 1, 2, 2, 3, False, torch.float32, "cpu")
    grid_conv_silu(x, weight, bias, (1, 2, 2))
    torch.compile(lambda v: grid_conv_silu(v, weight, bias, (1, 2, 2), interpret=True), backend="eager")(x)
    assert len(calls) == 2


@interpreted
def test_grid_conv_refuses_a_grid_that_does_not_fit():
    x, weight, bias, _ = conv_case(1, 1, 2, 2, 3, False, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"grid \(1, 2, 3\) does not describe 5 tokens"):
        grid_conv_silu(x, weight, bias, (1, 2, 3), interpret=True)


@interpreted
@pytest.mark.parametrize("scan", ["cycle", "bidirectional"])
def test_interpreter_model_with_fused_grid_conv_matches_torch(monkeypatch, scan):
    # the whole model (mixer_conv = "2d", single and pair convs) with the fused conv vs the PyTorch expression
    from wdmctl.models.wdmamba import WDMamba

    torch.manual_seed(0)
    model = WDMamba(arch="umamba", sample_size=8, in_channels=3, patch_size=2, width=16, depth=1, num_classes=3,
                    d_state=4, expand=1, scan=scan, mixer_conv="2d", scan_backend="torch")
    x = torch.randn(2, 3, 8, 6)
    t, y = torch.tensor([5.0, 700.0]), torch.tensor([0, 3])
    results = []
    for fused in (False, True):
        monkeypatch.setattr(module, "use_fused_kernels", lambda v, interpret, fused=fused: fused)
        model.zero_grad(set_to_none=True)
        out = model(x, t, y)
        out.square().mean().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    for fused, reference in zip(*results):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("batch,extra,rows,cols,channels,pair", CASES + [(4, 2, 16, 16, 384, True),
                                                                         (2, 1, 64, 64, 96, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_grid_conv_matches_oracle(monkeypatch, batch, extra, rows, cols, channels, pair, dtype):
    check_against_oracle(monkeypatch, "cuda", batch, extra, rows, cols, channels, pair, dtype)


@pytest.mark.gpu
@on_gpu
def test_gpu_grid_conv_every_config_and_autocast(monkeypatch):
    # every tile config the tuner may pick, and the model's call under bf16 autocast (bf16 in, bf16 out)
    for config in sorted(set(module.FWD_CONFIGS + module.BWD_CONFIGS)):
        monkeypatch.setattr(module, "FWD_CONFIGS", (config,))
        monkeypatch.setattr(module, "BWD_CONFIGS", (config,))
        check_against_oracle(monkeypatch, "cuda", 3, 2, 9, 7, 70, True, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        check_against_oracle(monkeypatch, "cuda", 2, 1, 8, 8, 64, False, torch.bfloat16)


@interpreted
def test_environment_switch_turns_the_fused_path_off(monkeypatch):
    # WDMCTL_FUSED_KERNELS=0 must route an interpret=True call (which would otherwise run the kernel) to PyTorch
    calls = []
    real = module.reference_grid_conv_silu
    monkeypatch.setattr(module, "reference_grid_conv_silu", lambda *a: calls.append(1) or real(*a))
    x, weight, bias, _ = conv_case(1, 1, 2, 2, 3, False, torch.float32, "cpu")
    grid_conv_silu(x, weight, bias, (1, 2, 2), interpret=True)
    assert calls == []
    monkeypatch.setenv("WDMCTL_FUSED_KERNELS", "0")
    grid_conv_silu(x, weight, bias, (1, 2, 2), interpret=True)
    assert calls == [1]
