"""Our Triton selective scan and causal conv1d against the fp64 oracles of tests/test_scan.py and mamba-ssm.

The same kernels run two ways:
* on a CUDA GPU (`pytest -m gpu`): compiled, every option, L up to 4100, fp32 and bf16, vs mamba-ssm too;
* on CPU through Triton's interpreter (TRITON_INTERPRET=1) at small shapes: CI's parity tests. They need
  triton installed and an interpreter that runs with this numpy (triton 3.9 does; 3.6's fails on numpy 2.4
  when a loop bound is a kernel argument) and skip with the reason otherwise.

Errors are relative L2 norms, ||out - ref|| / ||ref||, per output and per gradient. Tolerances:
fp32 inputs 5e-5 (outputs) and 5e-4 (gradients); bf16 inputs 1e-2 against the oracle run on the same
bf16-rounded inputs (the kernel computes in fp32 and rounds once); against mamba-ssm 1e-3 (fp32) / 2e-2 (bf16).
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from test_scan import column_order, conv_oracle, make_inputs, oracle, oracle_scan

CUDA = torch.cuda.is_available()
if not CUDA:  # without a GPU the kernels can only run interpreted; must be set before triton_scan is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")



class _Modules:
    """The Triton backend's modules as one namespace: a read finds the name where it is defined; a write (what
    monkeypatch does) reaches every module that holds the name, so a patch reaches the code that uses it, and
    deleting it (monkeypatch's undo) puts the original back everywhere."""

    def __init__(self, *modules):
        object.__setattr__(self, "_modules", modules)
        object.__setattr__(self, "_originals", {})

    def __getattr__(self, name):
        for module in self._modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)

    def _set_everywhere(self, name, value):
        for module in self._modules:
            if hasattr(module, name):
                setattr(module, name, value)

    def __setattr__(self, name, value):
        self._originals.setdefault(name, getattr(self, name))
        self._set_everywhere(name, value)

    def __delattr__(self, name):
        self._set_everywhere(name, self._originals.pop(name))


try:
    import triton
    import triton.language as tl

    from wdmctl.scan import triton as triton_backend
    from wdmctl.scan.triton import common, conv, custom_ops, launch, scan, segmented, segmented_kernels

    if not CUDA and not common.INTERPRET:  # imported earlier in this process without the interpreter
        for module in (common, launch, scan, conv, custom_ops, segmented_kernels, segmented, triton_backend):
            importlib.reload(module)
    ts = _Modules(triton_backend, custom_ops, segmented, scan, conv, launch, common)
except ImportError:  # triton is not installed (the CPU venv): every test here skips
    triton = tl = ts = None

needs_triton = pytest.mark.skipif(ts is None, reason="triton is not installed")
GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
ERRORS_OUT = os.environ.get("WDM_TRITON_TEST_ERRORS")  # a JSON-lines file to record measured errors in


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64. The norm is floored at 1e-3 * sqrt(numel) (an RMS of 1e-3 per
    element): dA at L = 1 is exactly 0, and the kernel's value is fp32 rounding of cancelling O(1) terms."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-3 * ref.numel() ** 0.5)).item()


def model_layout(x: dict, batch: int, d: int, length: int) -> dict:
    """The same values re-laid-out as the model passes them: u, delta (batch, d, L) views of (batch, L, d)
    memory, z a view of half of a (batch, L, 2d) tensor, B and C views of a (batch, L, 2N + 3) tensor."""
    n = x["B"].shape[1]
    xz = torch.zeros(batch, length, 2 * d, dtype=x["z"].dtype)
    xz[..., d:] = x["z"].transpose(1, 2)
    proj = torch.zeros(batch, length, 3 + 2 * n, dtype=x["B"].dtype)
    proj[..., 3:3 + n], proj[..., 3 + n:] = x["B"].transpose(1, 2), x["C"].transpose(1, 2)
    return dict(x, u=x["u"].transpose(1, 2).contiguous().transpose(1, 2),
                delta=x["delta"].transpose(1, 2).contiguous().transpose(1, 2),
                z=xz[..., d:].transpose(1, 2), B=proj[..., 3:3 + n].transpose(1, 2), C=proj[..., 3 + n:].transpose(1, 2))


def scan_case(length, batch=2, d=64, n=16, dtype=torch.float32, layout="model", drop=(), softplus=True):
    """Inputs (on CPU) for one case; `drop` names optional inputs to leave out."""
    x = make_inputs(length, batch=batch, d=d, n=n)
    if not softplus:  # keep delta * A <= 0 without softplus, as the model's softplus would
        x["delta"], x["delta_bias"] = x["delta"].abs(), x["delta_bias"].abs()
    x = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    if layout == "model":
        x = model_layout(x, batch, d, length)
    elif layout == "strided":  # every other element of wider tensors: no unit stride anywhere
        x = {k: (torch.stack([v, v], -1)[..., 0] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    for k in drop:
        x[k] = None
    return x


def pair_case(length, batch=1, d=64, n=16, dtype=torch.float32):
    """Inputs of a bidirectional pair in the model's layout: u, delta, B, C with 2 * batch rows, z with batch
    rows, A, D, delta_bias with a leading axis of 2 (different values per direction)."""
    x = scan_case(length, batch=2 * batch, d=d, n=n, dtype=dtype)
    other = make_inputs(length + 1, batch=batch, d=d, n=n)   # another seed: the second direction's parameters
    x["z"] = x["z"][:batch]
    for k in ("A", "D", "delta_bias"):
        x[k] = torch.stack([x[k], other[k]])
    return x


def compare_with_oracle(x, device, softplus=True, reverse=False, seed=0, column_grid=None, scan=None):
    """Triton output and gradients vs the fp64 oracle on the same (rounded) inputs: {name: rel error}.
    `scan`: the entry to test (default: ts.selective_scan_triton, looked up at the call, so patches reach it)."""
    ref_in = {k: (v.double().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    ref = oracle(ref_in, softplus, reverse, column_grid)
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (ref * dy).sum().backward()
    ins = {k: (v.to(device).detach().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    out = (scan or ts.selective_scan_triton)(**ins, delta_softplus=softplus, reverse=reverse, column_grid=column_grid)
    assert out.dtype == x["u"].dtype and out.shape == ref.shape
    out.backward(dy.to(device=device, dtype=out.dtype))
    errs = {"y": rel(out, ref)}
    for k in GRADS:
        if x[k] is not None:
            assert ins[k].grad is not None and ins[k].grad.shape == x[k].shape, k
            errs["d" + k] = rel(ins[k].grad, ref_in[k].grad)
    return errs


def check(errs: dict, tol_out: float, tol_grad: float, label: str) -> None:
    if ERRORS_OUT:
        with open(ERRORS_OUT, "a") as fh:
            fh.write(json.dumps({"case": label, **{k: float(f"{v:.3g}") for k, v in errs.items()}}) + "\n")
    bad = {k: v for k, v in errs.items() if v > (tol_out if k == "y" else tol_grad)}
    assert not bad, f"{label}: errors over tolerance {bad} (all: {errs})"


# ----------------------------------------------------------------------------------------------------
# CPU: the interpreter (CI)
# ----------------------------------------------------------------------------------------------------

if tl is not None:
    @triton.jit
    def _probe_kernel(x_ptr, n):
        for i in range(n):  # a loop bounded by a kernel argument, like the scan's time loop
            tl.store(x_ptr + i, i * 1.0)


def _interpreter_problem() -> str | None:
    """Why the interpreter can't run our kernels here, or None."""
    if ts is None:
        return "triton is not installed (CI: add triton to the dev install to run these)"
    if CUDA or not ts.INTERPRET:
        return "a GPU is present: the compiled kernels are tested by the gpu tests instead"
    x = torch.zeros(3)
    try:
        _probe_kernel[(1,)](x, 3)
    except Exception as err:  # noqa: BLE001 - any failure means this triton/numpy pair can't interpret
        return f"triton {triton.__version__}'s interpreter fails here ({type(err).__name__}: {str(err)[:80]}); triton>=3.9 works"
    return None if torch.equal(x, torch.tensor([0.0, 1.0, 2.0])) else "the interpreter computed a wrong probe"


@pytest.fixture(scope="module")
def interpreter():
    problem = _interpreter_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 8 steps, so short sequences cross the backward pass's chunk boundaries."""
    monkeypatch.setattr(ts, "CHUNK", 8)


@pytest.mark.parametrize("length,reverse,layout,bd", [(1, False, "model", 64), (9, True, "contiguous", 64),
                                                      (19, False, "model", 16), (19, True, "strided", 64)])
def test_interpreter_scan_matches_oracle(interpreter, small_chunks, monkeypatch, length, reverse, layout, bd):
    # d = 5 of a 16- or 64-channel block and N = 3 padded to 4 exercise both masks
    monkeypatch.setattr(ts, "DEFAULT_SCAN_CONFIG", (bd, 1))
    monkeypatch.setattr(ts, "DEFAULT_BWD_CONFIG", (bd, 1))
    x = scan_case(length, batch=1, d=5, n=3, layout=layout)
    check(compare_with_oracle(x, "cpu", reverse=reverse), 5e-5, 5e-4, f"interp L={length} rev={reverse} {layout}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pair", [False, True])
def test_interpreter_column_order_and_pairs_match_oracle(interpreter, small_chunks, reverse, pair):
    # 2 extra tokens + a 3 x 4 grid (rows != cols, so a transposed grid would be caught); 14 tokens cross
    # one 8-step chunk boundary of the backward pass
    grid = (2, 3, 4)
    x = pair_case(14, batch=1, d=5, n=3) if pair else scan_case(14, batch=2, d=5, n=3)
    check(compare_with_oracle(x, "cpu", reverse=reverse, column_grid=grid), 5e-5, 5e-4,
          f"interp column rev={reverse} pair={pair}")


def test_interpreter_pair_without_column_order(interpreter, small_chunks):
    x = pair_case(9, batch=2, d=5, n=3)
    check(compare_with_oracle(x, "cpu", reverse=True), 5e-5, 5e-4, "interp pair")


@pytest.mark.parametrize("pair", [False, True])
def test_interpreter_token_major_copies_match_the_model_layout(interpreter, small_chunks, pair):
    """Contiguous (batch, d, L) inputs with `token_major_copies`: the kernels run on token-major copies, so the
    output and every gradient (back through the copies to the contiguous leaves) are bit-identical to the call
    on the model's layout, and y comes back as a view of token-major memory."""
    x = pair_case(11, batch=1, d=5, n=3) if pair else scan_case(11, batch=2, d=5, n=3)
    contiguous = {k: v.contiguous() for k, v in x.items()}
    assert contiguous["u"].stride(2) == 1 and x["u"].stride(1) == 1
    dy = None
    results = []
    for inputs, copies in ((x, False), (contiguous, True)):
        leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}   # the inputs' own strides
        y = ts.selective_scan_triton(**leaves, delta_softplus=True, reverse=True, token_major_copies=copies)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) if dy is None else dy
        y.backward(dy)
        results.append((y, {k: v.grad for k, v in leaves.items()}, leaves))
    (y_model, grads_model, _), (y_copies, grads_copies, leaves) = results
    assert y_copies.stride(1) == 1 and leaves["u"].stride(2) == 1
    assert torch.equal(y_copies, y_model)
    for k in GRADS:
        assert torch.equal(grads_copies[k], grads_model[k]), k


@needs_triton
def test_token_major_copies_only_what_is_not_channel_contiguous():
    token_major = ts.token_major
    channel_contiguous = torch.randn(2, 7, 5).transpose(1, 2)   # (2, 5, 7) view of (2, 7, 5) memory
    assert token_major(channel_contiguous) is channel_contiguous and token_major(None) is None
    contiguous = torch.randn(2, 5, 7)
    copied = token_major(contiguous)
    assert copied.stride(1) == 1 and torch.equal(copied, contiguous)
    one_channel = torch.randn(2, 1, 7)
    assert token_major(one_channel) is one_channel


def test_bench_scan_times_token_major_copies_for_triton_only():
    # `bench scan --layouts model,contiguous,contiguous-token-major`: the calling layout is a triton row on
    # contiguous inputs, compared with mamba_ssm on the same contiguous inputs
    from wdmctl.bench.scan import _speedups, _variants, scan_inputs

    every = ("model", "contiguous", "contiguous-token-major")
    assert [v[0] for v in _variants("triton", every, (None,))] == list(every)
    assert [v[0] for v in _variants("mamba_ssm", every, (None,))] == ["model", "contiguous"]
    assert [v[0] for v in _variants("triton-segmented", every, (None,))] == ["model", "contiguous"]
    x = scan_inputs(1, 4, 6, 2, torch.float32, "contiguous-token-major", device="cpu")
    assert x["u"].is_contiguous() and x["z"].is_contiguous()
    shape = dict(batch=64, d_inner=3072, length=258)
    rows = [dict(shape, backend=b, layout=layout, forward_ms=1.0, forward_backward_ms=ms) for b, layout, ms in (
        ("mamba_ssm", "model", 10.0), ("mamba_ssm", "contiguous", 9.0), ("triton", "model", 2.5),
        ("triton", "contiguous", 4.5), ("triton", "contiguous-token-major", 3.0))]
    (entry,) = _speedups(rows)
    assert entry["forward_backward_x"] == 3.6 and entry["mamba_ssm_best_layout"] == "contiguous"
    assert entry["forward_backward_x_contiguous_layout"] == 2.0
    assert entry["forward_backward_x_contiguous_token_major_layout"] == 3.0


def test_bench_scan_saves_every_row_as_it_comes(tmp_path, monkeypatch):
    # a device command's time limit can stop `bench scan` mid-way: --out holds the rows measured so far
    import functools
    import json

    from wdmctl.bench import scan as bench_scan
    from wdmctl.cli.bench import save_so_far

    monkeypatch.setattr(bench_scan, "available_backends", lambda device: ["torch", "triton"])
    monkeypatch.setattr(bench_scan, "scan_inputs", functools.partial(bench_scan.scan_inputs, device="cpu"))
    monkeypatch.setattr(bench_scan, "_time_scan", lambda x, backend, iters, **o: dict(forward_ms=1.0,
                                                                                   forward_backward_ms=3.0))
    out = tmp_path / "scan.json"
    seen = []

    def on_row(rows, total):
        seen.append(len(rows))
        save_so_far(str(out), "selective_scan", rows, total, key="rows")

    payload = bench_scan.benchmark_scan([(1, 4, 6), (1, 4, 9)], n=2, dtype=torch.float32, iters=1,
                                        backends=("torch", "triton", "mamba_ssm"), profile=False,
                                        layouts=("model", "contiguous"), convs=False, on_row=on_row)
    # per shape: torch in the model layout, triton in both; mamba_ssm is not usable here
    assert seen == [1, 2, 3, 4, 5, 6] and len(payload["rows"]) == 6
    saved = json.loads(out.read_text())
    assert saved["partial"] == "6 of 6 configurations" and saved["rows"] == payload["rows"]


def test_interpreter_scan_without_options(interpreter, small_chunks):
    x = scan_case(11, batch=2, d=3, n=4, layout="contiguous", drop=("z", "D", "delta_bias"), softplus=False)
    check(compare_with_oracle(x, "cpu", softplus=False), 5e-5, 5e-4, "interp no options")


def norm_modulate_case(batch, length, width, device, dtype=torch.float32):
    """Inputs as a Mamba block passes them: fp32 residual stream, shift/scale as strided views."""
    gen = torch.Generator().manual_seed(width)
    x = (torch.randn(batch, length, width, generator=gen) * 3).to(device)
    mod = (torch.randn(batch, 3, width, generator=gen) * 0.5).to(device)
    norm = torch.nn.RMSNorm(width, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(width, generator=gen))
    dh = torch.randn(batch, length, width, generator=gen).to(device, dtype)
    return x, mod, norm, dh


def run_norm_modulate(fn, x, mod, norm, dh, **kwargs):
    x, mod = x.clone().requires_grad_(True), mod.clone().requires_grad_(True)
    norm.zero_grad(set_to_none=True)
    shift, scale, _ = mod.unbind(1)
    out = fn(x, norm, shift, scale, **kwargs)
    out.backward(dh.to(out.dtype))
    return {"out": out.float(), "dx": x.grad, "dmod": mod.grad, "dweight": norm.weight.grad.clone()}


def test_interpreter_norm_modulate_matches_torch(interpreter, monkeypatch):
    # the fused RMSNorm + adaLN kernels: 11 tokens (a partial block of 8), width 40 (padded to 64)
    from wdmctl.models.norm_modulate import norm_modulate, reference_norm_modulate

    from wdmctl.models import norm_modulate as module

    case = norm_modulate_case(2, 11, 40, "cpu")
    ref = run_norm_modulate(reference_norm_modulate, *case)
    monkeypatch.setattr(module, "reference_norm_modulate", None)  # the fused path must not fall back
    got = run_norm_modulate(norm_modulate, *case, interpret=True)
    for k in ref:
        assert rel(got[k], ref[k]) < 2e-6, (k, rel(got[k], ref[k]))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
@pytest.mark.parametrize("autocast", [False, True])
def test_gpu_norm_modulate_matches_torch(autocast):
    # under bf16 autocast the fused output is bf16 (what in_proj would cast to); the reference casts once
    from wdmctl.models.norm_modulate import norm_modulate, reference_norm_modulate

    case = norm_modulate_case(4, 258, 768, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        ref = run_norm_modulate(reference_norm_modulate, *case)
        got = run_norm_modulate(norm_modulate, *case)
    tol = 8e-3 if autocast else 2e-6
    assert got["out"].dtype == torch.float32  # (as returned by run_norm_modulate)
    for k in ref:
        assert rel(got[k], ref[k].to(got[k].dtype)) < tol, (k, rel(got[k], ref[k]))


def run_gated_residual(fn, device, h_dtype, **kwargs):
    """Output and gradients of fn(x, gate, h) as a Mamba block calls it: fp32 stream x, gate a strided view of
    the (batch, 3, width) modulation, h in the mixer's dtype; 11 tokens (a partial block), width 40."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, 40, generator=gen).to(device).requires_grad_(True)
    mod = torch.randn(2, 3, 40, generator=gen).to(device).requires_grad_(True)
    h = torch.randn(2, 11, 40, generator=gen).to(device, h_dtype).requires_grad_(True)
    out = fn(x, mod.unbind(1)[2], h, **kwargs)
    out.backward(torch.randn(out.shape, generator=gen).to(device, out.dtype))
    return {"out": out, "dx": x.grad, "dmod": mod.grad, "dh": h.grad}


def test_interpreter_gated_residual_matches_torch(interpreter, monkeypatch):
    from wdmctl.models import norm_modulate as module

    ref = run_gated_residual(module.reference_gated_residual, "cpu", torch.float32)
    monkeypatch.setattr(module, "reference_gated_residual", None)  # the fused path must not fall back
    got = run_gated_residual(module.gated_residual, "cpu", torch.float32, interpret=True)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and rel(got[k], ref[k]) < 1e-6, (k, rel(got[k], ref[k]))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
def test_gpu_gated_residual_matches_torch(h_dtype):
    # h in bf16 (the mixer's output under autocast) and an fp32 stream: the output stays fp32, dh is bf16
    from wdmctl.models.norm_modulate import gated_residual, reference_gated_residual

    ref = run_gated_residual(reference_gated_residual, "cuda", h_dtype)
    got = run_gated_residual(gated_residual, "cuda", h_dtype)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and rel(got[k], ref[k]) < 1e-6, (k, rel(got[k], ref[k]))


@pytest.mark.parametrize("width,reverse", [(2, False), (4, True)])
def test_interpreter_conv_matches_oracle(interpreter, width, reverse):
    conv_parity("cpu", width, reverse, silu=True, layout="model")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pair", [False, True])
def test_interpreter_conv_column_order_and_pairs_match_oracle(interpreter, reverse, pair):
    conv_parity("cpu", 3, reverse, silu=True, layout="model", length=14, column_grid=(2, 3, 4), pair=pair)


@pytest.mark.parametrize("drop,grid", [((), [2, 3, 3]), (("z", "D", "delta_bias"), [])])
def test_interpreter_custom_ops_pass_opcheck(interpreter, small_chunks, drop, grid):
    # the torch.compile path: schema, fake (shape/stride) implementations and autograd registration
    x = scan_case(11, batch=2, d=5, n=3, layout="model", drop=drop)
    x = {k: (v.detach().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, True, grid)
    assert all(r == "SUCCESS" for r in torch.library.opcheck(ts._scan_op, args).values())
    xc = torch.randn(2, 11, 6).transpose(1, 2).requires_grad_(True)
    conv_args = (xc, torch.randn(6, 3, requires_grad=True), torch.randn(6, requires_grad=True), True, False, grid)
    assert all(r == "SUCCESS" for r in torch.library.opcheck(ts._conv_op, conv_args).values())


def test_interpreter_pair_custom_ops_pass_opcheck(interpreter, small_chunks):
    # a bidirectional pair: twice the rows, parameters with a leading axis of 2, z shared
    pair = pair_case(11, batch=1, d=5, n=3)
    args = (*(v.requires_grad_(True) for v in pair.values()), True, False, [2, 3, 3])
    assert all(r == "SUCCESS" for r in torch.library.opcheck(ts._scan_op, args).values())
    xc = torch.randn(1, 11, 6).transpose(1, 2).requires_grad_(True)
    conv_args = (xc, torch.randn(2, 6, 3, requires_grad=True), torch.randn(2, 6, requires_grad=True), True, True, [])
    assert all(r == "SUCCESS" for r in torch.library.opcheck(ts._conv_op, conv_args).values())


def check_model_fusions(device, scan, depth, monkeypatch):
    """The whole model: triton with the column order read in place and one-launch pairs, against the same
    kernels behind transposed copies and one call per direction (triton-unfused), and the torch backend;
    asserts the fused forms reached the kernels. cycle at depth 2 has all four orders; bidirectional has
    row and column pairs."""
    from wdmctl.models.wdmamba import WDMamba

    torch.manual_seed(0)
    model = WDMamba(arch="umamba", sample_size=8, in_channels=3, patch_size=2, width=16, depth=depth,
                    num_classes=3, d_state=4, expand=1, scan=scan).to(device)
    x = torch.randn(2, 3, 8, 6, device=device)   # a 4 x 3 patch grid
    t, y = torch.tensor([5.0, 700.0], device=device), torch.tensor([0, 3], device=device)
    launches = []
    scan_forward = ts._scan_forward

    def spy(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, column_grid=(), packed=None):
        launches.append((A.dim() == 3, bool(column_grid)))  # which forms reach the kernels: (pair, column order)
        return scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, column_grid, packed)

    monkeypatch.setattr(ts, "_scan_forward", spy)
    results = outputs_and_gradients_per_backend(model, x, t, y, after_each=launches.append)
    fused, unfused = launches[:launches.index("triton")], launches[launches.index("triton") + 1:launches.index("triton-unfused")]
    assert (True, True) in fused if scan == "bidirectional" else (False, True) in fused
    assert all(form == (False, False) for form in unfused)
    assert_backends_agree(results)


def outputs_and_gradients_per_backend(model, x, t, y, after_each=lambda backend: None):
    """The model's output and every parameter's gradient on triton, triton-unfused and torch."""
    results = {}
    for backend in ("triton", "triton-unfused", "torch"):
        model.set_scan_backend(backend)
        model.zero_grad(set_to_none=True)
        out = model(x, t, y)
        out.square().mean().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in model.parameters()]
        after_each(backend)
    return results


def assert_backends_agree(results):
    for backend in ("triton-unfused", "torch"):
        for fused, other in zip(results["triton"], results[backend]):
            torch.testing.assert_close(fused, other, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scan,depth", [("bidirectional", 1), ("cycle", 2)])
def test_interpreter_model_fusions_match_unfused_and_torch(interpreter, small_chunks, monkeypatch, scan, depth):
    from wdmctl.scan import BACKENDS

    for name in ("triton", "triton-unfused"):   # the interpreter runs on CPU tensors
        monkeypatch.setattr(BACKENDS[name], "is_available", lambda: True)
        monkeypatch.setattr(BACKENDS[name], "devices", ("cpu",))
    check_model_fusions("cpu", scan, depth, monkeypatch)


ARCHITECTURE_OPTIONS = [dict(token_order="zigzag"), dict(pad_tokens=2), dict(mixer_conv="2d"),
                        dict(scan="bidirectional", mixer_conv="2d"), dict(scan="bidirectional", mixer_conv="none"),
                        dict(scan="bidirectional", token_order="zigzag", pad_tokens=1)]


def check_options_on_backends(device, options):
    """Issue 15's architecture options give the same outputs and gradients on every backend: triton (the
    2-D conv with the column order read in place, zigzag and pads through the model's scan-order copies),
    triton-unfused and torch."""
    from wdmctl.models.wdmamba import WDMamba

    torch.manual_seed(0)
    model = WDMamba(arch="umamba", sample_size=8, in_channels=3, patch_size=2, width=16, depth=2,
                    num_classes=3, d_state=4, expand=1, **options).to(device)
    x = torch.randn(2, 3, 8, 6, device=device)   # a 4 x 3 patch grid
    t, y = torch.tensor([5.0, 700.0], device=device), torch.tensor([0, 3], device=device)
    assert_backends_agree(outputs_and_gradients_per_backend(model, x, t, y))


@pytest.mark.parametrize("options", ARCHITECTURE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_interpreter_architecture_options_match_across_backends(interpreter, small_chunks, monkeypatch, options):
    from wdmctl.scan import BACKENDS

    for name in ("triton", "triton-unfused"):   # the interpreter runs on CPU tensors
        monkeypatch.setattr(BACKENDS[name], "is_available", lambda: True)
        monkeypatch.setattr(BACKENDS[name], "devices", ("cpu",))
    check_options_on_backends("cpu", options)


@pytest.mark.parametrize("options", ARCHITECTURE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_architecture_options_match_across_backends(options):
    check_options_on_backends("cuda", options)


def test_interpreter_compiled_mixer_matches_eager(interpreter, small_chunks):
    # conv + scan as a Mamba branch runs them, traced by Dynamo/AOTAutograd: the custom ops stand in
    x = scan_case(10, batch=2, d=5, n=3, layout="model")
    w, b = torch.randn(5, 3), torch.randn(5)

    def branch(u, delta, A, B, C, D, z, delta_bias, weight, bias):
        u = ts.causal_conv1d_triton(u, weight, bias, "silu", reverse=True)
        return ts.selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, reverse=True)

    results = []
    for fn in (branch, torch.compile(branch, backend="aot_eager", fullgraph=True)):
        ins = [v.detach().clone().requires_grad_(True) for v in (*x.values(), w, b)]
        out = fn(*ins)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append([out.detach(), *(v.grad for v in ins)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)   # the same kernels, bit for bit


def test_interpreter_compiled_bidirectional_mixer_matches_eager(interpreter, small_chunks, monkeypatch):
    # model.compile() on the fused forms: a bidirectional mixer in column order runs the pair custom ops
    # (fake shapes with 2 x batch rows), traced without graph breaks, bit for bit as eager
    from wdmctl.models.wdmamba import MambaMixer
    from wdmctl.scan import BACKENDS

    monkeypatch.setattr(BACKENDS["triton"], "is_available", lambda: True)
    monkeypatch.setattr(BACKENDS["triton"], "devices", ("cpu",))
    torch.manual_seed(0)
    mixer = MambaMixer(16, d_state=4, expand=1, bidirectional=True)
    mixer.scan_options = {"backend": "triton"}
    x = torch.randn(2, 14, 16)
    results = []
    for fn in (mixer, torch.compile(mixer, backend="aot_eager", fullgraph=True)):
        mixer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = fn(xi, order="column_reverse", grid=(2, 3, 4))
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append([out.detach(), xi.grad, *(p.grad.clone() for p in mixer.parameters())])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def conv_parity(device, width, reverse, silu, layout, dtype=torch.float32, length=11, d=6, batch=2,
                column_grid=None, pair=False):
    """Triton conv output and gradients vs the fp64 oracle; asserts within 1e-5 (fp32)."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(batch, length, d, generator=g).transpose(1, 2) if layout == "model" else torch.randn(batch, d, length, generator=g)
    directions = (2,) if pair else ()
    w, b = torch.randn(*directions, d, width, generator=g), torch.randn(*directions, d, generator=g)
    xd, wd, bd = (v.double().requires_grad_(True) for v in (x.to(dtype), w, b))
    ref = conv_oracle(xd, wd, bd, silu, reverse, column_grid)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (ref * dy).sum().backward()
    xs, ws, bs = (v.to(device).requires_grad_(True) for v in (x.to(dtype), w, b))
    out = ts.causal_conv1d_triton(xs, ws, bs, "silu" if silu else None, reverse=reverse, column_grid=column_grid)
    assert out.dtype == dtype and out.shape == ref.shape
    out.backward(dy.to(device=device, dtype=dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    errs = {"y": rel(out, ref), "dx": rel(xs.grad, xd.grad), "dweight": rel(ws.grad, wd.grad), "dbias": rel(bs.grad, bd.grad)}
    check(errs, tol, tol, f"conv {device} w={width} rev={reverse} silu={silu} {layout} {dtype} grid={column_grid} pair={pair}")


def run_ptx_on_warp(asm: str, inputs: list[list[float]]) -> list[list[float]]:
    """Execute the few PTX instructions lane_sum_asm emits on 32 simulated lanes (fp32 adds, lane-id
    predicates, selects, butterfly shuffles); inputs[k][lane] is operand $NP+k. Returns outputs[k][lane]
    (a KeyError if the PTX leaves an output unwritten)."""
    import numpy as np

    np_ = len(inputs)
    regs = [dict() for _ in range(32)]
    for lane in range(32):
        regs[lane].update({f"${np_ + k}": np.float32(inputs[k][lane]) for k in range(np_)})
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith((".reg", "//")):
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        if op == "shfl.sync.bfly.b32":
            assert a[3:] == ["0x1f", "0xffffffff"], line
            src = [regs[lane][a[1]] for lane in range(32)]
            for lane in range(32):
                regs[lane][a[0]] = src[lane ^ int(a[2])]
            continue
        for lane, r in enumerate(regs):
            if op == "mov.u32" and a[1] == "%laneid":
                r[a[0]] = lane
            elif op == "and.b32":
                r[a[0]] = r[a[1]] & int(a[2])
            elif op == "setp.ne.u32":
                r[a[0]] = r[a[1]] != int(a[2])
            elif op == "selp.f32":
                r[a[0]] = r[a[1]] if r[a[3]] else r[a[2]]
            elif op == "add.f32":
                r[a[0]] = np.float32(r[a[1]] + r[a[2]])
            elif op == "mov.b32":
                r[a[0]] = r[a[1]]
            else:
                raise AssertionError(f"unexpected PTX: {line}")
    return [[float(regs[lane][f"${k}"]) for lane in range(32)] for k in range(np_)]


@needs_triton
@pytest.mark.parametrize("np_", [1, 2, 4, 8, 16, 32])
def test_lane_sum_ptx_sums_each_state_over_the_warp(np_):
    # the PTX the backward kernels use for dB / dC on the GPU (the interpreter can't run PTX): lane l must end
    # with the 32-lane total of state l >> (5 - log2 NP), in every output slot, with NP/2 + ... + 1 reduce-
    # scatter shuffles plus 5 - log2 NP butterflies (instead of tl.sum's 5 NP)
    asm, io = ts.lane_sum_asm(np_)
    assert io.split(",") == ["=f"] * np_ + ["f"] * np_
    assert asm.count("shfl.sync") == (np_ - 1) + (5 - (np_.bit_length() - 1))
    gen = torch.Generator().manual_seed(np_)
    values = torch.randn(np_, 32, generator=gen, dtype=torch.float64).float()
    outputs = run_ptx_on_warp(asm, values.tolist())
    totals = values.double().sum(1)
    shift = 5 - (np_.bit_length() - 1)
    for lane in range(32):
        for k in range(np_):
            assert outputs[k][lane] == pytest.approx(totals[lane >> shift].item(), abs=1e-5), (lane, k)
    with pytest.raises(ValueError, match="power of two"):
        ts.lane_sum_asm(12)


@needs_triton
def test_backend_conv_uses_causal_conv1d_only_for_forward_scans(monkeypatch):
    # causal-conv1d has no reverse; flipping copies around it cost more than its kernel saves
    from wdmctl.scan import mamba_ssm_scan

    calls = []
    monkeypatch.setattr(mamba_ssm_scan, "_has", lambda name: True)
    monkeypatch.setattr(mamba_ssm_scan, "causal_conv1d_mamba", lambda *a, **k: calls.append("causal_conv1d"))
    monkeypatch.setattr(ts, "causal_conv1d_triton", lambda *a, **k: calls.append("triton"))
    x, w = torch.zeros(1, 4, 5), torch.zeros(4, 3)
    ts.causal_conv1d_backend(x, w, None, "silu", reverse=False)
    ts.causal_conv1d_backend(x, w, None, "silu", reverse=True)
    assert calls == ["causal_conv1d", "triton"]


@needs_triton
def test_lane_sum_is_used_only_where_warps_hold_whole_channels():
    # the PTX path assumes lane = channel % 32 with all states of a channel in its thread
    assert ts._lane_sum_flags((32, 1), 16)["LANE_SUM"] == ("" if ts.INTERPRET else ts.lane_sum_asm(16)[0])
    assert ts._lane_sum_flags((16, 1), 16)["LANE_SUM"] == ""     # states split over 2 lanes
    assert ts._lane_sum_flags((64, 1), 16)["LANE_SUM"] == ""     # two channels per thread
    assert ts._lane_sum_flags((32, 1), 64)["LANE_SUM"] == ""     # more states than lanes
    off = dict(LANE_SUM="", LANE_SUM_IO="")
    assert ts._partial_rows((64, 2), 100, off) == 2 and ts._partial_rows((64, 2), 100, dict(LANE_SUM="x")) == 4
    # a register cap is a launch option; the lane layout is the same with or without it
    assert ts._launch_options((32, 1, 168)) == {"num_warps": 1, "maxnreg": 168}
    assert ts._launch_options((64, 2)) == {"num_warps": 2}
    assert ts._lane_sum_flags((32, 1, 168), 16) == ts._lane_sum_flags((32, 1), 16)


# ----------------------------------------------------------------------------------------------------
# GPU: the compiled kernels
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 7, 64, 258, 1026, 4100])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_fp32_matches_oracle(length, reverse):
    x = scan_case(length, layout="model")
    check(compare_with_oracle(x, "cuda", reverse=reverse), 5e-5, 5e-4, f"gpu fp32 L={length} rev={reverse}")


@pytest.mark.parametrize("length", [7, 258, 1026])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_bf16_matches_oracle(length, reverse):
    x = scan_case(length, dtype=torch.bfloat16, layout="model")
    check(compare_with_oracle(x, "cuda", reverse=reverse), 1e-2, 1e-2, f"gpu bf16 L={length} rev={reverse}")


@pytest.mark.parametrize("dtype,tol_out,tol_grad", [(torch.float32, 5e-5, 5e-4), (torch.bfloat16, 1e-2, 1e-2)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("cfg", [(64, 2), (32, 1, 128)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_column_order_and_pairs_match_oracle(monkeypatch, dtype, tol_out, tol_grad, reverse, pair, cfg):
    # the model's 258 tokens (2 extra + 16 x 16); (32, 1, 128) is the tuner's usual choice (PTX lane sums,
    # capped registers), (64, 2) the tl.sum path; d = 96 leaves a partial block
    monkeypatch.setattr(ts, "DEFAULT_SCAN_CONFIG", cfg[:2])
    monkeypatch.setattr(ts, "DEFAULT_BWD_CONFIG", cfg)
    x = pair_case(258, batch=1, d=96, dtype=dtype) if pair else scan_case(258, batch=2, d=96, dtype=dtype)
    check(compare_with_oracle(x, "cuda", reverse=reverse, column_grid=(2, 16, 16)), tol_out, tol_grad,
          f"gpu column {dtype} rev={reverse} pair={pair} cfg={cfg}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_conv_column_order_and_pairs_match_oracle(reverse, pair):
    conv_parity("cuda", 3, reverse, True, "model", length=258, d=70, column_grid=(2, 16, 16), pair=pair)


@pytest.mark.parametrize("scan,depth", [("bidirectional", 1), ("cycle", 2)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_model_fusions_match_unfused_and_torch(monkeypatch, scan, depth):
    check_model_fusions("cuda", scan, depth, monkeypatch)


@pytest.mark.parametrize("drop,softplus", [(("z",), True), (("delta_bias",), True), (("D",), True), ((), False),
                                           (("z", "delta_bias", "D"), False)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_optional_inputs(drop, softplus):
    x = scan_case(258, layout="model", drop=drop, softplus=softplus)
    check(compare_with_oracle(x, "cuda", softplus=softplus), 5e-5, 5e-4, f"gpu drop={drop} softplus={softplus}")


@pytest.mark.parametrize("layout,d,n", [("contiguous", 64, 16), ("strided", 64, 16), ("model", 37, 12),
                                        ("model", 70, 4), ("contiguous", 40, 32), ("model", 33, 1)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_layouts_and_padding(layout, d, n):
    # 37 channels: a partial channel block; N = 12: states padded to 16; N = 1, 4, 32: the PTX channel sum's
    # other lane-to-state maps, with partial 32-channel groups
    x = scan_case(130, d=d, n=n, layout=layout)
    check(compare_with_oracle(x, "cuda", reverse=True), 5e-5, 5e-4, f"gpu {layout} d={d} n={n}")


@pytest.mark.parametrize("fwd_cfg,bwd_cfg", [
    (f, ts.BWD_CONFIGS[i % len(ts.BWD_CONFIGS)]) for i, f in enumerate(ts.FWD_CONFIGS)] if ts else [])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_every_tuning_config(monkeypatch, fwd_cfg, bwd_cfg):
    # the autotuner may pick any of these on the benchmark's shapes: each must be right (bf16 inputs with
    # every option, as the benchmark times them, so the compiled kernels are the same)
    monkeypatch.setattr(ts, "DEFAULT_SCAN_CONFIG", fwd_cfg)
    monkeypatch.setattr(ts, "DEFAULT_BWD_CONFIG", bwd_cfg)
    x = scan_case(130, d=256, dtype=torch.bfloat16, layout="model")
    check(compare_with_oracle(x, "cuda"), 1e-2, 1e-2, f"gpu config fwd={fwd_cfg} bwd={bwd_cfg}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_output_layout_and_determinism():
    # channel-contiguous inputs give channel-contiguous outputs (what the model's out_proj wants), and two
    # runs agree bit for bit (partial sums, no atomics)
    x = {k: (v.cuda() if v is not None else None) for k, v in scan_case(300, batch=4, d=256, dtype=torch.bfloat16).items()}
    leaves = [{k: v.detach().requires_grad_(True) for k, v in x.items()} for _ in range(2)]
    outs = []
    for ins in leaves:
        out = ts.selective_scan_triton(**ins, delta_softplus=True)
        out.float().square().sum().backward()
        outs.append(out)
    assert outs[0].stride(1) == 1 and leaves[0]["u"].grad.stride(1) == 1
    assert torch.equal(outs[0], outs[1])
    for k in GRADS:
        assert torch.equal(leaves[0][k].grad, leaves[1][k].grad), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [258, 1026])
@pytest.mark.parametrize("triton_backend", ["triton-plain", "triton-segmented"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_matches_mamba_ssm(dtype, length, triton_backend):
    # both kernel paths by name: `triton` picks between them by shape (segmented.segments_pay)
    pytest.importorskip("mamba_ssm")
    from wdmctl.bench.scan import scan_inputs

    x = scan_inputs(4, 256, length, 16, dtype, "model", seed=length)
    dy = torch.randn(4, 256, length, device="cuda", dtype=dtype)
    results = []
    for backend in ("mamba_ssm", triton_backend):
        ins = {k: v.detach().requires_grad_(True) for k, v in x.items()}
        from wdmctl.scan import selective_scan

        out = selective_scan(**ins, delta_softplus=True, backend=backend)
        out.backward(dy)
        results.append((out, {k: ins[k].grad for k in GRADS}))
    (ref, ref_g), (out, out_g) = results
    errs = {"y": rel(out, ref), **{"d" + k: rel(out_g[k], ref_g[k]) for k in GRADS}}
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    check(errs, tol, tol, f"gpu {triton_backend} vs mamba_ssm {dtype} L={length}")


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_conv_matches_oracle(width, reverse, silu):
    conv_parity("cuda", width, reverse, silu, "model", length=300, d=70)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_conv_matches_causal_conv1d():
    pytest.importorskip("causal_conv1d")
    from wdmctl.scan.mamba_ssm_scan import causal_conv1d_mamba

    x = torch.randn(4, 300, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    w, b = torch.randn(128, 4, device="cuda") * 0.3, torch.randn(128, device="cuda")
    dy = torch.randn(4, 128, 300, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn in (causal_conv1d_mamba, ts.causal_conv1d_triton):
        xs, ws, bs = (v.detach().requires_grad_(True) for v in (x, w, b))
        out = fn(xs, ws, bs, "silu")
        out.backward(dy)
        results.append((out, xs.grad, ws.grad, bs.grad))
    errs = dict(zip(("y", "dx", "dweight", "dbias"), (rel(a, r) for a, r in zip(results[1], results[0]))))
    check(errs, 1e-2, 1e-2, "gpu conv vs causal_conv1d bf16")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or ts is None, reason="needs a CUDA device and triton")
def test_gpu_backend_behind_the_interface():
    from wdmctl.scan import BACKENDS, available_backends, causal_conv1d, resolve_backend, selective_scan

    assert "triton" in available_backends("cuda")
    assert resolve_backend("triton", "cuda").name == "triton"
    best = max((BACKENDS[b] for b in available_backends("cuda")), key=lambda b: b.priority)
    assert resolve_backend("auto", "cuda") is best
    x = {k: (v.cuda() if v is not None else None) for k, v in scan_case(33).items()}
    out = selective_scan(**x, delta_softplus=True, reverse=True, backend="triton")
    ref = oracle_scan(**{k: (v.cpu() if v is not None else None) for k, v in x.items()}, delta_softplus=True, reverse=True)
    assert rel(out, ref) < 5e-5
    y = causal_conv1d(x["u"], torch.randn(64, 3, device="cuda"), None, "silu", backend="triton")
    assert y.shape == x["u"].shape
