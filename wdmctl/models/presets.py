"""Named model presets (DiT-style names: family-size/patch) and the one function that builds a model.

WDM-XL/2 is the paper's model: width 1536, 26 Mamba blocks (6+1+6 twice), patch 2, 4x32x32 SD-VAE
latents (256 px), 1000 classes. The U-ViT presets have the same width and 15 transformer blocks
(7+1+7), which matches the parameter count of the 26-block Mamba W-Net: a transformer block (attention
+ 4x MLP, 12 D^2) weighs about two Mamba blocks (in/out projections, ~6.3 D^2).
"""

from __future__ import annotations

import difflib
from typing import Any

from wdmctl.errors import WdmError
from wdmctl.models.wdmamba import WDMamba

_LATENT_256 = dict(sample_size=32, in_channels=4, patch_size=2, num_classes=1000)
# Mamba blocks have no local conv before the scan (`mixer_conv = "none"`): in issue 15's second ablation (two
# seeds, CIFAR-10, docs/results.md) removing it removed the fine 2-px stripes and the
# edge artefacts, at FID-5K +3% (seed 0) and -32% (seed 1); the reference mamba_ssm scan and the
# unfused PyTorch path drew the same stripes, so they are the conv's, not a kernel's. `mixer_conv = "2d"` (the
# 3x3 depthwise conv over the patch grid, the default before) or "causal1d" (Mamba's conv1d) in a recipe
# restores a conv.
_MAMBA = dict(mixer_conv="none")
# The W-Net's 12 long-skip fusions start as the mean of stream and skip (`skip_init = "average"`), not as
# U-ViT's random xavier mix: in issue 15's skip-init ablation (two seeds, 4,000 steps, CIFAR-10,
# docs/results.md) that one change took WDM-S/2's FID-10K from 44.6 / 45.9 to 36.4 / 36.7 (35.5 / 39.3 in a
# second session), past U-ViT at equal GPU time and level with the DiM-style stack. U-Mamba keeps xavier:
# averaging made it worse (47.5 / 139.6 against 43.1 / 105.3); U-ViT keeps its paper's.
# `skip_init = "xavier"` in a recipe restores the old start.
_WNET = dict(**_MAMBA, arch="wdmamba", skip_init="average")

PRESETS: dict[str, dict[str, Any]] = {
    "WDM-S/2": dict(**_WNET, width=384, **_LATENT_256),
    "WDM-B/2": dict(**_WNET, width=768, **_LATENT_256),
    "WDM-L/2": dict(**_WNET, width=1024, **_LATENT_256),
    "WDM-XL/2": dict(**_WNET, width=1536, **_LATENT_256),
    # the paper's Table 1 at S size (~30M, within 5% of WDM-S/2): one U of as many blocks (12+1+12), and a
    # DiM-style plain stack of 29 blocks (no long skips, so three more blocks make up their weights)
    "UMamba-S/2": dict(**_MAMBA, arch="umamba", width=384, depth=12, **_LATENT_256),
    "DiM-S/2": dict(**_MAMBA, arch="stack", width=384, depth=29, **_LATENT_256),
    "UMamba-B/2": dict(**_MAMBA, arch="umamba", width=768, **_LATENT_256),
    "UMamba-XL/2": dict(**_MAMBA, arch="umamba", width=1536, **_LATENT_256),
    "UViT-S/2": dict(arch="uvit", width=384, num_heads=6, depth=7, **_LATENT_256),
    "UViT-B/2": dict(arch="uvit", width=768, num_heads=12, depth=7, **_LATENT_256),
    "UViT-L/2": dict(arch="uvit", width=1024, num_heads=16, depth=7, **_LATENT_256),
    "UViT-XL/2": dict(arch="uvit", width=1536, num_heads=24, depth=7, **_LATENT_256),
}

# the transformer of the same size as each WD-Mamba preset, for benchmarks and comparisons
SAME_SIZE_UVIT = {"WDM-S/2": "UViT-S/2", "WDM-B/2": "UViT-B/2", "WDM-L/2": "UViT-L/2", "WDM-XL/2": "UViT-XL/2"}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments of preset `name` with `overrides` applied."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise WdmError(f"unknown model preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    return {**PRESETS[name], **overrides}


def build_model(name: str, **overrides: Any):
    """Build preset `name` (constructor arguments overridden by `overrides`)."""
    return WDMamba(**preset_config(name, **overrides))
