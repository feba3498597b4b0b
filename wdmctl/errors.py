"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class WdmError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class MissingDependency(WdmError):
    """An optional package is needed for what was asked; the message says how to install it."""
