"""CUDA-graph capture, shared by sampling (a graph per denoiser input shape) and training (a graph per
optimizer step).

PyTorch's rules for capturing: run the work eagerly first on a side stream, so that lazy allocations,
cuBLAS workspaces and Triton's autotuning happen outside the graph (nothing may be created or tuned during
capture); then record it, which runs nothing. The graph replays on the tensors it recorded, so callers copy
their inputs into static buffers before each replay.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def run_on_side_stream(fn: Callable[[], Any], times: int = 1) -> None:
    """Call `fn` `times` times on a fresh side stream, ordered after and before the current stream's work:
    the warm-up a capture needs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(stream)


def capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Record `fn` as one CUDA graph (capture runs nothing); returns the graph and what `fn` returned, whose
    tensors each replay overwrites."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
