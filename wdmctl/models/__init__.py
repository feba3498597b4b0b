"""Models: the WD-Mamba denoiser (and its U-Mamba / U-ViT variants) and the preset registry."""

from wdmctl.models.presets import PRESETS, build_model, preset_config

__all__ = ["PRESETS", "build_model", "preset_config"]
