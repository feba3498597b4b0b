"""GPU parity: mamba-ssm's kernels against our torch backend (scan, conv, whole model; forward and backward).

Run on the H100: `pytest -m gpu tests/test_gpu_backends.py`. Tolerances are mamba-ssm's own test tolerances
(tests/ops/test_selective_scan.py): fp32 rtol 6e-4 / atol 2e-3, bf16 rtol 3e-2 / atol 5e-2; the whole model is
compared by relative L2 error (fp32 < 1e-3, bf16 < 3e-2) because errors add up over 26 blocks.
"""

from __future__ import annotations

import pytest
import torch

from wdmctl.models import build_model
from wdmctl.scan import available_backends, causal_conv1d, selective_scan

pytestmark = pytest.mark.gpu

TOL = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.bfloat16: dict(rtol=3e-2, atol=5e-2)}
MODEL_REL_L2 = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _needs_mamba():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if "mamba_ssm" not in available_backends("cuda"):
        pytest.skip("mamba-ssm is not installed (pip install 'wdmctl[cuda]')")


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def scan_inputs(batch, d, length, n, dtype, channels_last):
    g = torch.Generator(device="cuda").manual_seed(length + d)
    def r(*s):
        return torch.randn(*s, device="cuda", generator=g)
    u = r(batch, length, d).transpose(1, 2) if channels_last else r(batch, d, length)
    return dict(u=u.to(dtype), delta=(0.5 * r(batch, d, length)).to(dtype), A=-torch.exp(0.5 * r(d, n)),
                B=r(batch, n, length).to(dtype), C=r(batch, n, length).to(dtype), D=r(d), z=r(batch, d, length).to(dtype),
                delta_bias=0.1 * r(d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [7, 258, 1026])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_forward_backward(dtype, length, reverse):
    x = scan_inputs(2, 64, length, 16, dtype, channels_last=length == 258)
    results = {}
    for backend in ("torch", "mamba_ssm"):
        xi = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
        out = selective_scan(**xi, delta_softplus=True, reverse=reverse, backend=backend)
        grad_out = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out).to(out.dtype)
        out.backward(grad_out)
        results[backend] = (out.detach(), {k: v.grad for k, v in xi.items()})
    torch.testing.assert_close(results["mamba_ssm"][0], results["torch"][0], **TOL[dtype])
    for k in x:
        a, b = results["mamba_ssm"][1][k], results["torch"][1][k]
        assert rel_l2(a, b) < (2e-3 if dtype == torch.float32 else 5e-2), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
def test_causal_conv1d(dtype, reverse):
    x = torch.randn(2, 256, 100, device="cuda").transpose(1, 2).contiguous().transpose(1, 2).to(dtype)
    w, b = torch.randn(256, 3, device="cuda"), torch.randn(256, device="cuda")
    outs = [causal_conv1d(x, w, b, "silu", reverse=reverse, backend=k) for k in ("torch", "mamba_ssm")]
    torch.testing.assert_close(outs[1], outs[0], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scan", ["cycle", "bidirectional"])
def test_whole_model_forward_backward(dtype, scan):
    torch.manual_seed(0)
    model = build_model("WDM-S/2", width=256, depth=2, scan=scan).cuda()
    x = torch.randn(4, 4, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    y = torch.randint(0, 1001, (4,), device="cuda")
    outs, grads = {}, {}
    for backend in ("torch", "mamba_ssm"):
        model.zero_grad(set_to_none=True)
        model.set_scan_backend(backend)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, t, y)
        out.float().pow(2).mean().backward()
        outs[backend] = out.detach().float()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel_l2(outs["mamba_ssm"], outs["torch"]) < MODEL_REL_L2[dtype]
    assert rel_l2(grads["mamba_ssm"], grads["torch"]) < 10 * MODEL_REL_L2[dtype]
