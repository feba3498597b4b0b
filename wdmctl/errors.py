"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class WdmError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when the message is empty), cut to `limit`
    characters: what a one-line error quotes of a library's multi-line exception."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text[:limit] if limit else text


class MissingDependency(WdmError):
    """An optional package is needed for what was asked; the message says how to install it."""
