"""`wdmctl fid`, `wdmctl fid ref` and `wdmctl fid calc`: parse, call `wdmctl.fid` (a run: `wdmctl.apps.fid`),
print. The protocol lives in wdmctl/fid/ and docs/fid.md. Library imports are inside the commands: they pull
in torch."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from wdmctl.cli import options
from wdmctl.cli.app import app

fid_app = typer.Typer(
    help="FID with the standard Inception: score a run (no sub-command), build reference statistics, score "
         "samples. Protocol: docs/fid.md.",
    invoke_without_command=True,
    rich_markup_mode="rich",
)
app.add_typer(fid_app, name="fid")



@contextlib.contextmanager
def _printed_warnings() -> Iterator[None]:
    """Show the FID warnings (JPEG samples, statistics of unknown origin) as `warning: ...` lines on stderr,
    also when the command then fails."""
    from wdmctl.fid import FidWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FidWarning)
        try:
            yield
        finally:
            for warning in caught:
                if issubclass(warning.category, FidWarning):
                    print(f"warning: {warning.message}", file=sys.stderr)


@contextlib.contextmanager
def _progress(description: str) -> Iterator[Any]:
    """A rich progress bar on stderr (stdout stays clean for --json); yields an on_progress(done, total)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total or None)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="FID", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("FID", f"[bold]{result['fid']:.4f}")
    expected = result["num_expected"]
    images = f"{result['num']}" + (f" (of --num {expected}; --allow-small)" if result["small"] else "")
    table.add_row("images", images)
    if "precision" in result:
        table.add_row(f"precision / recall (k={result['pr_k']})", f"{result['precision']:.4f} / {result['recall']:.4f}")
    if "stripes" in result:
        stripes = result["stripes"]
        edges = " ".join(f"{edge} {value:.2f}" for edge, value in stripes["edge_detail"].items())
        table.add_row("stripe score", f"{100 * stripes['share']:.2f}% of the energy at period {stripes['period_px']} px "
                                      f"({stripes['stripes']}); edge detail {edges} (docs/fid.md)")
    if result.get("samples"):
        table.add_row("samples", f"{result['samples']['path']} ({result['samples']['format']})")
    if "sampler" in result:
        sampler = result["sampler"]
        table.add_row("run", f"{result['run']}  checkpoint {result['checkpoint']}")
        table.add_row("sampler", f"{sampler['solver']} solver, {sampler['steps']} steps, cfg {sampler['cfg']}, "
                                 f"x0 clip {'on' if sampler['clip_x0'] else 'off'}, EMA, "
                                 f"seeds {sampler['seeds'][0]}-{sampler['seeds'][1]}")
    ref = result["ref"]
    ref_detail = f"{ref['count']} images of {ref['source']} at {ref['resolution']} px" if ref["provenance"] \
        else "no provenance"
    table.add_row("reference", f"{ref['path']} (sha256 {ref['sha256'][:12]}..., {ref_detail})")
    inception = result["inception"]
    table.add_row("Inception", f"{inception['file']} via {inception['source']} (sha256 {inception['sha256'][:12]}...)")
    table.add_row("preprocessing", result["preprocessing"])
    if result.get("json"):
        table.add_row("JSON", result["json"])
    Console().print(table)


@fid_app.callback(invoke_without_command=True)
def fid(
    ctx: typer.Context,
    run: str = options.RUN,
    checkpoint: str = options.CHECKPOINT,
    num: int = typer.Option(None, "--num", min=2, help="Images to sample and score (default: recipe's fid.num, "
                                                        "else 50000)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Sampling steps (default: recipe's fid.steps)."),
    cfg: float = typer.Option(None, "--cfg", min=0.0, help="Guidance scale (default: recipe's fid.cfg)."),
    ref: str = typer.Option(None, "--ref", help="Reference statistics .npz, or an image source to build them "
                                                "from (default: recipe's fid.ref)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    allow_small: bool = typer.Option(False, "--allow-small", help="Score even if fewer than --num images came."),
    pr: bool = typer.Option(False, "--pr", help="Also precision/recall (k=3); the reference must store features."),
    seed: int = typer.Option(0, "--seed", help="First sample seed (seeds seed..seed+num-1)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Sampling batch size."),
    precision: str = options.PRECISION,
    device: str = options.DEVICE,
    inception: Path = options.INCEPTION,
    overwrite: bool = options.OVERWRITE,
    clip_x0: Optional[bool] = options.CLIP_X0,
    solver: Optional[str] = options.SOLVER,
) -> None:
    """Sample fid.num images from the newest run and score them against the recipe's reference.

    Examples:  wdmctl fid   |   wdmctl fid --run runs/00003-cifar10 --num 10000 --steps 50 --cfg 1.5
    """
    if ctx.invoked_subcommand is not None:
        return
    from wdmctl.apps.fid import fid_for_run

    with _printed_warnings(), _progress("sampling + scoring") as on_progress:
        result = fid_for_run(run=run, checkpoint=checkpoint, num=num, steps=steps, cfg=cfg, ref=ref,
                             allow_small=allow_small, seed=seed, batch_size=batch_size, device=device,
                             precision=precision, pr=pr, inception=inception, overwrite=overwrite,
                             clip_x0=clip_x0, solver=solver, on_progress=on_progress)
    _print_result(result, as_json)


def _default_resolution(src: str) -> int:
    """The first image's size when it is square (CIFAR-10: 32); otherwise --resolution is required."""
    from wdmctl.data.sources import open_source
    from wdmctl.errors import WdmError

    source = open_source(src)
    if not len(source):
        raise WdmError(f"{src} holds no images")
    width, height = source.open(0).size
    if width != height:
        raise WdmError(f"the images of {src} are not square ({width}x{height}); pass --resolution")
    print(f"resolution: {width} (the first image's size; pass --resolution to change it)", file=sys.stderr)
    return width


@fid_app.command("ref")
def ref_command(
    src: str = typer.Argument(..., help="Image folder, .tar/.tar.gz/.zip archive, or 'digits'."),
    out: Path = typer.Option(None, "--out", "-o", help="Where to write the statistics .npz (they are cached "
                                                       "either way; without --out the cache path is printed)."),
    resolution: int = typer.Option(None, "--resolution", "-r", min=1, help="Center-crop size, as `wdmctl cache` "
                                   "(default: the first image's size if square)."),
    pr: bool = typer.Option(False, "--pr", help="Store 10,000 random real features for precision/recall."),
    inception: Path = options.INCEPTION,
    batch_size: int = typer.Option(100, "--batch-size", min=1, help="Inception batch size."),
    device: str = options.DEVICE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    recompute: bool = typer.Option(False, "--recompute", help="Ignore cached statistics for this source."),
) -> None:
    """Reference statistics (mu, sigma in float64 + provenance) of an image source.

    Example:  wdmctl fid ref ../shared/assets/cifar10/cifar10-train.tar.gz --resolution 32 --out refs/cifar10-32.npz
    """
    from wdmctl.fid.reference import PR_FEATURES, compute_reference, load_reference

    resolution = resolution or _default_resolution(src)
    with _progress("reference statistics") as on_progress:
        path = compute_reference(src, resolution, out, inception=inception, device=device, batch_size=batch_size,
                                 overwrite=overwrite, recompute=recompute, pr_features=PR_FEATURES if pr else 0,
                                 on_progress=on_progress)
    provenance = load_reference(path).provenance
    typer.echo(f"{path}: {provenance['count']} images at {resolution} px, Inception {provenance['inception']['file']} "
               f"via {provenance['inception']['source']}")


@fid_app.command("calc")
def calc_command(
    samples: Path = typer.Argument(..., help="Folder of PNGs or ADM .npz (arr_0 uint8 NHWC)."),
    ref: Path = typer.Option(..., "--ref", help="Reference statistics .npz (`wdmctl fid ref`)."),
    num: int = typer.Option(50_000, "--num", min=2, help="Images to score (the first N); fewer is an error."),
    allow_small: bool = typer.Option(False, "--allow-small", help="Score all images when there are fewer than --num."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    pr: bool = typer.Option(False, "--pr", help="Also precision/recall (k=3); the reference must store features."),
    inception: Path = options.INCEPTION,
    batch_size: int = typer.Option(100, "--batch-size", min=1, help="Inception batch size."),
    device: str = options.DEVICE,
) -> None:
    """Score a folder of samples or an ADM npz against reference statistics.

    Example:  wdmctl fid calc samples/ --ref refs/cifar10-32.npz --num 10000 --json
    """
    from wdmctl.fid.score import score_images

    with _printed_warnings(), _progress("scoring") as on_progress:
        result = score_images(samples, ref, num_expected=num, allow_small=allow_small, pr=pr, inception=inception,
                              device=device, batch_size=batch_size, on_progress=on_progress)
    _print_result(result, as_json)
