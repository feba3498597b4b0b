"""The objective and its optimiser: DDPM epsilon-prediction loss, AdamW parameter groups, the learning-rate
schedule, and the EMA of the weights.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps     labels -> null class with p = train.label_dropout
    loss = || eps_theta(x_t, t, y) - eps ||^2       AdamW (no decay on A_log, D, norms, biases, embeddings)
    linear warm-up, gradient clipping, EMA (fp32) of the weights
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F


def alphas_cumprod(noise_scheduler, device) -> torch.Tensor:
    return noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)


def diffusion_loss(model, x0: torch.Tensor, labels: torch.Tensor | None, abar: torch.Tensor,
                   generator: torch.Generator, label_dropout: float = 0.0, null_class: int | None = None) -> torch.Tensor:
    """Epsilon-prediction MSE at uniform timesteps. Draws t, eps and the label dropout from `generator`,
    in that order. `null_class` None means an unconditional model (labels are ignored)."""
    batch, device = x0.shape[0], x0.device
    t = torch.randint(0, abar.shape[0], (batch,), generator=generator, device=device)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    if null_class is None:
        labels = None
    elif label_dropout > 0:
        drop = torch.rand(batch, generator=generator, device=device) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    a = abar[t].view(-1, *([1] * (x0.ndim - 1)))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise   # = DDPMScheduler.add_noise
    return F.mse_loss(model(x_t, t, labels).float(), noise.float())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the weight matrices only: not on biases and norm scales (1-D), the SSM's A_log and D
    (marked `_no_weight_decay`, as mamba-ssm does), or embedding tables (class, position, adaLN tables)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (param.ndim < 2 or getattr(param, "_no_weight_decay", False) or id(param) in embedding_params
                or leaf in ("pos_embed", "scale_shift_table")):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, lr: float, warmup_steps: int, schedule: str = "constant", max_steps: int = 0) -> float:
    """Linear warm-up over `warmup_steps` optimizer steps (step 0 already moves), then constant, or for
    `schedule="cosine"` a half cosine from lr down to 0 at `max_steps` (short runs end on settled weights)."""
    if warmup_steps > 0 and step + 1 < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "cosine" and max_steps > warmup_steps:
        progress = min(1.0, (step + 1 - warmup_steps) / (max_steps - warmup_steps))
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


class EMA:
    """Exponential moving average of a model's parameters, kept as an fp32 copy of the whole model (so it can
    sample and be saved like any model). Checkpointed through `state_dict`/`load_state_dict`."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, weight)   # ema += (1 - decay) * (p - ema)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "decay": self.decay, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])
