"""The selective scan and causal conv1d against float64 recurrences written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wdmctl.errors import WdmError
from wdmctl.scan import (
    available_backends,
    causal_conv1d,
    causal_conv1d_pair,
    resolve_backend,
    selective_scan,
    selective_scan_pair,
)
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


def column_order(length: int, column_grid) -> list[int]:
    """Memory index of each position of the column-major order, spelled out independently of wdmctl."""
    extra, rows, cols = column_grid
    return list(range(extra)) + [extra + r * cols + c for c in range(cols) for r in range(rows)]


def oracle(x: dict, softplus: bool, reverse: bool, column_grid=None) -> torch.Tensor:
    """The fp64 oracle for every form the kernels take: a token order (gather the inputs into scan order,
    scan, scatter the output back) and a bidirectional pair (A with a leading axis of 2: one oracle scan per
    direction, both gated by the same z)."""
    if x["A"].dim() == 3:
        half = x["u"].shape[0] // 2
        ys = []
        for i, rows in enumerate((slice(None, half), slice(half, None))):
            xi = {k: (None if v is None else v[i] if k in ("A", "D", "delta_bias") else v if k == "z" else v[rows])
                  for k, v in x.items()}
            ys.append(oracle(xi, softplus, reverse != bool(i), column_grid))
        return torch.cat(ys)
    if not column_grid:
        return oracle_scan(**x, delta_softplus=softplus, reverse=reverse)
    perm = torch.tensor(column_order(x["u"].shape[-1], column_grid))
    seq = {k: (v[..., perm] if k in ("u", "delta", "B", "C", "z") and v is not None else v) for k, v in x.items()}
    y_perm = oracle_scan(**seq, delta_softplus=softplus, reverse=reverse)
    return y_perm[..., torch.argsort(perm)]


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


def conv_oracle(x, w, b, silu, reverse, column_grid=None):
    """The fp64 conv oracle in every form: reversed (flip, convolve, flip), in column-major order (gather,
    convolve, scatter back) and as a pair (w of shape (2, d, width): one per direction, stacked on the batch)."""
    if w.dim() == 3:
        return torch.cat([conv_oracle(x, w[i], b[i], silu, reverse != bool(i), column_grid) for i in range(2)])
    perm = torch.tensor(column_order(x.shape[-1], column_grid)) if column_grid else torch.arange(x.shape[-1])
    xs = x[..., perm]
    ref = oracle_conv(xs.flip(-1) if reverse else xs, w, b, silu)
    ref = ref.flip(-1) if reverse else ref
    return ref[..., torch.argsort(perm)]


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


# ----------------------------------------------------------------------------------------------------
# Token orders and bidirectional pairs through the interface (backends without them: permuted copies,
# one call per direction). The triton kernels' in-place forms are checked against the same oracles in
# test_triton_scan.py.
# ----------------------------------------------------------------------------------------------------

GRID = (2, 3, 4)   # 2 extra tokens + a 3 x 4 patch grid: 14 tokens, rows != cols


def _grad_case(x: dict) -> tuple[dict, dict]:
    """The same inputs twice, as leaves: one set for wdmctl, one in float64 for the oracle."""
    ours = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    ref = {k: (v.double().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    return ours, ref


def _pair_inputs(length: int, batch: int = 2) -> dict:
    x = make_inputs(length, batch=2 * batch, channels_last=True)
    other = make_inputs(length + 1, batch=batch)
    x["z"] = x["z"][:batch]
    for k in ("A", "D", "delta_bias"):
        x[k] = torch.stack([x[k], other[k]])
    return x


@pytest.mark.parametrize("backend", ["torch", "torch-sequential"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pair", [False, True])
def test_column_order_and_pairs_match_oracle(backend, reverse, pair):
    x = _pair_inputs(14) if pair else make_inputs(14, channels_last=True)
    ours, ref = _grad_case(x)
    scan = selective_scan_pair if pair else selective_scan
    out = scan(**ours, delta_softplus=True, reverse=reverse, column_grid=GRID, backend=backend)
    expected = oracle(ref, True, reverse, GRID)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    dy = torch.randn(expected.shape, dtype=torch.float64)
    out.backward(dy.float())
    (expected * dy).sum().backward()
    for k, v in ours.items():
        if v is not None:
            torch.testing.assert_close(v.grad.double(), ref[k].grad, rtol=1e-3, atol=1e-3, msg=f"d{k}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pair", [False, True])
def test_conv_column_order_and_pairs_match_oracle(reverse, pair):
    x = torch.randn(2, 14, 6).transpose(1, 2)
    w, b = torch.randn(*((2,) if pair else ()), 6, 3), torch.randn(*((2,) if pair else ()), 6)
    conv = causal_conv1d_pair if pair else causal_conv1d
    out = conv(x, w, b, "silu", reverse, GRID, backend="torch")
    torch.testing.assert_close(out.double(), conv_oracle(x, w, b, True, reverse, GRID), rtol=1e-5, atol=1e-5)


def test_column_order_and_pair_errors_are_one_line():
    x = make_inputs(14)
    with pytest.raises(WdmError, match=r"column_grid \(2, 3, 3\) does not describe 14 tokens"):
        selective_scan(**x, column_grid=(2, 3, 3), backend="torch")
    with pytest.raises(WdmError, match=r"selective_scan_pair takes A of shape \(2, d, N\)"):
        selective_scan_pair(**x, backend="torch")
    with pytest.raises(WdmError, match=r"causal_conv1d_pair takes a weight of shape \(2, d, width\)"):
        causal_conv1d_pair(x["u"], torch.randn(5, 3), backend="torch")
    with pytest.raises(WdmError, match=r"column_grid \(0, 2, 2\) does not describe 14 tokens"):
        causal_conv1d(x["u"], torch.randn(5, 3), column_grid=(0, 2, 2), backend="torch")
