"""A whole optimizer step (loss, backward, clipping, AdamW) replayed as one CUDA graph: `train.cuda_graph`
in the loop, and `wdmctl bench train --cuda-graphs on`."""

from __future__ import annotations

from typing import Callable

import torch

from wdmctl.core.cuda_graphs import capture, run_on_side_stream
from wdmctl.train.objective import diffusion_loss


def eager_step_before_capture(update: Callable[[], None], optimizer: torch.optim.Optimizer) -> None:
    """One eager `update` (forward, backward, clipping, optimizer.step; no zero_grad) as warm-up before a
    capture (`wdmctl.core.cuda_graphs.run_on_side_stream`). Gradients are freed after it, so a captured backward
    writes them afresh instead of accumulating, and every replay starts from the same buffers."""
    def step() -> None:
        update()
        optimizer.zero_grad(set_to_none=True)

    run_on_side_stream(step)


def capture_train_step(update: Callable[[], None], optimizer: torch.optim.Optimizer, warmup: int = 3) -> Callable[[], None]:
    """One CUDA graph for a whole optimizer step after `warmup` eager steps; returns its replay. The
    optimizer must be `capturable`, the inputs static."""
    for _ in range(warmup):
        eager_step_before_capture(update, optimizer)
    return capture(update)[0].replay


class GraphedStep:
    """train.cuda_graph: a whole optimizer step (loss, backward, clipping, AdamW) replayed as one CUDA graph,
    which removes the host's ~2,700 kernel launches per step (WDM-B/2) from the step time.

    Batches are copied into static buffers. The noise comes from the default CUDA generator, reseeded every
    step with the step's seed: a replay reads the generator's seed and offset when it starts, so each step
    draws exactly what the eager loop's per-step generator draws (same values, same resume semantics). The
    learning rate is a device tensor the host fills before each replay. Non-finite steps: the step computes
    `found_inf` on the GPU and fused AdamW skips the update where it is set (and undoes its step count). The
    first WARMUP steps run eagerly (on a side stream, as capture requires) so that lazy state, cuBLAS
    workspaces and the Triton scan's autotuning exist before capture; capture itself runs nothing."""

    WARMUP = 3

    def __init__(self, model, optimizer, abar: torch.Tensor, null_class: int | None, label_dropout: float,
                 max_norm: float):
        self.model, self.optimizer, self.abar = model, optimizer, abar
        self.null_class, self.label_dropout, self.max_norm = null_class, label_dropout, max_norm
        device = abar.device
        self.lr = torch.zeros((), device=device)
        for group in optimizer.param_groups:
            group["lr"] = self.lr
            group["capturable"] = True  # a checkpoint of an eager run loads its capturable=False back
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        # read by fused AdamW's step: set on the torch optimizer itself, not on Accelerate's wrapper around it
        getattr(optimizer, "optimizer", optimizer).found_inf = self.found_inf = torch.zeros((), device=device)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    def _update(self) -> None:
        loss = diffusion_loss(self.model, self.x, self.y, self.abar, None, self.label_dropout, self.null_class)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        self.loss.copy_(loss.detach())
        self.grad_norm.copy_(norm)
        self.found_inf.copy_((~torch.isfinite(self.loss) | ~torch.isfinite(norm)).float())
        self.optimizer.step()

    def step(self, x: torch.Tensor, y: torch.Tensor, seed: int, lr: float) -> tuple[float, float]:
        """One optimizer step on (x, y); returns (loss, grad norm) (one host sync)."""
        if self.x is None:
            self.x = torch.empty_like(x, device=self.abar.device)
            self.y = torch.empty_like(y, device=self.abar.device)
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        torch.cuda.manual_seed(seed)
        if self.graph is not None:
            self.graph.replay()
        elif self.eager_steps < self.WARMUP:
            eager_step_before_capture(self._update, self.optimizer)
            self.eager_steps += 1
        else:
            self.graph = capture(self._update)[0]   # records this step without running it
            self.graph.replay()
        return float(self.loss), float(self.grad_norm)
