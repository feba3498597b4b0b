"""The diffusion process: the DDPM training schedule (saved with every model, so sampling can never drift
from training) and the samplers built from it."""

from __future__ import annotations

from typing import Any

from wdmctl.errors import WdmError

# DPM-Solver++ (2M for guided, 3M for unguided sampling, as DPM-Solver's authors recommend), DDIM, UniPC, Euler
SOLVERS = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "ddim", "unipc", "euler")


def make_noise_scheduler(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
):
    """diffusers' DDPMScheduler with epsilon prediction and no clipping: the SD / U-ViT / DiM schedule."""
    from diffusers import DDPMScheduler

    if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise WdmError(f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2, not {beta_schedule!r}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
        beta_schedule=beta_schedule, prediction_type="epsilon", clip_sample=False,
    )


def make_sampler(train_config: dict[str, Any], solver: str, *, timestep_spacing: str = "linspace"):
    """A diffusers scheduler for `solver` with exactly the training schedule's betas and an explicit
    timestep spacing (recorded in sample metadata). `dpm++2m`/`dpm++3m` are DPM-Solver++ of order 2/3."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           UniPCMultistepScheduler)

    keep = {k: train_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                         "trained_betas", "prediction_type") if k in train_config}
    keep["timestep_spacing"] = timestep_spacing
    if solver in ("dpm++2m", "dpm++3m"):
        return DPMSolverMultistepScheduler(**keep, algorithm_type="dpmsolver++", solver_order=int(solver[5]),
                                           lower_order_final=True)
    if solver == "dpm++2m-sde":
        return DPMSolverMultistepScheduler(**keep, algorithm_type="sde-dpmsolver++", solver_order=2)
    if solver == "ddim":
        return DDIMScheduler(**keep, clip_sample=False, set_alpha_to_one=False)
    if solver == "unipc":
        return UniPCMultistepScheduler(**keep)
    if solver == "euler":
        return EulerDiscreteScheduler(**keep)
    raise WdmError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")


def default_solver(guided: bool) -> str:
    return "dpm++2m" if guided else "dpm++3m"
