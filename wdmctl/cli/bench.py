"""`wdmctl bench ...`: GPU benchmarks that write JSON naming the device, baselines measured in the same run.

Each benchmark registers its own sub-command on `bench_app` from the module that owns the code it times.
"""

from __future__ import annotations

import typer

from wdmctl.cli.app import app

bench_app = typer.Typer(help="Benchmarks (JSON output naming the GPU; baselines from the same run).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

PRESETS_HELP = "Comma-separated presets (random weights)."
UVIT_HELP = "Also time each WD-Mamba preset's same-size U-ViT."


SCAN_HELP = ("Scan mode of the Mamba presets: their own (cycle: one direction per block) or bidirectional "
             "(both directions in every block; U-ViT runs are unaffected).")


def scan_overrides(scan: str | None, runs: list[tuple[str, str]]) -> dict[str, dict]:
    """Model overrides per preset for --scan (checked here, before any run): none for the presets' own mode
    or a U-ViT, else {"scan": mode}."""
    from wdmctl.errors import WdmError
    from wdmctl.models.wdmamba import SCAN_MODES

    if scan is not None and scan not in SCAN_MODES:
        raise WdmError(f"--scan must be one of {', '.join(SCAN_MODES)}, not {scan!r}")
    return {name: {"scan": scan} if scan and not _is_uvit(name) else {} for name, _ in runs}


def _is_uvit(name: str) -> bool:
    from wdmctl.models.presets import PRESETS

    return PRESETS.get(name, {}).get("arch") == "uvit"


def preset_runs(presets: str, uvit: bool, backends: str, usable: list[str], attention: str | None):
    """(preset, scan backend) pairs to time: each preset with every wanted backend that is available, and its
    same-size U-ViT once (it has no scan: `attention` stands in for the backend)."""
    from wdmctl.models.presets import SAME_SIZE_UVIT

    names = [p.strip() for p in presets.split(",") if p.strip()]
    if uvit:
        names += [SAME_SIZE_UVIT[p] for p in names if p in SAME_SIZE_UVIT and SAME_SIZE_UVIT[p] not in names]
    wanted = [b.strip() for b in backends.split(",") if b.strip()]
    runs = []
    for name in names:
        scans = [attention] if _is_uvit(name) else [b for b in wanted if b in usable]
        runs += [(name, backend) for backend in scans]
    return runs, [b for b in wanted if b not in usable]
