"""Selective-scan and causal-conv1d timings per backend, for `wdmctl bench scan`.

Inputs are laid out the way WD-Mamba's mixer passes them: u, delta and z are (batch, d, L) views of
(batch, L, d) memory (z a half of in_proj's output), B and C views of x_proj's (batch, L, R + 2N) output.
mamba_ssm and triton are also timed on contiguous (batch, d, L) copies, the layout mamba_ssm's kernel wants
(that is how the baseline in ../shared/device/README.md was measured, and what other callers of the interface
pass), so both layouts' numbers are on record for both; triton also as contiguous-token-major (the same
contiguous inputs copied into token-major memory first: `token_major_copies`, copies and all timed). Beside them: the causal conv1d and the 2-D local conv
(`mixer_conv = "2d"`, fused against its PyTorch expression) at the same sizes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from wdmctl.core.timing import profile_kernels
from wdmctl.scan import available_backends, selective_scan
from wdmctl.scan.mamba_ssm_scan import _has, causal_conv1d_mamba
from wdmctl.scan.torch_scan import causal_conv1d_torch

DEFAULT_SHAPES = ((64, 1024, 258), (64, 3072, 258), (64, 1024, 1026), (64, 3072, 1026))
LAYOUTS = ("model", "contiguous", "contiguous-token-major")
# a layout that is a way of calling the triton backend: the inputs' layout, and the option that says how
CALLING_LAYOUTS = {"contiguous-token-major": ("contiguous", {"token_major_copies": True})}


def input_layout(layout: str) -> str:
    """The layout of the inputs a (calling) layout's rows are timed on."""
    return CALLING_LAYOUTS.get(layout, (layout,))[0]
TORCH_MAX_ELEMENTS = 64 * 1024 * 258  # the chunked torch scan keeps (b, d, T, T, N) per chunk: small shapes only


def scan_inputs(batch: int, d: int, length: int, n: int = 16, dtype=torch.bfloat16, layout: str = "model",
                device="cuda", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random scan inputs with Mamba-like statistics (softplus(delta + bias) in [1e-3, 0.1], A = -(1..N)).

    layout "model": the strided views the model passes; "contiguous": (batch, d, L) contiguous copies
    (a calling layout, CALLING_LAYOUTS: its inputs' layout)."""
    layout = input_layout(layout)
    # on the meta device (shapes and strides only: `bench sass`) there is nothing to draw
    g = None if str(device) == "meta" else torch.Generator(device=device).manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    rank = math.ceil(d / 32)
    xz = r(batch, length, 2 * d).to(dtype)
    u = r(batch, length, d).to(dtype).transpose(1, 2)
    z = xz[..., d:].transpose(1, 2)
    proj = r(batch, length, rank + 2 * n).to(dtype)
    B, C = proj[..., rank:rank + n].transpose(1, 2), proj[..., rank + n:].transpose(1, 2)
    delta = r(batch, length, d, scale=0.1).to(dtype).transpose(1, 2)
    dt = torch.exp(torch.rand(d, generator=g, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    x = dict(u=u, delta=delta, A=-torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(d, 1),
             B=B, C=C, D=torch.ones(d, device=device), z=z, delta_bias=dt + torch.log(-torch.expm1(-dt)))
    if layout == "contiguous":
        x = {k: v.contiguous() for k, v in x.items()}
    return x


def essential_bytes(batch: int, d: int, length: int, n: int, esize: int) -> tuple[int, int]:
    """(forward, forward+backward) bytes that must cross device memory at least once: forward reads u,
    delta, z, B, C and writes y; backward also reads dy, u, delta, z, B, C and writes du, ddelta, dz, dB, dC."""
    bdl, bnl = batch * d * length * esize, batch * n * length * esize
    fwd = 4 * bdl + 2 * bnl
    bwd = 7 * bdl + 4 * bnl
    return fwd, fwd + bwd


def time_per_call(fn, calls: int = 5, groups: int = 10, warmup: int = 3) -> float:
    """Median ms per call of fn, timed with CUDA events around `calls` back-to-back calls: the steady state
    of a training loop, where the host queues work ahead of the GPU and Python overhead overlaps it."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(groups):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    times.sort()
    return times[len(times) // 2]


def _time_scan(x: dict, backend: str, iters: int, **options) -> dict[str, float]:
    """Median forward and forward+backward ms of one backend on inputs x (`options` go to the backend:
    triton-segmented's `segments`). The backward is torch.autograd.grad with respect to the inputs as given:
    no gradient accumulation into leaves, no copies into the leaves' layouts, only what the scan itself costs."""
    opts = dict(delta_softplus=True, backend=backend, **options)
    with torch.no_grad():
        fwd = time_per_call(lambda: selective_scan(**x, **opts), groups=iters)
    leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}
    dy = torch.randn_like(selective_scan(**x, **opts))

    def step():
        out = selective_scan(**leaves, **opts)
        torch.autograd.grad(out, list(leaves.values()), dy)

    both = time_per_call(step, groups=iters)
    return {"forward_ms": round(fwd, 4), "forward_backward_ms": round(both, 4)}


def benchmark_scan(shapes=DEFAULT_SHAPES, n: int = 16, dtype=torch.bfloat16, iters: int = 10,
                   backends=("torch", "mamba_ssm", "triton"), profile: bool = True, layouts=LAYOUTS,
                   segments=(None,), convs: bool = True,
                   on_row: Callable[[list[dict], int], None] | None = None) -> dict[str, Any]:
    """Scan timings for every backend and shape (one process, one GPU), plus conv1d timings and, for the
    triton backend, where its time goes (per-kernel profile). triton-segmented is timed once per entry of
    `segments` (None: its default count; the row says which S the forward and the backward ran with);
    `convs=False` leaves out the conv1d and 2-D conv tables. `on_row(rows, total)` follows every row (the CLI
    saves them, so a run stopped by a time limit keeps what it measured)."""
    usable = available_backends("cuda")
    esize = torch.empty((), dtype=dtype).element_size()
    total = len(shapes) * sum(len(_variants(b, layouts, segments)) for b in backends if b in usable)
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(rows, total)

    for batch, d, length in shapes:
        fwd_bytes, all_bytes = essential_bytes(batch, d, length, n, esize)
        for backend in backends:
            if backend not in usable:
                continue
            for layout, count in _variants(backend, layouts, segments):
                row = dict(backend=backend, layout=layout, batch=batch, d_inner=d, length=length, d_state=n,
                           dtype=str(dtype).replace("torch.", ""))
                options = dict(CALLING_LAYOUTS.get(layout, (None, {}))[1])
                if backend == "triton-segmented":
                    from wdmctl.scan.triton.common import CHUNK  # triton: heavy, optional
                    from wdmctl.scan.triton.segmented import backward_request, backward_segments, segment_count

                    row["segments"] = segment_count(batch, d, length, count)
                    # the backward's segments are whole chunks: as many or fewer (or the plain backward's
                    # one, with WDM_TRITON_SCAN_BACKWARD_SEGMENTS=1)
                    row["backward_segments"] = backward_segments(batch, d, length, backward_request(row["segments"]),
                                                                 CHUNK)[0]
                    options["segments"] = row["segments"]
                if backend == "torch" and batch * d * length > TORCH_MAX_ELEMENTS:
                    row["skipped"] = "too slow and too big for the chunked PyTorch scan at this size"
                    add(row)
                    continue
                x = scan_inputs(batch, d, length, n, dtype, layout)
                try:
                    row.update(_time_scan(x, backend, iters if backend != "torch" else 3, **options))
                except torch.OutOfMemoryError:
                    row["skipped"] = "out of memory"
                    torch.cuda.empty_cache()
                    add(row)
                    continue
                row["forward_GBps"] = round(fwd_bytes / row["forward_ms"] / 1e6, 1)
                row["forward_backward_GBps"] = round(all_bytes / row["forward_backward_ms"] / 1e6, 1)
                add(row)
                del x
    payload: dict[str, Any] = {"benchmark": "selective_scan", "rows": rows, "speedup_vs_mamba_ssm": _speedups(rows)}
    if "triton-segmented" in backends:
        payload["segmented_vs_triton"] = _segmented_speedups(rows)
    if "triton" in usable:
        from wdmctl.scan.triton.launch import tuned_configs  # here: triton is a heavy, optional dependency

        payload["triton_configs"] = {k: list(v) for k, v in tuned_configs().items()}
        if profile:
            payload["triton_profile"] = {}
            for batch, d, length in shapes:
                x = scan_inputs(batch, d, length, n, dtype, "model")
                leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}

                dy = torch.randn(batch, d, length, device="cuda", dtype=dtype)

                def step():
                    out = selective_scan(**leaves, delta_softplus=True, backend="triton")
                    torch.autograd.grad(out, list(leaves.values()), dy)

                payload["triton_profile"][f"{batch}x{d}x{length}"] = profile_kernels(step)[:12]  # the 12 slowest kernels
    if convs:
        payload["conv1d"] = benchmark_conv(shapes, dtype=dtype, iters=iters)
        payload["conv2d"] = benchmark_grid_conv(shapes, dtype=dtype, iters=iters)
    return payload


def _variants(backend: str, layouts, segments) -> list[tuple[str, int | None]]:
    """(layout, segment count) pairs to time for a backend: torch in the model's layout only, triton-segmented
    once per segment count (None: its default), the others once per layout; calling layouts for triton and
    triton-plain only."""
    layouts = [layout for layout in layouts if backend in ("triton", "triton-plain") or layout not in CALLING_LAYOUTS]
    layouts = layouts if backend != "torch" else ("model",)
    counts = segments if backend == "triton-segmented" else (None,)
    return [(layout, count) for layout in layouts for count in counts]


def _segmented_speedups(rows: list[dict]) -> list[dict]:
    """triton-segmented vs the unsegmented kernels per shape, layout and segment count: their ms / segmented's
    (> 1: faster). The unsegmented rows are triton-plain's, or triton's in a run without them (runs from
    before `triton` segmented by itself, segmented.segments_pay). `forward_segmented_backward_plain_x` composes
    the segmented forward with the plain backward (its forward+backward minus its forward), what
    WDM_TRITON_SCAN_BACKWARD_SEGMENTS=1 runs: an estimate from two measured rows, not a timing of its own."""
    base_backend = "triton-plain" if any(r["backend"] == "triton-plain" for r in rows) else "triton"
    plain = {(r["batch"], r["d_inner"], r["length"], r["layout"]): r for r in rows
             if r["backend"] == base_backend and "forward_ms" in r}
    out = []
    for row in rows:
        base = plain.get((row["batch"], row["d_inner"], row["length"], row["layout"]))
        if row["backend"] != "triton-segmented" or "forward_ms" not in row or base is None:
            continue
        out.append({"shape": f"{row['batch']}x{row['d_inner']}x{row['length']}", "layout": row["layout"],
                    "segments": row["segments"],
                    "forward_x": round(base["forward_ms"] / row["forward_ms"], 2),
                    "forward_backward_x": round(base["forward_backward_ms"] / row["forward_backward_ms"], 2),
                    "forward_segmented_backward_plain_x": round(base["forward_backward_ms"] / (
                        row["forward_ms"] + base["forward_backward_ms"] - base["forward_ms"]), 2)})
    return out


def _speedups(rows: list[dict]) -> list[dict]:
    """triton vs mamba_ssm per shape: triton in the model's layout against mamba_ssm's best layout (issue 16's
    target), and each layout against the same layout."""
    out = []
    keyed = {}
    for row in rows:
        if "forward_ms" in row:
            keyed.setdefault((row["batch"], row["d_inner"], row["length"]), {})[(row["backend"], row["layout"])] = row
    for shape, by in keyed.items():
        tri = by.get(("triton", "model"))
        mambas = [r for (b, _), r in by.items() if b == "mamba_ssm"]
        if tri is None or not mambas:
            continue
        best = min(mambas, key=lambda r: r["forward_backward_ms"])
        entry = {
            "shape": "x".join(map(str, shape)),
            "forward_x": round(min(r["forward_ms"] for r in mambas) / tri["forward_ms"], 2),
            "forward_backward_x": round(best["forward_backward_ms"] / tri["forward_backward_ms"], 2),
            "mamba_ssm_best_layout": best["layout"],
        }
        for layout in LAYOUTS:   # a calling layout against mamba_ssm on the same inputs
            mine = by.get(("triton", layout))
            theirs = by.get(("mamba_ssm", input_layout(layout)))
            if mine and theirs:
                entry[f"forward_backward_x_{layout.replace('-', '_')}_layout"] = round(
                    theirs["forward_backward_ms"] / mine["forward_backward_ms"], 2)
        out.append(entry)
    return out


def benchmark_conv(shapes=DEFAULT_SHAPES, width: int = 4, dtype=torch.bfloat16, iters: int = 10) -> list[dict]:
    """Causal conv1d + SiLU forward and forward+backward ms: torch, causal-conv1d (via mamba_ssm's route)
    and triton, on a (batch, d, L) view of (batch, L, d) memory like the model's."""
    impls = {"torch": causal_conv1d_torch}
    if _has("causal_conv1d"):
        impls["causal_conv1d"] = causal_conv1d_mamba
    if "triton" in available_backends("cuda"):
        from wdmctl.scan.triton import causal_conv1d_triton  # here: triton is a heavy, optional dependency

        impls["triton"] = causal_conv1d_triton
    rows = []
    for batch, d, length in shapes:
        x = torch.randn(batch, length, 2 * d, device="cuda", dtype=dtype)[..., :d].transpose(1, 2)
        w = torch.randn(d, width, device="cuda") * 0.3
        b = torch.randn(d, device="cuda") * 0.1
        for name, fn in impls.items():
            with torch.no_grad():
                fwd = time_per_call(lambda: fn(x, w, b, "silu"), groups=iters)
            xs, ws, bs = (v.detach().requires_grad_(True) for v in (x, w, b))
            dy = torch.randn(batch, d, length, device="cuda", dtype=dtype)

            def step():
                torch.autograd.grad(fn(xs, ws, bs, "silu"), [xs, ws, bs], dy)

            both = time_per_call(step, groups=iters)
            rows.append(dict(impl=name, batch=batch, d=d, length=length, width=width,
                             forward_ms=round(fwd, 4), forward_backward_ms=round(both, 4)))
    return rows


def benchmark_grid_conv(shapes=DEFAULT_SHAPES, dtype=torch.bfloat16, iters: int = 10, extra: int = 2) -> list[dict]:
    """The 2-D local conv + SiLU forward and forward+backward ms under autocast, fused (Triton) against its
    PyTorch expression, on the model's input (in_proj's half: strided (batch, L, d) tokens), single and as a
    pair (both directions' weights). The tokens are `extra` + the largest square grid that fits in L (the
    class-conditional model's 258 = 2 + 16^2 and 1026 = 2 + 32^2 exactly)."""
    from wdmctl.models.grid_conv import grid_conv_silu, reference_grid_conv_silu

    rows = []
    for batch, d, length in shapes:
        side = math.isqrt(length - extra)
        grid = (extra, side, side)
        x = torch.randn(batch, extra + side * side, 2 * d, device="cuda", dtype=dtype)[..., :d]
        for pair in (False, True):
            directions = (2,) if pair else ()
            w = torch.randn(*directions, d, 1, 3, 3, device="cuda") * 0.3
            b = torch.randn(*directions, d, device="cuda") * 0.1
            dy = torch.randn((2 if pair else 1) * batch, x.shape[1], d, device="cuda", dtype=dtype)
            for name, fn in (("torch", reference_grid_conv_silu), ("triton", grid_conv_silu)):
                with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                    fwd = time_per_call(lambda: fn(x, w, b, grid), groups=iters)
                xs, ws, bs = (v.detach().requires_grad_(True) for v in (x, w, b))

                def step():
                    with torch.autocast("cuda", dtype=dtype):
                        out = fn(xs, ws, bs, grid)
                    torch.autograd.grad(out, [xs, ws, bs], dy)

                both = time_per_call(step, groups=iters)
                rows.append(dict(impl=name, pair=pair, batch=batch, d=d, grid=list(grid), forward_ms=round(fwd, 4),
                                 forward_backward_ms=round(both, 4)))
    return rows
