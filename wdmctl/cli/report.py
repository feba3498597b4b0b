"""`wdmctl report RUN...`: parse, then hand over to `wdmctl.apps.report.write_report`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from wdmctl.cli.app import app


@app.command("report")
def report_command(
    runs: List[str] = typer.Argument(..., help="Run folders (or run numbers/names under runs/)."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for loss.png, fid-images.png, "
                                                                  "fid-time.png and report.md."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier report in --out."),
    solo_speed: Optional[List[str]] = typer.Option(
        None, "--solo-speed", help="A `wdmctl bench train --out` JSON timed on the idle GPU (repeat for presets "
                                   "timed in different runs; PRESET[,PRESET]=FILE takes only those presets from "
                                   "it): draw and tabulate GPU-minutes at each preset's solo speed instead of wall "
                                   "time (for runs that shared a GPU)."),
) -> None:
    """Loss and FID curves of one or more runs, and a markdown table.

    FID is drawn against images seen and against training time; FID curves need fid.every set in the runs'
    recipes (FID during training).

    Examples:

      wdmctl report runs/00003-cifar10-WDM-S2 runs/00004-cifar10-UViT-S2 --out report/cifar10

      wdmctl report runs/00003-cifar10-WDM-S2 runs/00004-cifar10-UViT-S2 --solo-speed bench-s.json

      wdmctl report runs/00003-cifar10-WDM-S2 runs/00005-cifar10-DiM-S2 --solo-speed bench-s.json --solo-speed bench-dim.json

      wdmctl report runs/00003-cifar10-WDM-S2 runs/00009-cifar10-UViT-S2 --solo-speed WDM-S/2=bench-s.json --solo-speed UViT-S/2=bench-later.json
    """
    from wdmctl.apps.report import write_report

    result = write_report(runs, out, overwrite=overwrite, solo_speed=solo_speed)
    typer.echo(result["table"].rstrip())
    typer.echo(f"wrote {', '.join(result['files'])}")
