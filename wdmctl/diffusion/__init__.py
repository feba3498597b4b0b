"""The diffusion process: the DDPM training schedule and the solvers built from it (schedule.py), the
sampler settings and their defaults (settings.py), and the denoising loop with guidance (sampler.py)."""
