"""`wdmctl cache SRC --out DIR`: encode an image dataset into the latent cache training reads;
`wdmctl cache verify DIR`: check every shard against the manifest.
Parsing and printing only; the work is in wdmctl.data.cache."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text
from typer.core import TyperGroup

from wdmctl.cli.app import app
from wdmctl.core.precision import PRECISIONS


class _BuildUnlessSubcommand(TyperGroup):
    """`wdmctl cache SRC ...` means `wdmctl cache build SRC ...`: the command built caches before it had
    sub-commands, and every recipe and doc calls it that way. (A source folder named `verify` is `./verify`.)"""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["build", *args]
        return super().parse_args(ctx, args)


cache_app = typer.Typer(
    cls=_BuildUnlessSubcommand, no_args_is_help=True, rich_markup_mode="rich",
    help="Build a latent cache (`wdmctl cache SRC --out DIR`, the same as `cache build`) or verify one.")
app.add_typer(cache_app, name="cache")


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@cache_app.command("build")
def cache(
    src: str = typer.Argument(..., help="Image folder (one sub-folder per class gives labels), a .tar/.tar.gz/.zip "
                                        "of one, or `digits` (built-in, 10 classes)."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder to create (or resume)."),
    resolution: int = typer.Option(256, min=8, max=4096, help="Side of the square images after center crop."),
    # autoencoder
    vae: str = typer.Option("stabilityai/sd-vae-ft-ema", help="Hub id or local folder of a diffusers "
                            "AutoencoderKL, `taef2:DIR`, or `none` to keep pixels."),
    dtype: str = typer.Option("fp32", help=f"Precision the autoencoder encodes in: {', '.join(PRECISIONS)}."),
    # what is stored
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Also store each image's horizontal flip."),
    shard_size: int = typer.Option(1000, min=1, max=1_000_000, help="Images per shard file (the unit of resume)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache built with other settings."),
    # performance
    batch_size: int = typer.Option(64, min=1, max=4096, help="Images per encoder batch."),
    device: Device = typer.Option(Device.cpu, help="Where to encode; under `accelerate launch` each process "
                                                   "takes its own GPU."),
    workers: int = typer.Option(None, min=1, max=256, help="Image-decoding threads (default: min(8, CPUs))."),
) -> None:
    """Encode SRC into a sharded latent cache (image + flip; KL mean/std, TAEF2 latents or pixels)."""
    from wdmctl.data.cache import build_cache, is_main_process

    main_process = is_main_process()
    with _RichProgress(enabled=main_process) as progress:
        summary = build_cache(src, out, resolution, vae=vae, batch_size=batch_size, flip=flip,
                              shard_size=shard_size, overwrite=overwrite, device=device.value,
                              dtype=dtype, workers=workers, progress=progress)
    if not main_process:
        return
    console = Console(soft_wrap=True)  # the summary: one line per fact, never wrapped mid-path
    c, h, w = summary.latent_shape
    classes = f"{summary.num_classes} classes" if summary.num_classes else "unconditional"
    console.print(f"cached {summary.count} images ({classes}) as {c}x{h}x{w} with {summary.autoencoder} "
                  f"in {summary.out} ({summary.shards} shards, {summary.shards_reused} reused)", markup=False)
    if summary.encoded_images:
        where = f" on process 0 of {summary.processes}" if summary.processes > 1 else ""
        console.print(f"encoded {summary.encoded_images} images in {summary.seconds:.1f} s "
                      f"({summary.images_per_s:.1f} images/s{where})", markup=False)
    if summary.upscaled:
        console.print(f"[yellow]warning:[/] {summary.upscaled} images were smaller than {resolution} px and "
                      f"were upscaled")
    if summary.skipped:
        console.print(f"[yellow]skipped {len(summary.skipped)} unreadable files[/] (listed in manifest.json):")
        for item in summary.skipped[:10]:
            console.print(f"  {item['file']}: {item['error']}", markup=False)
        if len(summary.skipped) > 10:
            console.print(f"  ... and {len(summary.skipped) - 10} more")


@cache_app.command("verify")
def verify(
    cache_dir: Path = typer.Argument(..., help="The cache folder (holding manifest.json)."),
) -> None:
    """Check every shard against the manifest (size, safetensors framing, sha256) and name the bad ones."""
    from wdmctl.data.cache import verify_cache

    checked = verify_cache(cache_dir)
    how = "size, framing and sha256" if checked["hashed"] else \
        "size and framing only: no hashes recorded (an older wdmctl built it; rerun `wdmctl cache` to add them)"
    typer.echo(f"ok: {checked['shards']} shards, {checked['bytes']} bytes in {cache_dir}; checked {how}")


class _RateColumn(ProgressColumn):
    """Images per second over rich's recent window; shards reused from an earlier run are the task's
    starting point, not progress, so they do not inflate it."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} images/s" if task.speed else "- images/s", style="progress.data.speed")


class _RichProgress:
    """The progress bar, shown by the main process only (`accelerate launch` runs several), and only
    once encoding starts: an early error stays a single line."""

    def __init__(self, enabled: bool):
        self._enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def start(self, total: int, done: int) -> None:
        self._progress = Progress(TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                                  TimeRemainingColumn(), console=Console(stderr=True), disable=not self._enabled)
        self._progress.start()
        self._task = self._progress.add_task("encode", total=total, completed=done)

    def advance(self, images: int) -> None:
        self._progress.advance(self._task, images)
