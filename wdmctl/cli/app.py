"""The root Typer app. Command modules register on it; nothing here imports torch."""

from __future__ import annotations

import typer

from wdmctl.core.version import __version__

app = typer.Typer(
    name="wdmctl",
    help="Train, sample, score and deploy WD-Mamba diffusion models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wdmctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Train, sample, score and deploy WD-Mamba diffusion models."""
