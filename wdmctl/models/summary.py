"""Architecture summary: parameters per stage, tokens and GFLOPs of one forward pass.

FLOPs are counted from the shapes each layer sees in a forward pass on the meta device (no memory, no
compute): 2*in*out per token for Linear, 2*k*k*in*out/groups per output pixel for convolutions, and for the
selective scan 9 per state update (discretise 2 incl. exp, update 3, read-out 2, plus D skip and gate),
attention 4*L^2*D per layer. Multiply-adds count as two FLOPs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from wdmctl.models.wdmamba import MambaMixer, TransformerBlock

SCAN_FLOPS_PER_STATE_UPDATE = 9


def parameter_table(model: nn.Module) -> "OrderedDict[str, int]":
    """Parameters grouped by stage: embeddings, each U's encoder/bottleneck/decoder, head."""
    groups: OrderedDict[str, int] = OrderedDict()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "w_net":
            key = f"U{int(parts[1]) + 1} {parts[2]}"
        elif parts[0] in ("patch_embed", "time_embed", "class_embed", "pos_embed", "block_modulation"):
            key = "embeddings + adaLN"
        else:
            key = "head"
        groups[key] = groups.get(key, 0) + p.numel()
    return groups


def count_flops(model: nn.Module, resolution: int | None = None, batch: int = 1) -> int:
    """FLOPs of one forward pass at latent/pixel side `resolution` (default: the trained size)."""
    cfg = model.config
    side = resolution or cfg.sample_size
    total = 0
    hooks = []

    def linear_hook(mod, inp, out):
        nonlocal total
        total += 2 * inp[0].numel() // inp[0].shape[-1] * mod.in_features * mod.out_features

    def conv_hook(mod, inp, out):
        nonlocal total
        k = 1
        for s in mod.kernel_size:
            k *= s
        total += 2 * out.numel() * k * mod.in_channels // mod.groups

    def mixer_hook(mod, inp, out):
        nonlocal total
        b, length, _ = inp[0].shape
        d_inner = mod.out_proj.in_features
        n = mod.forward_branch.d_state
        branches = 2 if mod.backward_branch is not None else 1
        total += branches * SCAN_FLOPS_PER_STATE_UPDATE * b * length * d_inner * n

    def attention_hook(mod, inp, out):
        nonlocal total
        b, length, d = inp[0].shape
        total += 4 * b * length * length * d

    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, MambaMixer):
            hooks.append(m.register_forward_hook(mixer_hook))
        elif isinstance(m, TransformerBlock):
            hooks.append(m.register_forward_hook(attention_hook))
    # one chunk per scan: the same FLOP count from hooks, far fewer ops to trace on the meta device
    model.set_scan_backend("torch", chunk_size=1 << 30)
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            x = torch.zeros(batch, cfg.in_channels, side, side, device=device)
            t = torch.zeros(batch, device=device)
            y = torch.zeros(batch, dtype=torch.long, device=device) if cfg.num_classes else None
            model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
        model.set_scan_backend(cfg.scan_backend)
    return total


def patch_tokens(model: nn.Module, side: int) -> int:
    """Patch tokens of a side x side input (the sequence length issue 16's tables count; the time and class
    tokens come on top)."""
    return (side // model.config.patch_size) ** 2


def summarize(model: nn.Module, resolution: int | None = None) -> dict:
    """A dict for `wdmctl model info` (and its --json)."""
    cfg = model.config
    side = resolution or cfg.sample_size
    tokens = patch_tokens(model, side)
    return {
        "arch": cfg.arch,
        "config": dict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameters_by_stage": dict(parameter_table(model)),
        "input": [cfg.in_channels, side, side],
        "tokens": tokens + model.num_extra_tokens,
        "patch_tokens": tokens,
        "gflops_per_forward": count_flops(model, side) / 1e9,
    }
