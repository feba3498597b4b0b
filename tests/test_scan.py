"""The selective scan and causal conv1d against float64 recurrences written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wdmctl.errors import WdmError
from wdmctl.scan import available_backends, causal_conv1d, resolve_backend, selective_scan
from wdmctl.scan.torch_scan import DEFAULT_CHUNK_SIZE

T = DEFAULT_CHUNK_SIZE


def oracle_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False):
    """The recurrence in float64, one token at a time, written independently of wdmctl."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if reverse:
        idx = range(u.shape[-1] - 1, -1, -1)
    else:
        idx = range(u.shape[-1])
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.where(delta <= 20, torch.log1p(torch.exp(delta)), delta)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    y = torch.zeros_like(u)
    for t in idx:
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        y[:, :, t] = (h * C[:, None, :, t]).sum(-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y


def make_inputs(length, batch=2, d=5, n=4, delta_scale=1.0, dtype=torch.float32, channels_last=False):
    g = torch.Generator().manual_seed(length)
    def r(*s):
        return torch.randn(*s, generator=g)
    u = r(batch, d, length)
    if channels_last:  # (B, L, D) memory viewed as (B, D, L), as the model passes them
        u = r(batch, length, d).transpose(1, 2)
    return dict(
        u=u.to(dtype), delta=(r(batch, d, length) * delta_scale).to(dtype),
        A=-torch.exp(r(d, n) * 0.5), B=r(batch, n, length).to(dtype), C=r(batch, n, length).to(dtype),
        D=r(d), z=r(batch, d, length).to(dtype), delta_bias=r(d) * 0.1,
    )


LENGTHS = [1, 2, 7, T - 1, T, T + 1, 300]


@pytest.mark.parametrize("backend", ["torch", "torch-sequential"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_matches_fp64_oracle(backend, length, reverse):
    x = make_inputs(length, channels_last=length == 7)
    out = selective_scan(**x, delta_softplus=True, reverse=reverse, backend=backend)
    ref = oracle_scan(**x, delta_softplus=True, reverse=reverse)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_z", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("use_D", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_optional_inputs(use_z, use_bias, use_D, softplus):
    x = make_inputs(T + 3)
    if not softplus:
        x["delta"] = x["delta"].abs()  # keep delta*A <= 0, as softplus would
        x["delta_bias"] = x["delta_bias"].abs()
    x["z"] = x["z"] if use_z else None
    x["delta_bias"] = x["delta_bias"] if use_bias else None
    x["D"] = x["D"] if use_D else None
    ref = oracle_scan(**x, delta_softplus=softplus)
    for backend in ("torch", "torch-sequential"):
        out = selective_scan(**x, delta_softplus=softplus, backend=backend)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_chunk_sizes_agree(chunk_size):
    x = make_inputs(37)
    ref = oracle_scan(**x, delta_softplus=True)
    out = selective_scan(**x, delta_softplus=True, backend="torch", chunk_size=chunk_size)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_large_delta_times_A_does_not_overflow():
    # sum(delta * |A|) over a chunk reaches ~1e4: a factorised exp(S_i) * exp(-S_j) would give inf/nan
    x = make_inputs(3 * T, delta_scale=1.0)
    x["delta"] = x["delta"].abs() * 50 + 20
    x["A"] = x["A"] * 10
    ref = oracle_scan(**x, delta_softplus=True)
    for dtype in (torch.float32, torch.bfloat16):
        xi = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
        out = selective_scan(**xi, delta_softplus=True, backend="torch")
        assert torch.isfinite(out).all()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * 10)


def test_low_precision_inputs_keep_fp32_state():
    x = make_inputs(50)
    xb = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    out = selective_scan(**xb, delta_softplus=True, backend="torch")
    assert out.dtype == torch.bfloat16
    ref = oracle_scan(**{k: (v.float() if v.dtype == torch.bfloat16 else v) for k, v in xb.items()}, delta_softplus=True)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=5e-2)


def test_gradients_chunked_equal_sequential():
    x = make_inputs(T + 5)
    grads = []
    for backend in ("torch", "torch-sequential"):
        xi = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        out = selective_scan(**xi, delta_softplus=True, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append({k: v.grad for k, v in xi.items()})
    for k in x:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5)


def oracle_conv(x, weight, bias, silu):
    width = weight.shape[1]
    xp = F.pad(x.double(), (width - 1, 0))
    out = sum(xp[..., k:k + x.shape[-1]] * weight.double()[:, k, None] for k in range(width))
    if bias is not None:
        out = out + bias.double()[:, None]
    return F.silu(out) if silu else out


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_causal_conv1d(width, reverse, silu):
    x = torch.randn(2, 6, 11)
    weight, bias = torch.randn(6, width), torch.randn(6)
    out = causal_conv1d(x, weight, bias, "silu" if silu else None, reverse=reverse, backend="torch")
    ref = oracle_conv(x.flip(-1) if reverse else x, weight, bias, silu)
    ref = ref.flip(-1) if reverse else ref
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_backend_errors_are_one_line():
    with pytest.raises(WdmError, match="unknown scan backend 'nope'"):
        resolve_backend("nope", "cpu")
    if "mamba_ssm" not in available_backends():
        with pytest.raises(WdmError, match=r'pip install "wdmctl\[cuda\]"'):
            resolve_backend("mamba_ssm", "cuda")
    assert resolve_backend("auto", "cpu").name == "torch-sequential"
