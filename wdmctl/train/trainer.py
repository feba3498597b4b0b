"""`wdmctl train`: DDPM epsilon-prediction on a latent (or pixel) cache, on one CPU or many GPUs through
Accelerate, with exact resume. This module plans the run, builds the model, optimizer, EMA and data stream,
resumes, and hands over to the step loop (wdmctl.train.loop).

One optimizer step, as U-ViT/DiM train WD-Mamba's peers:

    x0 ~ cache (posterior sample, random flip)      t ~ U{0..T-1}      eps ~ N(0, I)
    loss = || eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y) - eps ||^2     (wdmctl.train.objective)

Checkpoints (wdmctl.train.checkpoint) hold every tensor once, as safetensors, with the `pipeline/` folder
that `wdmctl sample`, `fid` and `export` load.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from wdmctl import config as cfg
from wdmctl.core.disk_full import write_failure
from wdmctl.core.io import write_text_atomic
from wdmctl.data.cache import LatentDataset, verify_cache
from wdmctl.diffusion.schedule import make_noise_scheduler
from wdmctl.errors import WdmError
from wdmctl.models.presets import build_model
from wdmctl.runs import RunLock, create_run_dir
from wdmctl.scan import resolve_backend
from wdmctl.train.checkpoint import TrainState, describe_newest_intact, load_checkpoint
from wdmctl.train.data import StepBatches
from wdmctl.train.fid_monitor import FidMonitor
from wdmctl.train.graphed import GraphedStep
from wdmctl.train.grid import GridWriter
from wdmctl.train.loop import StepLoop, StopFlag
from wdmctl.train.objective import EMA, alphas_cumprod, param_groups
from wdmctl.train.plan import load_cache_manifest, plan_run
from wdmctl.train.report import Reporter


def resolve_precision(setting: str, device_type: str) -> str:
    """`auto` -> bf16 on a CUDA device that supports it, else fp32. An explicit setting wins over
    `accelerate launch --mixed_precision` (Accelerate's rule for an explicit argument)."""
    if setting != "auto":
        return setting
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def train(recipe: cfg.Recipe, recipe_name: str, runs_dir: str | Path = "runs", resume: str = "latest",
          verify: bool = False) -> Path:
    """Train (or resume) a run of `recipe`; returns the run folder. Works the same under `accelerate launch`
    with any number of processes. See the module docstring for the step and checkpoint semantics. `verify`
    hashes every cache shard against the cache manifest first (sizes and framing are always checked)."""
    from accelerate import PartialState  # here: Accelerate's import is slow, and --dry-run never needs it
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
                write_text_atomic(old, text)
            decision = [(str(run_dir), str(plan.resume_from) if plan.resume_from else None, plan.warnings,
                         plan.notes, None)]
        except WdmError as err:
            if lock is not None:
                lock.release()
                lock = None
            decision = [(None, None, [], [], str(err))]
    if state.num_processes > 1:
        broadcast_object_list(decision, from_process=0)
    run_dir_text, resume_text, warnings, notes, error = decision[0]
    if error:
        raise WdmError(error)
    try:
        return _train_in(Path(run_dir_text), resume_text, warnings, notes, recipe, state)
    except OSError as err:  # a full disk while writing logs or grids (checkpoints: save_checkpoint)
        failure = write_failure(err, run_dir_text, "training", describe_newest_intact(run_dir_text))
        if failure is None:
            raise
        raise failure from None
    finally:
        if lock is not None:
            lock.release()


def _train_in(run_dir: Path, resume_text: str | None, warnings: list[str], notes: list[str], recipe: cfg.Recipe,
              state) -> Path:
    """The part of `train` after the run folder is decided (and locked)."""
    from accelerate import Accelerator  # here: see train
    from accelerate.utils import ProjectConfiguration

    manifest = load_cache_manifest(recipe)
    recipe = cfg.resolve(recipe, manifest)
    t = recipe.train

    # ---- accelerator, model, optimizer ---------------------------------------------------------------
    cpu = state.device.type == "cpu"
    precision = resolve_precision(t.precision, state.device.type)
    log_with = "tensorboard" if recipe.log.tensorboard and _tensorboard_available() else None
    accelerator = Accelerator(
        cpu=cpu, mixed_precision={"fp32": "no"}.get(precision, precision), log_with=log_with,
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
        for warning in warnings:
            reporter.warn(warning)
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
        if resume_text:
            load_checkpoint(Path(resume_text), net=net, ema=ema, optimizer=optimizer, progress=progress,
                            scaler=accelerator.scaler)
            reporter.line(f"resumed from {resume_text} at step {progress.step} ({progress.images_seen} images seen)")
        reporter.truncate_stats(progress.step)
        if log_with:
            accelerator.init_trackers("tb", config=cfg.flatten(recipe))

        params = sum(p.numel() for p in net.parameters())
        reporter.line(
            f"run {run_dir} | {recipe.model.preset} {params / 1e6:.2f}M params | data {len(dataset)} images "
            f"{'x'.join(str(v) for v in manifest['latent_shape'])} | batch {t.batch_size} = {world} proc x "
            f"{t.grad_accum} accum x {batches.micro_batch} | precision {precision} | {device}"
            + (f" | each step one CUDA graph after {GraphedStep.WARMUP} eager warm-up steps" if t.cuda_graph else ""))
        if progress.step >= t.max_steps:
            reporter.line(f"already at step {progress.step} >= train.max_steps {t.max_steps}: nothing to do "
                          f"(raise it with --max-steps)")
            return run_dir

        reporter.start_bar(progress.step, t.max_steps)
        grid = GridWriter(recipe, manifest, run_dir, device, precision, accelerator)
        fid_monitor = FidMonitor(recipe, manifest, device, precision) if recipe.fid.every else None
        loop = StepLoop(accelerator, model, net, optimizer, ema, progress, batches, abar, null_class, recipe,
                        reporter, run_dir, manifest, noise_scheduler, grid, precision, fid_monitor)
        with StopFlag() as stop:
            loop.run(stop)
        return run_dir
    finally:
        reporter.close()
        if log_with:
            accelerator.end_training()
