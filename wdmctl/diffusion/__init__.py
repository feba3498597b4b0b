"""The diffusion process: the DDPM training schedule and the solvers built from it (schedule.py), the
sampler settings and their defaults (settings.py), and the denoising loop with guidance (sampler.py)."""

# the schedule's names at the package level (torch-free: schedule.py imports diffusers only when called)
from wdmctl.diffusion.schedule import (SOLVERS, default_clip_x0, default_solver, make_noise_scheduler,  # noqa: F401
                                       make_sampler)
