"""wdmctl: train, sample, score and deploy WD-Mamba diffusion models."""

__version__ = "0.1.0"
