"""The step loop: one optimizer step after another, with the bookkeeping between steps (log records,
checkpoints, sample grids, non-finite steps, the stop signal). `trainer.train` builds everything it runs.

Exact resume: a step's randomness is a function of its number (wdmctl.train.data), and so are the learning
rate and the EMA decay; a checkpoint holds the weights, optimizer, EMA and counters, and 2 steps + resume +
2 steps equals 4 steps bitwise on CPU.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wdmctl import config as cfg
from wdmctl.errors import WdmError
from wdmctl.runs import latest_checkpoint
from wdmctl.train.checkpoint import TrainState, pipeline_meta, save_checkpoint
from wdmctl.train.data import NOISE_STREAM, StepBatches, derive_seed
from wdmctl.train.fid_monitor import FidMonitor
from wdmctl.train.graphed import GraphedStep
from wdmctl.train.grid import GridWriter
from wdmctl.train.objective import EMA, diffusion_loss, learning_rate
from wdmctl.train.report import Reporter, format_duration


class TrainingInterrupted(WdmError):
    """Ctrl-C / SIGTERM: the loop stopped at a step boundary and saved a checkpoint."""

    exit_code = 130


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop reads at the next step boundary (all processes agree on it
    through the step's all-reduce), so a checkpoint is never taken mid-update. A second Ctrl-C aborts."""

    def __init__(self):
        self.stop = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second signal: give up on the clean stop
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Interval:
    """Accumulators between two log lines."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    loss: float = 0.0
    grad_norm: float = 0.0
    finite: int = 0
    images: int = 0
    maintenance: float = 0.0   # checkpoint/sample time, left out of the throughput

    def reset(self) -> None:
        self.__init__()


class StepLoop:
    """The step loop of `train`, with its bookkeeping."""

    def __init__(self, accelerator, model, net, optimizer, ema: EMA, progress: TrainState, batches: StepBatches,
                 abar, null_class, recipe: cfg.Recipe, reporter: Reporter, run_dir: Path, manifest, noise_scheduler,
                 grid: GridWriter, precision: str, fid_monitor: FidMonitor | None = None):
        self.accelerator, self.model, self.net, self.optimizer, self.ema = accelerator, model, net, optimizer, ema
        self.progress, self.batches, self.abar, self.null_class = progress, batches, abar, null_class
        self.recipe, self.reporter, self.run_dir, self.manifest = recipe, reporter, run_dir, manifest
        self.noise_scheduler, self.grid, self.fp16 = noise_scheduler, grid, precision == "fp16"
        self.fid_monitor = fid_monitor
        self.last_saved = progress.step
        self.graphed = (GraphedStep(model, optimizer, abar, null_class, recipe.train.label_dropout,
                                     recipe.optim.max_grad_norm or float("inf")) if recipe.train.cuda_graph else None)

    def _loader(self, first_step: int, last_step: int):
        t, workers = self.recipe.train, self.recipe.data.num_workers
        return torch.utils.data.DataLoader(
            self.batches, batch_size=None, sampler=range(first_step * t.grad_accum, last_step * t.grad_accum),
            num_workers=workers, pin_memory=self.accelerator.device.type == "cuda",
            prefetch_factor=4 if workers else None, persistent_workers=False)

    def run(self, stop: StopFlag) -> None:
        acc, t, p = self.accelerator, self.recipe.train, self.progress
        device = acc.device
        max_norm = self.recipe.optim.max_grad_norm or float("inf")
        batches = iter(self._loader(p.step, t.max_steps))
        interval = Interval()
        self.model.train()
        while p.step < t.max_steps:
            step = p.step
            if self.graphed is not None:
                self._graphed_step(step, batches, stop, interval)
                continue
            loss_sum = torch.zeros((), device=device)
            for micro in range(t.grad_accum):
                got_step, got_micro, x, y = next(batches)
                assert (got_step, got_micro) == (step, micro), "data stream out of step"
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                generator = torch.Generator(device).manual_seed(derive_seed(t.seed, NOISE_STREAM, step, micro, acc.process_index))
                sync = nullcontext() if micro == t.grad_accum - 1 else acc.no_sync(self.model)
                with sync:
                    loss = diffusion_loss(self.model, x, y, self.abar, generator, t.label_dropout, self.null_class)
                    acc.backward(loss / t.grad_accum)
                loss_sum += loss.detach()
            # one all-reduce carries the loss and the stop request, so every process takes the same branch
            shared = acc.reduce(torch.stack([loss_sum / t.grad_accum, torch.tensor(float(stop.stop), device=device)]),
                                "sum")
            loss_value = float(shared[0]) / acc.num_processes
            stop_requested = float(shared[1]) > 0
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), max_norm))
            # fp16's loss scaler skips overflowing steps itself; otherwise a non-finite gradient is ours to skip
            finite = math.isfinite(loss_value) and (self.fp16 or math.isfinite(grad_norm))
            if finite:
                for group in self.optimizer.param_groups:
                    group["lr"] = self._learning_rate(step)
                self.optimizer.step()
                if not (self.fp16 and acc.optimizer_step_was_skipped):
                    self._applied()
                p.nonfinite_in_a_row = 0
            else:
                self._skipped(step, loss_value, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            self._end_step(step, interval, finite, loss_value, grad_norm, stop_requested)

    def _graphed_step(self, step: int, batches, stop: StopFlag, interval: Interval) -> None:
        """One optimizer step through `GraphedStep` (train.cuda_graph: one process, no accumulation, not fp16).
        The graph's AdamW skips a non-finite step itself; the host still decides the EMA and the bookkeeping."""
        t, p = self.recipe.train, self.progress
        got_step, got_micro, x, y = next(batches)
        assert (got_step, got_micro) == (step, 0), "data stream out of step"
        seed = derive_seed(t.seed, NOISE_STREAM, step, 0, self.accelerator.process_index)
        loss_value, grad_norm = self.graphed.step(x, y, seed, self._learning_rate(step))
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self._applied()
            p.nonfinite_in_a_row = 0
        else:
            self._skipped(step, loss_value, grad_norm)
        self._end_step(step, interval, finite, loss_value, grad_norm, bool(stop.stop))

    def _applied(self) -> None:
        """An optimizer step changed the weights: the EMA follows them and the batch counts as seen."""
        self.ema.update(self.net)
        self.progress.images_seen += self.recipe.train.batch_size

    def _skipped(self, step: int, loss_value: float, grad_norm: float) -> None:
        p = self.progress
        p.skipped_steps += 1
        p.nonfinite_in_a_row += 1
        self.reporter.line(f"step {step}: non-finite loss {loss_value} / grad norm {grad_norm}; step skipped "
                           f"({p.nonfinite_in_a_row} in a row, {p.skipped_steps} in total)")

    def _end_step(self, step: int, interval: Interval, finite: bool, loss_value: float, grad_norm: float,
                  stop_requested: bool) -> None:
        t, p = self.recipe.train, self.progress
        p.step = step + 1
        interval.steps += 1
        interval.images += t.batch_size
        if finite:
            interval.finite += 1
            interval.loss += loss_value
            interval.grad_norm += grad_norm
        if p.nonfinite_in_a_row >= t.max_nonfinite:
            self._too_many_nonfinite()
        self._after_step(interval, loss_value, stop_requested)
        if stop_requested:
            if self.last_saved != p.step:
                self._checkpoint(interval)
            self.reporter.line(f"stop requested (SIGINT/SIGTERM): stopped at step {p.step}")
            raise TrainingInterrupted(f"stopped at step {p.step}; checkpoint saved in {self.run_dir}; rerun the "
                                      f"same command to resume")

    def _after_step(self, interval: Interval, loss_value: float, stop_requested: bool) -> None:
        t, s, p = self.recipe.train, self.recipe.sample, self.progress
        step, last = p.step, p.step == t.max_steps
        elapsed = max(time.perf_counter() - interval.start - interval.maintenance, 1e-9)
        img_s = interval.images / elapsed
        memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        status = f"loss {loss_value:.4f}  {img_s:.1f} img/s" + (f"  {memory:.1f} GiB" if memory is not None else "")
        self.reporter.step(step, status)
        if step % self.recipe.log.every == 0 or last or stop_requested:
            self._log(interval, elapsed, memory)
        maintenance = time.perf_counter()
        if step % t.checkpoint_every == 0 or last or stop_requested:
            if self.last_saved != step:
                self._checkpoint(interval)
        if (s.every and step % s.every == 0) or last:
            self._grid(step)
        if self.fid_monitor is not None and self.fid_monitor.due(step, last):
            self._fid(step)
        interval.maintenance += time.perf_counter() - maintenance

    def _learning_rate(self, step: int) -> float:
        o = self.recipe.optim
        return learning_rate(step, o.lr, o.warmup_steps, o.schedule, self.recipe.train.max_steps)

    def _log(self, interval: Interval, elapsed: float, memory: float | None) -> None:
        t, p = self.recipe.train, self.progress
        lr = self._learning_rate(p.step - 1)
        mean_loss = interval.loss / interval.finite if interval.finite else float("nan")
        grad_norm = interval.grad_norm / interval.finite if interval.finite else float("nan")
        img_s = interval.images / elapsed
        sec_per_step = elapsed / max(interval.steps, 1)
        record = {"step": p.step, "images_seen": p.images_seen, "loss": mean_loss, "grad_norm": grad_norm, "lr": lr,
                  "images_per_s": round(img_s, 2), "sec_per_step": round(sec_per_step, 4),
                  "skipped_steps": p.skipped_steps, "gpu_mem_gib": round(memory, 2) if memory is not None else None,
                  "time": time.time()}
        self.reporter.record(record)
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")},
                             step=p.step)
        eta = format_duration(sec_per_step * (t.max_steps - p.step))
        if not self.reporter.interactive:
            self.reporter.line(
                f"step {p.step}/{t.max_steps}  loss {mean_loss:.4f}  grad {grad_norm:.3f}  lr {lr:.2e}  "
                f"{img_s:.1f} img/s" + (f"  mem {memory:.1f} GiB" if memory is not None else "") + f"  eta {eta}")
        interval.reset()

    def _checkpoint(self, interval: Interval) -> None:
        p, acc = self.progress, self.accelerator
        path = save_checkpoint(acc, self.run_dir, p.step, self.recipe.train.keep_checkpoints, net=self.net,
                               ema=self.ema, optimizer=self.optimizer, noise_scheduler=self.noise_scheduler, progress=p,
                               meta=pipeline_meta(self.recipe, self.manifest, p, self.run_dir), scaler=acc.scaler)
        self.last_saved = p.step
        self.reporter.line(f"checkpoint {path}")
        self.reporter.plot()

    def _grid(self, step: int) -> None:
        if self.accelerator.is_main_process:
            path = self.grid.write(self.ema.model, dict(self.noise_scheduler.config), step)
            self.reporter.line(f"samples {path}")
        self.accelerator.wait_for_everyone()

    def _fid(self, step: int) -> None:
        if self.accelerator.is_main_process:
            record = self.fid_monitor.measure(self.ema.model, dict(self.noise_scheduler.config), step,
                                              self.progress.images_seen)
            self.reporter.record(record)
            self.accelerator.log({f"fid{record['fid_num']}": record["fid"], "stripes": record["stripes"]}, step=step)
            self.reporter.line(f"fid{record['fid_num']} {record['fid']:.2f} at step {step}, stripe score "
                               f"{100 * record['stripes']:.2f}% ({record['fid_seconds']:.0f} s)")
        self.accelerator.wait_for_everyone()

    def _too_many_nonfinite(self) -> None:
        p, t = self.progress, self.recipe.train
        latest = latest_checkpoint(self.run_dir)
        raise WdmError(
            f"training stopped: the loss or gradients were non-finite for {p.nonfinite_in_a_row} steps in a row "
            f"(up to step {p.step}); the last checkpoint is {latest or 'none'}. Try a lower optim.lr, a longer "
            f"optim.warmup_steps, optim.max_grad_norm = 1, or train.precision = \"fp32\" to rule out bf16 "
            f"(docs/train.md, Troubleshooting); raise train.max_nonfinite ({t.max_nonfinite}) to tolerate more")
