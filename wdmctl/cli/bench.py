"""`wdmctl bench ...`: GPU benchmarks that write JSON naming the device, baselines measured in the same run.

Each benchmark registers its own sub-command on `bench_app` from the module that owns the code it times.
"""

from __future__ import annotations

import typer

from wdmctl.cli.app import app

bench_app = typer.Typer(help="Benchmarks (JSON output naming the GPU; baselines from the same run).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
