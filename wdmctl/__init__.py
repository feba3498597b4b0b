"""wdmctl: train, sample, score and deploy WD-Mamba diffusion models."""

from wdmctl.core.version import __version__  # noqa: F401 - `wdmctl.__version__`


def __getattr__(name: str):
    # Lazy, so `wdmctl --help` never imports torch; diffusers resolves saved pipelines' classes
    # through `wdmctl.WDMamba` / `wdmctl.WDMambaPipeline`.
    if name == "WDMamba":
        from wdmctl.models.wdmamba import WDMamba

        return WDMamba
    if name == "WDMambaPipeline":
        from wdmctl.pipeline import WDMambaPipeline

        return WDMambaPipeline
    raise AttributeError(f"module 'wdmctl' has no attribute {name!r}")
