"""The package version (read by pyproject.toml and recorded in every file wdmctl writes)."""

__version__ = "0.1.0"
