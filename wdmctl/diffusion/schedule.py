"""The diffusion process: the DDPM training schedule (saved with every model, so sampling can never drift
from training) and the samplers built from it."""

from __future__ import annotations

from typing import Any

from wdmctl.errors import WdmError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# DPM-Solver++ (2M for guided, 3M for unguided sampling, as DPM-Solver's authors recommend), DDIM, UniPC, Euler
SOLVERS = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "ddim", "unipc", "euler")


def make_noise_scheduler(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
):
    """diffusers' DDPMScheduler with epsilon prediction and no clipping: the SD / U-ViT / DiM schedule."""
    from diffusers import DDPMScheduler  # here: diffusers' import is slow; config reads this module's names

    if beta_schedule not in BETA_SCHEDULES:
        raise WdmError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, not {beta_schedule!r}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
        beta_schedule=beta_schedule, prediction_type="epsilon", clip_sample=False,
    )


# Solvers that can clip each predicted x_0 to the data range [-1, 1], and the diffusers options that do it:
# DDIM's clip_sample, and DPM-Solver++/UniPC's thresholding with sample_max_value 1 (their dynamic threshold
# s = clamp(quantile(|x_0|), 1, sample_max_value) is then always 1, i.e. plain clipping).
X0_CLIP_OPTIONS = {
    "dpm++2m": {"thresholding": True, "sample_max_value": 1.0},
    "dpm++3m": {"thresholding": True, "sample_max_value": 1.0},
    "dpm++2m-sde": {"thresholding": True, "sample_max_value": 1.0},
    "unipc": {"thresholding": True, "sample_max_value": 1.0},
    "ddim": {"clip_sample": True, "clip_sample_range": 1.0},
}


def make_sampler(train_config: dict[str, Any], solver: str, *, timestep_spacing: str = "linspace",
                 clip_x0: bool = False):
    """A diffusers scheduler for `solver` with exactly the training schedule's betas and an explicit
    timestep spacing (recorded in sample metadata). `dpm++2m`/`dpm++3m` are DPM-Solver++ of order 2/3.

    `clip_x0` clips every predicted x_0 to [-1, 1], as DDPM sampled its pixel-space models: at high noise
    x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) multiplies the denoiser's error by up to 1/sqrt(abar)
    (~150 at t = 999 of the linear schedule), and unclipped those errors become the image.
    """
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler,  # here: see make_noise_scheduler
                           EulerDiscreteScheduler, UniPCMultistepScheduler)

    if clip_x0 and solver in SOLVERS and solver not in X0_CLIP_OPTIONS:
        raise WdmError(f"solver {solver} cannot clip x_0; use one of {', '.join(X0_CLIP_OPTIONS)} or --no-clip-x0")
    keep = {k: train_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                         "trained_betas", "prediction_type") if k in train_config}
    keep["timestep_spacing"] = timestep_spacing
    if clip_x0:
        keep.update(X0_CLIP_OPTIONS[solver])
    if solver in ("dpm++2m", "dpm++3m"):
        return DPMSolverMultistepScheduler(**keep, algorithm_type="dpmsolver++", solver_order=int(solver[5]),
                                           lower_order_final=True)
    if solver == "dpm++2m-sde":
        return DPMSolverMultistepScheduler(**keep, algorithm_type="sde-dpmsolver++", solver_order=2)
    if solver == "ddim":
        return DDIMScheduler(**{"clip_sample": False, **keep}, set_alpha_to_one=False)
    if solver == "unipc":
        return UniPCMultistepScheduler(**keep)
    if solver == "euler":
        return EulerDiscreteScheduler(**keep)
    raise WdmError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")


def default_clip_x0(autoencoder_entry: dict[str, Any] | None, solver: str) -> bool:
    """Clip x_0 by default for pixel models (their data lie in [-1, 1]), never for latents (unbounded)."""
    pixels = (autoencoder_entry or {}).get("spec", "none") == "none"
    return pixels and solver in X0_CLIP_OPTIONS


def default_solver(guided: bool) -> str:
    return "dpm++2m" if guided else "dpm++3m"
