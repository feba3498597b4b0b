"""Command-line entry point. Each command lives in its own module and only parses, validates and
calls one function of the library; heavy imports (torch) happen inside the commands."""

from __future__ import annotations

import sys

from wdmctl.cli.app import app
from wdmctl.errors import WdmError
# command modules register themselves on import; keep this list sorted
from wdmctl.cli import bench as _bench  # noqa: F401,E402
from wdmctl.cli import cache as _cache  # noqa: F401,E402
from wdmctl.cli import export as _export  # noqa: F401,E402
from wdmctl.cli import fid as _fid  # noqa: F401,E402
from wdmctl.cli import model as _model  # noqa: F401,E402
from wdmctl.cli import report as _report  # noqa: F401,E402
from wdmctl.cli import sample as _sample  # noqa: F401,E402
from wdmctl.cli import train as _train  # noqa: F401,E402


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a WdmError becomes one line on stderr and a non-zero exit."""
    try:
        app(args=argv, standalone_mode=True)
    except WdmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
