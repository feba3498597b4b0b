"""The training loop: DDPM epsilon-prediction on a latent (or pixel) cache, on one CPU or many GPUs through
Accelerate, with exact resume.

One optimizer step, as U-ViT/DiM train WD-Mamba's peers:

    x0 ~ cache (posterior sample, random flip)      t ~ U{0..T-1}      eps ~ N(0, I)
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps     labels -> null class with p = train.label_dropout
    loss = || eps_theta(x_t, t, y) - eps ||^2       AdamW (no decay on A_log, D, norms, biases, embeddings)
    linear warm-up, gradient clipping, EMA (fp32) of the weights

Exact resume. Everything random in step s (which images, their posterior noise and flips, t, eps, the
dropped labels) comes from generators seeded by (train.seed, s, micro-batch, rank), never from iterator
or global RNG state, and the learning rate and EMA decay are functions of s. So a checkpoint needs only
the weights, optimizer, EMA and step, and 2 steps + resume + 2 steps equals 4 steps bitwise on CPU. The
image order is a seeded permutation per epoch over a stream of `train.batch_size` images per step, so
the same images are seen whatever the number of processes.

Checkpoints are written by all processes into `checkpoints/.step-N.tmp` and renamed to `step-N` by the
main process when complete (a kill during a save leaves the previous checkpoint as the latest), with a
`pipeline/` folder (EMA + online weights, scheduler, autoencoder reference) that `wdmctl sample`, `fid`
and `export` load without pickle.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from wdmctl import config as cfg
from wdmctl.checkpoint_integrity import (describe_newest_intact, prune_checkpoints, require_resumable,
                                         resume_point)
from wdmctl.cuda_graphs import capture, run_on_side_stream
from wdmctl.data.cache_integrity import verify_cache
from wdmctl.disk_full import write_failure
from wdmctl.errors import WdmError
from wdmctl.integrity import write_integrity
from wdmctl.pipeline import save_pipeline, write_json_atomic
from wdmctl.runs import (RunLock, checkpoint_dir, create_run_dir, latest_checkpoint, newest_run, remove_tree,
                         resolve_checkpoint_arg, run_suffix)

# purposes mixed into derived seeds, so the streams of one step never coincide
_EPOCH, _DATA, _NOISE = 1, 2, 3


class TrainingInterrupted(WdmError):
    """Ctrl-C / SIGTERM: the loop stopped at a step boundary and saved a checkpoint."""

    exit_code = 130


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (numpy's SeedSequence hashing: no correlated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------------------
# Data: micro-batch k of a process is a pure function of (seed, k, rank)
# ----------------------------------------------------------------------------------------------------

class StepBatches(torch.utils.data.Dataset):
    """Item k = micro-batch (step, micro) = divmod(k, grad_accum) of this process, as (step, micro, x, y).

    Global image stream: step s consumes positions [s * batch_size, (s + 1) * batch_size); position i is
    image perm_e[i mod N] of epoch e = i // N, perm_e a seeded permutation. Micro-batch m of rank r takes
    the slice starting at (m * world_size + r) * micro_batch. The dataset's own randomness (posterior noise,
    flips; torch's global RNG) is seeded per micro-batch, so DataLoader workers need no seeding either.
    """

    def __init__(self, dataset, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int):
        if batch_size % (grad_accum * world_size):
            raise WdmError(f"train.batch_size {batch_size} is not divisible by train.grad_accum ({grad_accum}) x "
                           f"processes ({world_size}); pick a batch size that splits evenly")
        self.dataset, self.batch_size, self.grad_accum = dataset, batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.micro_batch = batch_size // (grad_accum * world_size)
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:  # only a bound: the sampler says which items are read
        return 2 ** 62

    def _permutation(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, _EPOCH, epoch))
            perm = torch.randperm(len(self.dataset), generator=generator)
            self._perms = {epoch - 1: self._perms[epoch - 1]} if epoch - 1 in self._perms else {}
            self._perms[epoch] = perm
        return perm

    def indices(self, step: int, micro: int) -> list[int]:
        n = len(self.dataset)
        first = step * self.batch_size + (micro * self.world_size + self.rank) * self.micro_batch
        return [int(self._permutation(i // n)[i % n]) for i in range(first, first + self.micro_batch)]

    def __getitem__(self, k: int):
        step, micro = divmod(k, self.grad_accum)
        indices = self.indices(step, micro)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, _DATA, step, micro, self.rank))
            items = [self.dataset[i] for i in indices]
        x = torch.stack([item[0] for item in items])
        y = torch.stack([torch.as_tensor(item[1]) for item in items]).long()
        return step, micro, x, y


# ----------------------------------------------------------------------------------------------------
# Loss, optimizer groups, schedule, EMA
# ----------------------------------------------------------------------------------------------------

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


@dataclass
class TrainState:
    """Counters saved with every checkpoint (registered with Accelerate)."""

    step: int = 0               # optimizer steps taken, skipped ones included (their batch is consumed)
    images_seen: int = 0        # images of the steps that updated the weights
    skipped_steps: int = 0      # non-finite steps, in total
    nonfinite_in_a_row: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


# ----------------------------------------------------------------------------------------------------
# Planning: which run directory, resume from where
# ----------------------------------------------------------------------------------------------------

@dataclass
class RunPlan:
    """What `train` will do, decided before anything is written (also what --dry-run prints)."""

    recipe: cfg.Recipe                  # resolved
    recipe_name: str
    runs_dir: Path
    manifest: dict[str, Any] | None
    run_dir: Path | None = None         # None: a new run folder will be created
    resume_from: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def suffix(self) -> str:
        return run_suffix(self.recipe_name, self.recipe.model.preset)

    def describe(self) -> str:
        where = str(self.run_dir) if self.run_dir else f"{self.runs_dir}/<next>-{self.suffix} (new)"
        lines = [f"run: {where}"]
        if self.resume_from is not None:
            lines.append(f"resume: {self.resume_from}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def load_cache_manifest(recipe: cfg.Recipe, required: bool = True) -> dict[str, Any] | None:
    """The cache manifest, or None (with `required` False) when the cache does not exist yet."""
    from wdmctl.data.cache import load_manifest

    path = Path(recipe.data.cache)
    if not path.exists():
        if not required:
            return None
        raise WdmError(f"data.cache {path} does not exist; build it with `wdmctl cache` (the recipe's header "
                       f"comment has the command)")
    return load_manifest(path)


def plan_run(recipe: cfg.Recipe, recipe_name: str, runs_dir: str | Path = "runs", resume: str = "latest",
             manifest: dict[str, Any] | None = None, need_cache: bool = True) -> RunPlan:
    """Resolve the recipe against the cache and decide the run folder:

    - `resume="none"`: a new run.
    - `"latest"`: the newest run of the same recipe and model, resumed from its latest checkpoint, unless its
      recipe differs in a key that changes the optimisation (then a new run, with a note saying why).
    - a path (run or checkpoint folder): resume from it; the model must be the same. A checkpoint that is not
      its run's latest continues in a new run folder, so no later checkpoint is ever overwritten.
    """
    if manifest is None:
        manifest = load_cache_manifest(recipe, required=need_cache)
    resolved = cfg.resolve(recipe, manifest)
    plan = RunPlan(resolved, recipe_name, Path(runs_dir), manifest)
    if manifest is None:
        plan.notes.append(f"cache {recipe.data.cache} not found: model fields shown from the preset; build the "
                          f"cache before training")
    if resume == "none":
        return plan
    if resume == "latest":
        run = newest_run(runs_dir, plan.suffix)
        if run is None:
            return plan
        changed = _recipe_changes(run, resolved)
        if changed is None or changed[0]:
            why = "its recipe.toml is missing" if changed is None else _describe_changes(changed[0])
            plan.notes.append(f"not resuming {run}: {why}; starting a new run (--resume {run} forces it)")
            return plan
        resume_from, skipped = resume_point(run)  # past damaged or incomplete checkpoints, each noted
        plan.run_dir, plan.resume_from = run, resume_from
        plan.notes.extend(skipped)
        if changed[1]:
            plan.notes.append(f"resuming with changed settings: {_describe_changes(changed[1])}")
        return plan
    checkpoint = resolve_checkpoint_arg(resume)
    run = checkpoint.parent.parent
    named = checkpoint.resolve() == Path(resume).resolve()
    if named:
        require_resumable(checkpoint, resume)  # a damaged checkpoint asked for by name is an error
    newest, skipped = resume_point(run)
    if not named:  # a run folder: its newest intact checkpoint, past damaged ones
        checkpoint = newest
        plan.notes.extend(skipped)
    changed = _recipe_changes(run, resolved)
    if changed is not None:
        model_changes = [c for c in changed[0] if c[0].startswith("model.")]
        if model_changes:
            raise WdmError(f"--resume {resume}: the checkpoint's model differs from the recipe's "
                           f"({_describe_changes(model_changes)})")
        if changed[0] or changed[1]:
            plan.notes.append(f"resuming with changed settings: {_describe_changes(changed[0] + changed[1])}")
    plan.resume_from = checkpoint
    if checkpoint == newest:
        plan.run_dir = run
    else:
        plan.notes.append(f"{checkpoint.name} is not the latest checkpoint of {run}; continuing in a new run")
    return plan


def _recipe_changes(run: Path, recipe: cfg.Recipe):
    """(changes that make it a different experiment, harmless changes) against run/recipe.toml, or None."""
    path = run / "recipe.toml"
    if not path.exists():
        return None
    old = cfg.read_recipe_file(path)
    everything = cfg.differences(old, recipe)
    hard = cfg.differences(old, recipe, ignore=cfg.RESUMABLE_KEYS)
    return hard, [c for c in everything if c not in hard]


def _describe_changes(changes) -> str:
    shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes[:4])
    return shown + (f" (+{len(changes) - 4} more)" if len(changes) > 4 else "")


# ----------------------------------------------------------------------------------------------------
# Output: progress bar or plain lines, log.txt, stats.jsonl, loss curve
# ----------------------------------------------------------------------------------------------------

class Reporter:
    """Main-process output. A rich progress bar when stdout is a terminal, plain lines otherwise; every line
    also goes to log.txt. Other processes stay silent."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.log_path = run_dir / "log.txt"
        self.stats_path = run_dir / "stats.jsonl"
        self.interactive = enabled and sys.stdout.isatty()
        self.progress = None

    def start_bar(self, first_step: int, total_steps: int) -> None:
        """The progress bar starts after a resume, so its speed and ETA count only this session's steps."""
        if self.interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), refresh_per_second=4)
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, status="")
            self.progress.start()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a") as f:
            f.write(f"{stamp} {text}\n")
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def step(self, step: int, status: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)

    def record(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.stats_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_stats(self, step: int) -> None:
        """Drop records after `step` (logged after the checkpoint we resume from, so about to be redone)."""
        if not self.enabled or not self.stats_path.exists():
            return
        kept = [line for line in self.stats_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.stats_path.with_name(".stats.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.stats_path)

    def records(self) -> list[dict[str, Any]]:
        if not self.stats_path.exists():
            return []
        return [json.loads(line) for line in self.stats_path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def draw_loss_curve(steps: list[int], losses: list[float], path: str | Path, title: str = "training loss") -> Path:
    """A loss-vs-step PNG drawn with PIL (log-scale loss axis, labelled min/max), written atomically."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 640, 400, 70, 20, 30, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    points = [(s, l) for s, l in zip(steps, losses) if l is not None and math.isfinite(l) and l > 0]
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    if points:
        s_min, s_max = points[0][0], max(points[-1][0], points[0][0] + 1)
        logs = [math.log10(l) for _, l in points]
        y_min, y_max = min(logs), max(logs)
        if y_max - y_min < 1e-6:
            y_min, y_max = y_min - 0.5, y_max + 0.5

        def xy(s: float, y: float) -> tuple[float, float]:
            return (left + (s - s_min) / (s_max - s_min) * plot_w, top + (y_max - y) / (y_max - y_min) * plot_h)

        # ticks at the decades and halves inside the range, labelled with the loss value
        for k in range(math.floor(y_min * 2), math.ceil(y_max * 2) + 1):
            y = k / 2
            if y_min <= y <= y_max:
                _, py = xy(s_min, y)
                draw.line([left - 4, py, left, py], fill="black")
                draw.text((4, py - 6), f"{10 ** y:.3g}", fill="black")
        for label_y in (y_min, y_max):
            _, py = xy(s_min, label_y)
            draw.text((4, py - 6), f"{10 ** label_y:.3g}", fill="gray")
        draw.text((left, top + plot_h + 6), str(s_min), fill="black")
        text = f"step {s_max}"
        draw.text((left + plot_w - 7 * len(text), top + plot_h + 6), text, fill="black")
        coords = [xy(s, y) for (s, _), y in zip(points, logs)]
        if len(coords) == 1:
            x, y = coords[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill="navy")
        else:
            draw.line(coords, fill="navy", width=2)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def grid_labels(n: int, num_classes: int) -> list[int] | None:
    """Fixed labels of the sample grid: 0, 1, 2, ... cycling (each column one class when the grid is as wide
    as a multiple of the classes), or spread evenly over the classes when there are more classes than images."""
    if num_classes <= 0:
        return None
    if num_classes <= n:
        return [i % num_classes for i in range(n)]
    return [i * num_classes // n for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, write_extras: Callable[[Path], None]) -> Path:
    """accelerate save_state into checkpoints/.step-N.tmp (every process), extras (pipeline/, meta.json) and
    last integrity.json by the main process, then rename to step-N and prune to the newest `keep` intact ones.
    Any failure leaves the previous checkpoints untouched; a leftover temp folder is ignored by readers and
    removed by the next save. A full disk (or another OS error) ends in a one-line error naming the file, the
    free space and the newest intact checkpoint."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_tree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_extras(tmp)
            write_integrity(tmp)  # last: a checkpoint without it is incomplete
            remove_tree(final)  # only when re-saving a step this run already saved (same state), or a damaged one
            os.replace(tmp, final)
            prune_checkpoints(run_dir, keep)
    except BaseException as err:
        if accelerator.is_main_process:
            import shutil

            # named before the partial folder (and the file it was writing) is removed
            failure = write_failure(err, tmp, f"saving checkpoint {final.name}", describe_newest_intact(run_dir),
                                    any_os_error=True)
            shutil.rmtree(tmp, ignore_errors=True)
            if failure is not None:
                raise failure from None
        raise
    accelerator.wait_for_everyone()
    return final


def pipeline_meta(recipe: cfg.Recipe, manifest: dict[str, Any], state: TrainState, run_dir: Path) -> dict[str, Any]:
    """wdmctl.json of a checkpoint's pipeline folder: what sample/fid/export need besides the weights."""
    sample, fid = recipe.sample, recipe.fid
    return {
        "autoencoder": manifest["autoencoder"],
        "class_names": list(manifest.get("class_names") or []),
        "num_classes": recipe.model.num_classes,
        "latent_shape": list(manifest["latent_shape"]),
        "resolution": manifest.get("resolution"),
        "sample": {"steps": sample.steps, "cfg": sample.cfg, "solver": None if sample.solver == "auto" else sample.solver},
        "fid": {"num": fid.num, "ref": fid.ref, "resolution": fid.resolution or manifest.get("resolution"),
                "steps": fid.steps, "cfg": fid.cfg},
        "step": state.step,
        "images_seen": state.images_seen,
        "recipe": cfg.to_dict(recipe),
        "recipe_hash": cfg.recipe_hash(recipe),
        "cache": str(Path(recipe.data.cache).resolve()),
        "run": run_dir.name,
    }


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------

def resolve_precision(setting: str, device_type: str) -> str:
    """`auto` -> bf16 on a CUDA device that supports it, else no mixed precision. An explicit setting wins
    over `accelerate launch --mixed_precision` (Accelerate's rule for an explicit argument)."""
    if setting != "auto":
        return setting
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop reads at the next step boundary (all processes agree on it
    through the step's all-reduce), so a checkpoint is never taken mid-update. A second Ctrl-C aborts."""

    def __init__(self):
        self.stop = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        import threading

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


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def train(recipe: cfg.Recipe, recipe_name: str, runs_dir: str | Path = "runs", resume: str = "latest",
          verify: bool = False) -> Path:
    """Train (or resume) a run of `recipe`; returns the run folder. Works the same under `accelerate launch`
    with any number of processes. See the module docstring for the step and checkpoint semantics. `verify`
    hashes every cache shard against the cache manifest first (sizes and framing are always checked)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # join the launcher's process group (over gloo when there is no GPU), so the main process decides for all
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:  # every process would think it is alone and write the same run
        raise WdmError(f"launched as {launched} processes but Accelerate joined {state.num_processes}; use "
                       f"`accelerate launch --multi_gpu --num_processes N -m wdmctl train ...`")
    # ---- plan (main process) and share the decision --------------------------------------------------
    decision: list[Any] = [None]
    lock: RunLock | None = None
    if state.is_main_process:
        try:
            plan = plan_run(recipe, recipe_name, runs_dir, resume)
            verify_cache(recipe.data.cache, full=verify)  # a damaged shard is named before a run folder is made
            run_dir = plan.run_dir or create_run_dir(runs_dir, plan.suffix)
            lock = RunLock(run_dir).acquire()
            old = run_dir / "recipe.toml"
            text = f"# resolved recipe of {run_dir.name} (from {recipe_name}; wdmctl train)\n" + cfg.to_toml(plan.recipe)
            if not old.exists() or old.read_text() != text:
                tmp = run_dir / ".recipe.toml.tmp"
                tmp.write_text(text)
                os.replace(tmp, old)
            decision = [(str(run_dir), str(plan.resume_from) if plan.resume_from else None, plan.notes, None)]
        except WdmError as err:
            if lock is not None:
                lock.release()
                lock = None
            decision = [(None, None, [], str(err))]
    if state.num_processes > 1:
        broadcast_object_list(decision, from_process=0)
    run_dir_text, resume_text, notes, error = decision[0]
    if error:
        raise WdmError(error)
    try:
        return _train_in(Path(run_dir_text), resume_text, notes, recipe, state)
    except (OSError, RuntimeError) as err:  # a full disk while writing logs or grids (checkpoints: save_checkpoint)
        failure = write_failure(err, run_dir_text, "training", describe_newest_intact(run_dir_text))
        if failure is None:
            raise
        raise failure from None
    finally:
        if lock is not None:
            lock.release()


def _train_in(run_dir: Path, resume_text: str | None, notes: list[str], recipe: cfg.Recipe, state) -> Path:
    """The part of `train` after the run folder is decided (and locked)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from wdmctl.data.cache import LatentDataset
    from wdmctl.diffusion import make_noise_scheduler
    from wdmctl.models.presets import build_model
    from wdmctl.scan import resolve_backend

    manifest = load_cache_manifest(recipe)
    recipe = cfg.resolve(recipe, manifest)
    t = recipe.train

    # ---- accelerator, model, optimizer ---------------------------------------------------------------
    cpu = state.device.type == "cpu"
    precision = resolve_precision(t.precision, state.device.type)
    log_with = "tensorboard" if recipe.log.tensorboard and _tensorboard_available() else None
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=precision, log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
    )
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    rank, world = accelerator.process_index, accelerator.num_processes
    if t.cuda_graph and (device.type != "cuda" or world > 1):
        raise WdmError(f"train.cuda_graph needs one CUDA GPU; this run has {world} process(es) on {device.type}")
    reporter = Reporter(run_dir, accelerator.is_main_process)
    try:
        for note in notes:
            reporter.line(f"note: {note}")
        resolve_backend(recipe.model.scan_backend, device.type)  # unknown/uninstalled backend: one-line error
        dataset = LatentDataset(recipe.data.cache, flip=recipe.data.flip)
        if len(dataset) == 0:
            raise WdmError(f"the cache {recipe.data.cache} holds no images")
        batches = StepBatches(dataset, t.batch_size, t.grad_accum, world, rank, t.seed)

        torch.manual_seed(t.seed)  # the initial weights depend on the seed only
        net = build_model(recipe.model.preset, **cfg.model_kwargs(recipe))
        net.set_scan_backend(recipe.model.scan_backend)
        if t.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        ema = EMA(net, recipe.ema.decay, recipe.ema.warmup)
        ema.model.to(device)
        noise_scheduler = make_noise_scheduler(**asdict(recipe.diffusion))
        abar = alphas_cumprod(noise_scheduler, device)
        null_class = recipe.model.num_classes if recipe.model.num_classes > 0 else None
        o = recipe.optim
        optimizer = torch.optim.AdamW(param_groups(net, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      fused=device.type == "cuda", capturable=t.cuda_graph)
        if t.compile:
            net.compile()  # in place: parameter names (and so checkpoints) stay the same
        model, optimizer = accelerator.prepare(net, optimizer)
        progress = TrainState()
        accelerator.register_for_checkpointing(ema, progress)
        if resume_text:
            accelerator.load_state(resume_text)
            reporter.line(f"resumed from {resume_text} at step {progress.step} ({progress.images_seen} images seen)")
        reporter.truncate_stats(progress.step)
        if log_with:
            accelerator.init_trackers("tb", config=cfg.flatten(recipe))

        params = sum(p.numel() for p in net.parameters())
        reporter.line(
            f"run {run_dir} | {recipe.model.preset} {params / 1e6:.2f}M params | data {len(dataset)} images "
            f"{'x'.join(str(v) for v in manifest['latent_shape'])} | batch {t.batch_size} = {world} proc x "
            f"{t.grad_accum} accum x {batches.micro_batch} | precision {precision} | {device}"
            + (f" | each step one CUDA graph after {_GraphedStep.WARMUP} eager warm-up steps" if t.cuda_graph else ""))
        if progress.step >= t.max_steps:
            reporter.line(f"already at step {progress.step} >= train.max_steps {t.max_steps}: nothing to do "
                          f"(raise it with --max-steps)")
            return run_dir

        reporter.start_bar(progress.step, t.max_steps)
        grid = _GridWriter(recipe, manifest, run_dir, device, precision, accelerator)
        loop = _Loop(accelerator, model, net, optimizer, ema, progress, batches, abar, null_class, recipe,
                     reporter, run_dir, manifest, noise_scheduler, grid, precision)
        with _StopFlag() as stop:
            loop.run(stop)
        return run_dir
    finally:
        reporter.close()
        if log_with:
            accelerator.end_training()


class _GridWriter:
    """EMA sample grids from fixed seeds and labels (samples/grid-NNNNNNN.png), on the main process."""

    def __init__(self, recipe: cfg.Recipe, manifest, run_dir: Path, device, precision: str, accelerator):
        s = recipe.sample
        self.recipe, self.manifest, self.run_dir, self.device, self.accelerator = recipe, manifest, run_dir, device, accelerator
        self.seeds = [s.seed + i for i in range(s.grid_n)]
        self.labels = grid_labels(s.grid_n, recipe.model.num_classes)
        self.precision = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "fp32")
        self.decoder = None

    def write(self, ema_model, scheduler_config: dict, step: int) -> Path:
        from wdmctl.sampling import Decoder, sample_images, save_grid

        if self.decoder is None:  # loads the autoencoder once, on first use
            self.decoder = Decoder(self.manifest["autoencoder"], self.device)
        s = self.recipe.sample
        images = sample_images(ema_model, scheduler_config, self.manifest["autoencoder"], self.seeds, self.labels,
                               steps=s.steps, cfg=s.cfg, solver=None if s.solver == "auto" else s.solver,
                               batch_size=min(len(self.seeds), 64), device=self.device, precision=self.precision,
                               decoder=self.decoder)
        path = self.run_dir / "samples" / f"grid-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path)
        if self.accelerator.trackers:
            from PIL import Image

            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("samples/ema", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        return path


@dataclass
class _Interval:
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


class _GraphedStep:
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


class _Loop:
    """The step loop of `train`, with its bookkeeping (kept out of `train` so each part reads on its own)."""

    def __init__(self, accelerator, model, net, optimizer, ema: EMA, progress: TrainState, batches: StepBatches,
                 abar, null_class, recipe: cfg.Recipe, reporter: Reporter, run_dir: Path, manifest, noise_scheduler,
                 grid: _GridWriter, precision: str):
        self.accelerator, self.model, self.net, self.optimizer, self.ema = accelerator, model, net, optimizer, ema
        self.progress, self.batches, self.abar, self.null_class = progress, batches, abar, null_class
        self.recipe, self.reporter, self.run_dir, self.manifest = recipe, reporter, run_dir, manifest
        self.noise_scheduler, self.grid, self.fp16 = noise_scheduler, grid, precision == "fp16"
        self.last_saved = progress.step
        self.graphed = (_GraphedStep(model, optimizer, abar, null_class, recipe.train.label_dropout,
                                     recipe.optim.max_grad_norm or float("inf")) if recipe.train.cuda_graph else None)

    def _loader(self, first_step: int, last_step: int):
        t, workers = self.recipe.train, self.recipe.data.num_workers
        return torch.utils.data.DataLoader(
            self.batches, batch_size=None, sampler=range(first_step * t.grad_accum, last_step * t.grad_accum),
            num_workers=workers, pin_memory=self.accelerator.device.type == "cuda",
            prefetch_factor=4 if workers else None, persistent_workers=False)

    def run(self, stop: _StopFlag) -> None:
        acc, t, p = self.accelerator, self.recipe.train, self.progress
        device = acc.device
        max_norm = self.recipe.optim.max_grad_norm or float("inf")
        batches = iter(self._loader(p.step, t.max_steps))
        interval = _Interval()
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
                generator = torch.Generator(device).manual_seed(derive_seed(t.seed, _NOISE, step, micro, acc.process_index))
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

    def _graphed_step(self, step: int, batches, stop: _StopFlag, interval: _Interval) -> None:
        """One optimizer step through `_GraphedStep` (train.cuda_graph: one process, no accumulation, not fp16).
        The graph's AdamW skips a non-finite step itself; the host still decides the EMA and the bookkeeping."""
        t, p = self.recipe.train, self.progress
        got_step, got_micro, x, y = next(batches)
        assert (got_step, got_micro) == (step, 0), "data stream out of step"
        seed = derive_seed(t.seed, _NOISE, step, 0, self.accelerator.process_index)
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

    def _end_step(self, step: int, interval: _Interval, finite: bool, loss_value: float, grad_norm: float,
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

    def _after_step(self, interval: _Interval, loss_value: float, stop_requested: bool) -> None:
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
        interval.maintenance += time.perf_counter() - maintenance

    def _learning_rate(self, step: int) -> float:
        o = self.recipe.optim
        return learning_rate(step, o.lr, o.warmup_steps, o.schedule, self.recipe.train.max_steps)

    def _log(self, interval: _Interval, elapsed: float, memory: float | None) -> None:
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
        eta = _format_duration(sec_per_step * (t.max_steps - p.step))
        if not self.reporter.interactive:
            self.reporter.line(
                f"step {p.step}/{t.max_steps}  loss {mean_loss:.4f}  grad {grad_norm:.3f}  lr {lr:.2e}  "
                f"{img_s:.1f} img/s" + (f"  mem {memory:.1f} GiB" if memory is not None else "") + f"  eta {eta}")
        interval.reset()

    def _checkpoint(self, interval: _Interval) -> None:
        p = self.progress
        meta = pipeline_meta(self.recipe, self.manifest, p, self.run_dir)

        def extras(folder: Path) -> None:
            save_pipeline(folder / "pipeline", self.ema.model, self.noise_scheduler, meta, online_model=self.net)
            write_json_atomic(folder / "meta.json", {"step": p.step, "images_seen": p.images_seen,
                                                     "skipped_steps": p.skipped_steps,
                                                     "recipe_hash": meta["recipe_hash"]})

        path = save_checkpoint(self.accelerator, self.run_dir, p.step, self.recipe.train.keep_checkpoints, extras)
        self.last_saved = p.step
        self.reporter.line(f"checkpoint {path}")
        if self.accelerator.is_main_process:
            records = self.reporter.records()
            draw_loss_curve([r["step"] for r in records], [r["loss"] for r in records], self.run_dir / "loss.png",
                            title=f"{self.run_dir.name}: training loss (mean per log interval)")

    def _grid(self, step: int) -> None:
        if self.accelerator.is_main_process:
            path = self.grid.write(self.ema.model, dict(self.noise_scheduler.config), step)
            self.reporter.line(f"samples {path}")
        self.accelerator.wait_for_everyone()

    def _too_many_nonfinite(self) -> None:
        p, t = self.progress, self.recipe.train
        latest = latest_checkpoint(self.run_dir)
        raise WdmError(
            f"training stopped: the loss or gradients were non-finite for {p.nonfinite_in_a_row} steps in a row "
            f"(up to step {p.step}); the last checkpoint is {latest or 'none'}. Try a lower optim.lr, a longer "
            f"optim.warmup_steps, optim.max_grad_norm = 1, or train.precision = \"no\" to rule out bf16 "
            f"(docs/train.md, Troubleshooting); raise train.max_nonfinite ({t.max_nonfinite}) to tolerate more")


# ----------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------

def benchmark_train_step(preset: str, backend: str = "auto", batch_size: int = 32, resolution: int = 32,
                         precision: str = "bf16", iters: int = 10, warmup: int = 3,
                         gradient_checkpointing: bool = False, compile: bool = False, device: str | None = None,
                         profile: bool = False, cuda_graph: bool = False, **model_overrides: Any) -> dict[str, Any]:
    """Throughput (images/s) and peak memory of one full training step of `preset` with random weights and
    data: the loop's loss (`diffusion_loss`), backward, clipping and fused AdamW, under autocast as
    Accelerate runs it. `resolution` is the latent side (32 = 256 px with the SD VAE). `profile` (CUDA) adds
    where a step's GPU time goes, by kernel category (`wdmctl.bench.step_profile`). `cuda_graph` (CUDA)
    replays the whole step (loss, backward, clipping, AdamW) as one CUDA graph, which shows the step's speed
    without the host's ~2,700 kernel launches (`capture_train_step`)."""
    from wdmctl.bench import peak_memory_gib, profile_kernels, step_profile, time_fn
    from wdmctl.diffusion import make_noise_scheduler
    from wdmctl.models.presets import build_model

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision not in dtypes:
        raise WdmError(f"precision must be one of {', '.join(dtypes)}, not {precision!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cuda_graph and device.type != "cuda":
        raise WdmError("CUDA graphs need a CUDA device")
    torch.manual_seed(0)
    model = build_model(preset, sample_size=resolution, **model_overrides).to(device).train()
    if model.is_mamba:
        model.set_scan_backend(backend)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if compile:
        model.compile()
    optimizer = torch.optim.AdamW(param_groups(model, 0.03), lr=2e-4, betas=(0.99, 0.99), fused=device.type == "cuda",
                                  capturable=cuda_graph)
    c, n_classes = model.config.in_channels, model.config.num_classes
    x = torch.randn(batch_size, c, resolution, resolution, device=device)
    y = torch.randint(0, n_classes, (batch_size,), device=device) if n_classes else None
    abar = alphas_cumprod(make_noise_scheduler(), device)
    # a graph replays the default generator's RNG (offsets advance per replay); a private one would need registering
    generator = None if cuda_graph else torch.Generator(device).manual_seed(0)
    dtype = dtypes[precision]

    def update() -> None:
        # weight-cast cache off while capturing, as PyTorch asks of graphed autocast regions (make_graphed_callables
        # refuses it); an autocast region that opens and closes inside the capture, as train.cuda_graph's does
        # through Accelerate, clears its cache on exit and records the casts anyway
        autocast = (torch.autocast(device.type, dtype=dtype, cache_enabled=not cuda_graph) if dtype is not None
                    else nullcontext())
        with autocast:
            loss = diffusion_loss(model, x, y, abar, generator, 0.1, n_classes or None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def step() -> None:
        update()
        optimizer.zero_grad(set_to_none=True)

    if cuda_graph:
        step = capture_train_step(update, optimizer)
    ms = time_fn(step, warmup=warmup, iters=iters)
    peak = peak_memory_gib(step)
    extra = {"profile": step_profile(profile_kernels(step), ms)} if profile and device.type == "cuda" else {}
    return {
        "preset": preset, "arch": model.config.arch, "backend": backend if model.is_mamba else "n/a (attention)",
        "scan": model.config.scan if model.is_mamba else None,
        "batch_size": batch_size, "latent": [c, resolution, resolution], "precision": precision,
        "gradient_checkpointing": gradient_checkpointing, "compile": compile, "cuda_graph": cuda_graph,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "ms_per_step": round(ms, 2), "images_per_s": round(batch_size / ms * 1e3, 1), "peak_memory_gib": peak,
        **extra,
    }


def eager_step_before_capture(update: Callable[[], None], optimizer: torch.optim.Optimizer) -> None:
    """One eager `update` (forward, backward, clipping, optimizer.step; no zero_grad) as warm-up before a
    capture (`wdmctl.cuda_graphs.run_on_side_stream`). Gradients are freed after it, so a captured backward
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
