"""`wdmctl train`: every shipped recipe at tiny size, exact resume, interrupted saves, run folders,
non-finite steps, the stop signal, a 2-process run, and the pieces of the loop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from wdmctl import config
from wdmctl.train import checkpoint as checkpoint_mod
from wdmctl.train import loop as loop_mod
from wdmctl.train.data import StepBatches
from wdmctl.train.grid import grid_labels
from wdmctl.train.objective import EMA, alphas_cumprod, diffusion_loss, learning_rate, param_groups
from wdmctl.train.trainer import train
from wdmctl.cli import app
from wdmctl.errors import WdmError
from wdmctl.pipeline import load_pipeline
from wdmctl.runs import (checkpoint_pipeline, find_run, latest_checkpoint, list_checkpoints, newest_run)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"
RECIPES = REPO / "recipes"

# a few-step, few-kilobyte version of any recipe: 8x8 digits, 16 tokens, width 16, one block per encoder
TINY = [
    "model.width=16", "model.depth=1", "model.patch_size=2", "model.scan_backend=torch-sequential",
    "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=2", "train.precision=fp32",
    "data.num_workers=0", "sample.grid_n=4", "sample.steps=2", "sample.every=0", "log.every=1",
    "log.tensorboard=false", "optim.warmup_steps=2",
]


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> Path:
    """The built-in digits at 8x8 in pixel space (1,797 images, 10 classes, with flips)."""
    from wdmctl.data.cache import build_cache

    out = tmp_path_factory.mktemp("cache") / "digits8"
    build_cache("digits", out, resolution=8, vae="none")
    return out


def tiny(cache: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.cache={json.dumps(str(cache))}", *extra]


def run_train(recipe: Path, runs: Path, sets: list[str], *args: str):
    cli = ["train", str(recipe), "--runs-dir", str(runs), *args]
    for s in sets:
        cli += ["--set", s]
    return CliRunner().invoke(app, cli)


def train_direct(cache: Path, runs: Path, *extra: str, resume: str = "latest", recipe: str = "quickstart") -> Path:
    loaded = config.load_recipe(RECIPES / f"{recipe}.toml", tiny(cache, *extra))
    return train(loaded, recipe, runs_dir=runs, resume=resume)


def state_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Weights, EMA, optimizer state and counters of a checkpoint, flattened to named tensors."""
    weights = checkpoint / "pipeline"
    state = {f"model.{k}": v for k, v in load_file(weights / "denoiser_online" / WEIGHTS).items()}
    state.update({f"ema.{k}": v for k, v in load_file(weights / "denoiser" / WEIGHTS).items()})
    state.update({f"optim.{k}": v for k, v in load_file(checkpoint / "optimizer.safetensors").items()})
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["ema.num_updates"] = torch.tensor(trainer_state["ema_updates"])
    state.update({f"counter.{k}": torch.tensor(v) for k, v in trainer_state["progress"].items()})
    return state


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ----------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.toml")))
def test_every_shipped_recipe_trains_at_tiny_size(recipe, digits_cache, tmp_path):
    result = run_train(RECIPES / f"{recipe}.toml", tmp_path / "runs", tiny(digits_cache))
    assert result.exit_code == 0, result.output
    run = find_run(None, tmp_path / "runs")
    assert run.name == f"00000-{recipe}-{config.load_recipe(RECIPES / f'{recipe}.toml').model.preset.replace('/', '')}"
    resolved = config.read_recipe_file(run / "recipe.toml")
    assert (resolved.model.in_channels, resolved.model.sample_size, resolved.model.width) == (3, 8, 16)
    # celebahq trains unconditionally on the labelled digits; the others take the 10 classes from the cache
    assert resolved.model.num_classes == (0 if recipe == "celebahq" else 10)
    pipe = load_pipeline(checkpoint_pipeline(run))
    assert pipe.meta["step"] == 2 and pipe.meta["images_seen"] == 8 and pipe.meta["num_classes"] == pipe.num_classes
    assert pipe.meta["autoencoder"]["spec"] == "none" and pipe.meta["latent_shape"] == [3, 8, 8]
    assert pipe.meta["sample"]["cfg"] == resolved.sample.cfg and pipe.meta["fid"]["num"] == resolved.fid.num
    assert pipe.scheduler.config.beta_schedule == resolved.diffusion.beta_schedule
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stats] == [1, 2] and all(r["loss"] > 0 for r in stats)
    assert (run / "samples" / "grid-0000002.png").exists() and (run / "loss.png").exists()
    assert "checkpoint" in (run / "log.txt").read_text()


@pytest.fixture(scope="module")
def straight_run(digits_cache, tmp_path_factory) -> dict[str, torch.Tensor]:
    """4 steps in one go, with gradient accumulation, label dropout and flips: the resume reference."""
    runs = tmp_path_factory.mktemp("straight")
    run = train_direct(digits_cache, runs, "train.max_steps=4", "train.grad_accum=2", "data.flip=true")
    return state_of(latest_checkpoint(run))


def test_resume_is_exact(straight_run, digits_cache, tmp_path):
    runs = tmp_path / "runs"
    first = train_direct(digits_cache, runs, "train.max_steps=2", "train.grad_accum=2", "data.flip=true")
    again = train_direct(digits_cache, runs, "train.max_steps=4", "train.grad_accum=2", "data.flip=true")
    assert again == first  # the same command (more steps) continues the same run
    assert [s for s, _ in list_checkpoints(first)] == [2, 4]
    assert "resumed from" in (first / "log.txt").read_text()
    assert_bitwise_equal(state_of(latest_checkpoint(first)), straight_run)


def test_interrupted_save_leaves_the_previous_checkpoint(straight_run, digits_cache, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run = train_direct(digits_cache, runs, "train.max_steps=2", "train.grad_accum=2", "data.flip=true")

    def crash(folder, *args, **kwargs):  # dies half-way through writing the step-4 checkpoint
        (folder.parent / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_mod, "save_pipeline", crash)
    with pytest.raises(WdmError, match=r"saving checkpoint step-0000004 failed: disk full writing \S+/half-written "
                                       r"\(.+ free\); the newest intact checkpoint is \S+/step-0000002"):
        train_direct(digits_cache, runs, "train.max_steps=4", "train.grad_accum=2", "data.flip=true")
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert not list((run / "checkpoints").glob(".*"))  # the temporary folder is gone
    load_pipeline(checkpoint_pipeline(run))            # the previous checkpoint still loads
    # a kill leaves a temporary folder behind: readers ignore it, the next save replaces it
    (run / "checkpoints" / ".step-0000004.tmp").mkdir()
    (run / "checkpoints" / ".step-0000004.tmp" / "optimizer.safetensors").write_text("garbage")
    assert latest_checkpoint(run).name == "step-0000002"
    train_direct(digits_cache, runs, "train.max_steps=4", "train.grad_accum=2", "data.flip=true")
    assert_bitwise_equal(state_of(latest_checkpoint(run)), straight_run)


def test_changed_recipe_starts_a_new_run_and_resume_options(digits_cache, tmp_path):
    runs = tmp_path / "runs"
    first = train_direct(digits_cache, runs)
    # a different learning rate is a different experiment: a new run, with a note saying why
    second = train_direct(digits_cache, runs, "optim.lr=1e-4")
    assert second != first and second.name.startswith("00001-")
    assert "not resuming" in (second / "log.txt").read_text() and "optim.lr" in (second / "log.txt").read_text()
    # --resume none: always a new run; --resume PATH: continue that run (newer runs notwithstanding)
    third = train_direct(digits_cache, runs, resume="none")
    assert third.name.startswith("00002-")
    continued = train_direct(digits_cache, runs, "train.max_steps=3", resume=str(first))
    assert continued == first and [s for s, _ in list_checkpoints(first)] == [2, 3]
    # resuming an older checkpoint never overwrites the newer ones: it continues in a new run
    older = first / "checkpoints" / "step-0000002"
    branch = train_direct(digits_cache, runs, "train.max_steps=3", resume=str(older))
    assert branch.name.startswith("00003-") and (first / "checkpoints" / "step-0000003").exists()
    with pytest.raises(WdmError, match="model differs"):
        train_direct(digits_cache, runs, "model.width=8", resume=str(first))
    with pytest.raises(WdmError, match="--resume must be latest, none"):
        train_direct(digits_cache, runs, resume=str(tmp_path))


def test_a_run_in_use_is_not_written_by_a_second_process(digits_cache, tmp_path):
    import socket

    from wdmctl.runs import RunLock

    runs = tmp_path / "runs"
    run = train_direct(digits_cache, runs)
    assert not (run / ".lock").exists()  # released at the end
    lock = RunLock(run).acquire()        # held by a live process (this one)
    try:
        with pytest.raises(WdmError, match=r"is in use by process \d+ on .*--resume none"):
            train_direct(digits_cache, runs, "train.max_steps=3")
    finally:
        lock.release()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run / ".lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    train_direct(digits_cache, runs, "train.max_steps=3")  # a stale lock is taken over
    assert latest_checkpoint(run).name == "step-0000003" and not (run / ".lock").exists()


@pytest.mark.parametrize("key, before, after", [("mixer_conv", "2d", "none"), ("skip_init", "xavier", "average")])
def test_a_run_from_before_a_preset_default_changed_is_not_resumed_under_the_new_default(digits_cache, tmp_path,
                                                                                         monkeypatch, key, before,
                                                                                         after):
    # issue 15 changed WDM-S/2's defaults twice (mixer_conv "2d" -> "none", skip_init "xavier" -> "average"): a
    # run trained under the old default records it in its recipe.toml, so `train` under the new default starts a
    # new run and says why, and setting the old value explicitly resumes the old run
    from wdmctl.models.presets import PRESETS
    from wdmctl.train.plan import plan_run

    def quickstart_leaving_the_key_to_the_preset():
        recipe = config.load_recipe(RECIPES / "quickstart.toml", tiny(digits_cache))
        setattr(recipe.model, key, None)   # as in a recipe that leaves the key to the preset
        return recipe

    runs = tmp_path / "runs"
    monkeypatch.setitem(PRESETS["WDM-S/2"], key, before)
    old = train(quickstart_leaving_the_key_to_the_preset(), "quickstart", runs_dir=runs)
    assert f'{key} = "{before}"' in (old / "recipe.toml").read_text()
    monkeypatch.undo()
    plan = plan_run(quickstart_leaving_the_key_to_the_preset(), "quickstart", runs)
    assert plan.run_dir is None and getattr(plan.recipe.model, key) == after
    assert any("not resuming" in n and f"model.{key} '{before}' -> '{after}'" in n for n in plan.notes), plan.notes
    pinned = quickstart_leaving_the_key_to_the_preset()
    setattr(pinned.model, key, before)
    plan = plan_run(pinned, "quickstart", runs)
    assert plan.run_dir == old and plan.resume_from is not None


def test_a_run_from_before_a_model_key_existed_resumes(digits_cache, tmp_path):
    # a run's recipe.toml written before a model key was added (here: skip_init) lacks the key; its model is
    # the key's default, so `train` resumes it instead of calling it a different model
    from wdmctl.train.plan import plan_run

    runs = tmp_path / "runs"
    old = train(config.load_recipe(RECIPES / "quickstart.toml", tiny(digits_cache)), "quickstart", runs_dir=runs)
    text = (old / "recipe.toml").read_text()
    assert 'skip_init = "xavier"' in text
    (old / "recipe.toml").write_text(text.replace('skip_init = "xavier"\n', ""))
    plan = plan_run(config.load_recipe(RECIPES / "quickstart.toml", tiny(digits_cache)), "quickstart", runs)
    assert plan.run_dir == old and plan.resume_from is not None, plan.notes
    # a real change of the key is still a different model
    changed = plan_run(config.load_recipe(RECIPES / "quickstart.toml", tiny(digits_cache) + ['model.skip_init="average"']),
                       "quickstart", runs)
    assert changed.run_dir is None and any("model.skip_init 'xavier' -> 'average'" in n for n in changed.notes)


def test_dry_run_prints_the_plan_and_writes_nothing(digits_cache, tmp_path):
    runs = tmp_path / "runs"
    result = run_train(RECIPES / "quickstart.toml", runs, tiny(digits_cache), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "[model]" in result.output and "in_channels = 3" in result.output
    assert "quickstart-WDM-S2 (new)" in result.output and "parameters on 3x8x8, 10 classes" in result.output
    assert not runs.exists()
    # without a cache the plan still prints, from the preset, with a note
    result = run_train(RECIPES / "celebahq.toml", runs, [], "--dry-run")
    assert result.exit_code == 0, result.output
    assert "not found" in result.output and "4x32x32" in result.output and not runs.exists()


def test_bad_overrides_and_missing_cache_are_one_line_errors(tmp_path, monkeypatch, capsys):
    from wdmctl.cli import main

    monkeypatch.chdir(tmp_path)  # the recipe's relative cache path does not exist here

    def error_of(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(RECIPES / "quickstart.toml"), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "unknown key optim.learning_rat (did you mean optim.lr?)" in error_of("--set", "optim.learning_rat=1")
    assert "train.batch_size must be an integer, got 'big'" in error_of("--set", "train.batch_size=big")
    assert "data.cache caches/digits8 does not exist; build it with `wdmctl cache`" in error_of()
    assert not (tmp_path / "runs").exists()


def patch_loss(monkeypatch, on_call):
    """Route the loop's loss through `on_call(call_number, loss) -> loss` (calls count from 1)."""
    real, calls = diffusion_loss, [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        return on_call(calls[0], real(*args, **kwargs))

    monkeypatch.setattr(loop_mod, "diffusion_loss", patched)


def test_nonfinite_steps_are_skipped_then_training_stops(digits_cache, tmp_path, monkeypatch):
    patch_loss(monkeypatch, lambda n, loss: loss * float("nan") if n == 2 else loss)
    run = train_direct(digits_cache, tmp_path / "a", "train.max_steps=3")
    counters = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())["progress"]
    assert counters == {"step": 3, "images_seen": 8, "skipped_steps": 1, "nonfinite_in_a_row": 0}
    assert "step 1: non-finite loss nan" in (run / "log.txt").read_text()

    patch_loss(monkeypatch, lambda n, loss: loss * float("nan"))
    with pytest.raises(WdmError, match=r"non-finite for 2 steps in a row .*optim\.lr"):
        train_direct(digits_cache, tmp_path / "b", "train.max_steps=5", "train.max_nonfinite=2")


def test_cuda_graph_is_refused_where_one_graph_cannot_hold_the_step(digits_cache, tmp_path):
    for extra, why in (("train.grad_accum=2", "train.grad_accum > 1"), ("train.precision=fp16", "train.precision = fp16"),
                       ("train.compile=true", "train.compile"),
                       ("train.gradient_checkpointing=true", "train.gradient_checkpointing")):
        with pytest.raises(WdmError, match=f"train.cuda_graph does not work with {why}"):
            config.load_recipe(RECIPES / "quickstart.toml", tiny(digits_cache, "train.cuda_graph=true", extra))
    if not torch.cuda.is_available():
        with pytest.raises(WdmError, match="train.cuda_graph needs one CUDA GPU; this run has 1 process"):
            train_direct(digits_cache, tmp_path / "runs", "train.cuda_graph=true")


def test_graphed_step_hands_found_inf_to_the_torch_optimizer_under_accelerate():
    # fused AdamW reads `found_inf` from itself: set on Accelerate's wrapper it would be ignored and a
    # non-finite step inside a graph would write NaN into the weights
    from accelerate.optimizer import AcceleratedOptimizer

    net = torch.nn.Linear(2, 2)
    inner = torch.optim.AdamW(net.parameters(), lr=1e-3)
    from wdmctl.train.graphed import GraphedStep

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # AcceleratedOptimizer reads the process's AcceleratorState, which only an Accelerator creates: without
    # one the test passed or failed by which test ran before it in the worker, and a half-made state broke
    # the next test's Accelerator. So it makes its own state and leaves none behind.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        Accelerator(cpu=True)
        step = GraphedStep(net, AcceleratedOptimizer(inner, device_placement=False), torch.ones(10), None, 0.0, 1.0)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert inner.found_inf is step.found_inf
    assert all(g["lr"] is step.lr and g["capturable"] for g in inner.param_groups)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision,rtol,atol", [("no", 1e-4, 1e-6), ("bf16", 1e-2, 1e-4)])
def test_cuda_graph_training_matches_eager_and_skips_nonfinite_steps(digits_cache, tmp_path, monkeypatch,
                                                                     precision, rtol, atol):
    # 3 eager warm-up steps, the capture at step 3, replays after: the same noise (the step's seed), the same
    # weights, EMA and Adam state as the eager loop, and a NaN batch inside a replay (step 4) is skipped on
    # the GPU (found_inf) exactly as the eager loop skips it on the host. Under bf16 autocast the tolerance
    # allows cuBLAS choosing other bf16 kernels while capturing.
    real = StepBatches.__getitem__

    def poisoned(self, k):
        step, micro, x, y = real(self, k)
        return step, micro, (x * float("nan") if step == 4 else x), y

    monkeypatch.setattr(StepBatches, "__getitem__", poisoned)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()   # Accelerate keeps one mixed precision per process; earlier tests set theirs
    runs = [train_direct(digits_cache, tmp_path / name, "train.max_steps=7", "train.checkpoint_every=7",
                         f"train.precision={precision}", *extra)
            for name, extra in (("eager", ()), ("graph", ("train.cuda_graph=true",)))]
    eager, graphed = (state_of(latest_checkpoint(run)) for run in runs)
    assert eager.keys() == graphed.keys()
    for key in eager:
        torch.testing.assert_close(graphed[key].float(), eager[key].float(), rtol=rtol, atol=atol, msg=key)
    assert int(graphed["counter.skipped_steps"]) == 1 and int(graphed["counter.step"]) == 7
    assert "step 4: non-finite loss nan" in (runs[1] / "log.txt").read_text()


def test_a_stop_signal_checkpoints_at_the_step_boundary(digits_cache, tmp_path, monkeypatch):
    def interrupt_during_first_step(n, loss):
        if n == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C (or SLURM's SIGTERM) does mid-step
        return loss

    patch_loss(monkeypatch, interrupt_during_first_step)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(loop_mod.TrainingInterrupted, match="stopped at step 1; checkpoint saved") as info:
        train_direct(digits_cache, tmp_path / "runs", "train.max_steps=4")
    assert info.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is handler
    run = newest_run(tmp_path / "runs")
    assert [s for s, _ in list_checkpoints(run)] == [1] and "stop requested" in (run / "log.txt").read_text()


@pytest.mark.slow
def test_two_processes_on_cpu(digits_cache, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` without a GPU (torchrun; the ranks join over gloo):
    one run folder, one checkpoint written by rank 0 (no pickles), and resume."""
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "wdmctl", "train", str(RECIPES / "cifar10.toml"), "--runs-dir", str(tmp_path / "runs")]
    for s in tiny(digits_cache, "train.batch_size=8"):
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for steps in (2, 3):
        proc = subprocess.run(cmd + ["--max-steps", str(steps)], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    checkpoint = latest_checkpoint(run)
    assert not [p.name for p in checkpoint.rglob("*") if p.suffix in (".pkl", ".bin")]  # one checkpoint for all ranks
    log = (run / "log.txt").read_text()
    assert "batch 8 = 2 proc x 1 accum x 4" in log and "resumed from" in log
    assert load_pipeline(checkpoint / "pipeline").meta["images_seen"] == 24


# ----------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------

class Numbers(torch.utils.data.Dataset):
    """Item i is (i, global-RNG draw): shows which images a batch holds and that their noise is seeded."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item()]), 0


def test_data_stream_is_seeded_epoch_permuted_and_the_same_for_any_process_count():
    one = StepBatches(Numbers(), batch_size=4, grad_accum=1, world_size=1, rank=0, seed=7)
    two = [StepBatches(Numbers(), batch_size=4, grad_accum=2, world_size=2, rank=r, seed=7) for r in (0, 1)]
    for step in range(5):
        images = one.indices(step, 0)
        assert sorted(images) == sorted(i for r in two for m in range(2) for i in r.indices(step, m))
    epoch = [i for step in range(5) for i in one.indices(step, 0)][:10]  # 2.5 steps of 4 = one epoch of 10
    assert sorted(epoch) == list(range(10))
    a, b = one[3], StepBatches(Numbers(), 4, 1, 1, 0, seed=7)[3]
    assert torch.equal(a[2], b[2]) and a[:2] == (3, 0)  # same item, same noise: no hidden state
    torch.manual_seed(123)
    before = torch.rand(())
    torch.manual_seed(123)
    _ = one[0]
    assert torch.equal(torch.rand(()), before)  # reading a batch leaves the global RNG alone
    with pytest.raises(WdmError, match="not divisible"):
        StepBatches(Numbers(), batch_size=6, grad_accum=2, world_size=2, rank=0, seed=0)


def test_weight_decay_groups_and_learning_rate():
    from wdmctl.models import build_model

    model = build_model("WDM-S/2", width=16, depth=1, sample_size=8, in_channels=3, num_classes=10)
    decay, no_decay = param_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    assert len(decay_names) + len(no_decay_names) == len(names)
    for name in no_decay_names:
        assert name.endswith(("A_log", "D", "bias", "norm.weight", "norm_out.weight", "pos_embed",
                              "class_embed.weight", "scale_shift_table")), name
    assert {"pos_embed", "class_embed.weight"} <= no_decay_names
    assert any(n.endswith("A_log") for n in no_decay_names) and any(n.endswith("in_proj.weight") for n in decay_names)
    assert [learning_rate(s, 1.0, 4) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert learning_rate(0, 2e-4, 0) == 2e-4
    cosine = [learning_rate(s, 1.0, 4, "cosine", 14) for s in (0, 3, 8, 13, 20)]
    assert cosine[:2] == [0.25, 1.0] and cosine[2] == pytest.approx(0.5) and cosine[3] == cosine[4] == 0.0
    assert learning_rate(13, 1.0, 0, "cosine", 14) == 0.0      # no warm-up: the last step is at 0


def test_ema_decay_warmup_and_round_trip():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9, warmup=False)
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(net)
    assert torch.allclose(ema.model.weight, before + 0.1 * (net.weight - before))
    assert EMA(net, 0.9999, warmup=True).current_decay() == pytest.approx(2 / 11)
    copy = EMA(torch.nn.Linear(2, 2), 0.9)
    copy.load_state_dict(ema.state_dict())
    assert copy.num_updates == 1 and torch.equal(copy.model.weight, ema.model.weight)


def test_grid_labels_and_loss_curve(tmp_path):
    assert grid_labels(4, 0) is None
    assert grid_labels(12, 10) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert grid_labels(4, 1000) == [0, 250, 500, 750]
    from PIL import Image

    from wdmctl.train.plot import plot_loss

    assert plot_loss([10, 20, 30], [1.0, 0.5, float("nan")], tmp_path / "loss.png")
    image = Image.open(tmp_path / "loss.png")
    assert image.size == (640, 400)
    assert len(set(image.getdata())) > 2  # axes, labels and the curve were drawn
    assert plot_loss([], [], tmp_path / "empty.png")  # no records yet: an empty frame, no error


@pytest.mark.parametrize("low, high, expected, hidden", [
    (36.0, 80.0, {"40", "50", "60", "70", "80"}, set()),                # within a decade: every tick
    (33.0, 145.0, {"40", "90", "100", "150"}, set()),                   # past a power of ten: 1.5x labelled
    (0.03, 0.7, {"0.05", "0.1", "0.2", "0.5"}, {"0.03", "0.04", "0.07", "0.15"}),  # across decades: 1-2-5
])
def test_log_axes_are_labelled_in_plain_numbers(low, high, expected, hidden):
    from wdmctl.train.plot import log_y_axis, matplotlib_pyplot

    plt = matplotlib_pyplot()
    fig, ax = plt.subplots()
    try:
        ax.plot([0, 1], [low, high])
        log_y_axis(ax)
        fig.canvas.draw()
        labels = {t.get_text() for minor in (False, True) for t in ax.get_yticklabels(minor=minor)} - {""}
    finally:
        plt.close(fig)
    assert expected <= labels and not labels & hidden, labels
    assert not any("10^" in text or "\\times" in text or "e-" in text for text in labels), labels


def test_without_matplotlib_the_run_notes_it_once(tmp_path, monkeypatch):
    from wdmctl.train import plot
    from wdmctl.train.report import Reporter

    monkeypatch.setattr(plot, "matplotlib_pyplot", lambda: None)
    assert plot.plot_loss([1], [1.0], tmp_path / "loss.png") is False and not (tmp_path / "loss.png").exists()
    reporter = Reporter(tmp_path, enabled=True)
    reporter.plot()
    reporter.plot()
    assert (tmp_path / "log.txt").read_text().count("pip install 'wdmctl[plot]'") == 1


def test_run_lookup_helpers(tmp_path):
    from wdmctl.runs import create_run_dir, model_tag

    assert model_tag("WDM-XL/2") == "WDM-XL2"
    with pytest.raises(WdmError, match="no runs under"):
        find_run(None, tmp_path)
    a = create_run_dir(tmp_path, "demo-WDM-S2")
    b = create_run_dir(tmp_path, "other-WDM-B2")
    assert (a.name, b.name) == ("00000-demo-WDM-S2", "00001-other-WDM-B2")
    assert find_run(None, tmp_path) == b and find_run("0", tmp_path) == a and find_run(str(a)) == a
    assert newest_run(tmp_path, "demo-WDM-S2") == a
    with pytest.raises(WdmError, match="not found"):
        find_run("7", tmp_path)
    with pytest.raises(WdmError, match="has no checkpoints yet"):
        checkpoint_pipeline(a)
    for step in (5, 10):
        (a / "checkpoints" / f"step-{step:07d}" / "pipeline" / "denoiser").mkdir(parents=True)
        (a / "checkpoints" / f"step-{step:07d}" / "pipeline" / "denoiser" / "config.json").write_text("{}")
    assert checkpoint_pipeline(a).parent.name == "step-0000010"
    assert checkpoint_pipeline(a, "5").parent.name == "step-0000005"
    with pytest.raises(WdmError, match="no checkpoint at step 7; it has 5, 10"):
        checkpoint_pipeline(a, 7)


def test_benchmark_train_step_on_cpu():
    from wdmctl.bench.train import benchmark_train_step

    row = benchmark_train_step("WDM-S/2", "torch-sequential", batch_size=2, resolution=8, precision="fp32",
                                        iters=1, warmup=0, width=16, depth=1)
    assert row["images_per_s"] > 0 and row["peak_memory_gib"] is None and row["latent"] == [4, 8, 8]
    assert row["tokens"] == 16 and row["peak_reserved_gib"] is None
    uvit = benchmark_train_step("UViT-S/2", batch_size=2, resolution=8, precision="bf16", iters=1, warmup=0,
                                         width=16, num_heads=2, depth=1)
    assert uvit["backend"].startswith("n/a")


class FakeCudaMemory:
    """torch.cuda's memory counters, driven by hand: allocations raise `allocated` (and `reserved` when the
    segments held do not cover them); frees lower `allocated` only, as a graph's private pool keeps its memory."""

    def __init__(self, allocated_gib: float):
        self.allocated = self.reserved = self.peak = self.peak_reserved = allocated_gib * 2**30

    def alloc(self, gib: float) -> None:
        self.allocated += gib * 2**30
        self.reserved = max(self.reserved, self.allocated)
        self.peak, self.peak_reserved = max(self.peak, self.allocated), max(self.peak_reserved, self.reserved)

    def free(self, gib: float) -> None:
        self.allocated -= gib * 2**30

    def reset(self) -> None:
        self.peak, self.peak_reserved = self.allocated, self.reserved

    def install(self, monkeypatch) -> None:
        for name, fn in (("is_available", lambda: True), ("synchronize", lambda: None),
                         ("reset_peak_memory_stats", self.reset), ("max_memory_allocated", lambda: self.peak),
                         ("max_memory_reserved", lambda: self.peak_reserved)):
            monkeypatch.setattr(torch.cuda, name, fn)


def test_peak_memory_counts_what_a_cuda_graph_capture_allocates(monkeypatch):
    # issue 16: a graphed WDM-B/2 step reported ~2 GiB (the weights, gradients and AdamW state that live between
    # steps) because the peak was read over a replay after a reset; the capture's 12 GiB of activations, held in
    # the graph's pool, are the step's real footprint
    from wdmctl.core.timing import PeakMemory

    memory = FakeCudaMemory(allocated_gib=2)
    memory.install(monkeypatch)

    def capture():   # records the step: activations allocated in the graph's pool, freed back into it
        memory.alloc(12)
        memory.free(12)

    def replay():    # allocates nothing
        pass

    with PeakMemory() as graphed:
        capture()
        replay()
    assert graphed.as_dict() == {"peak_memory_gib": 14.0, "peak_reserved_gib": 14.0}
    with PeakMemory() as replays_only:   # the old measurement
        replay()
    assert replays_only.allocated == 2.0 and replays_only.reserved == 14.0


def test_benchmark_train_step_refuses_cuda_graphs_on_cpu():
    from wdmctl.bench.train import benchmark_train_step

    with pytest.raises(WdmError, match="CUDA graphs need a CUDA device"):
        benchmark_train_step("WDM-S/2", "torch", batch_size=2, resolution=8, device="cpu", cuda_graph=True,
                                      width=16, depth=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["wdmamba", "uvit"])
def test_captured_train_step_trains_like_eager(arch):
    # the graph replays forward, backward, clipping and AdamW on the same buffers: three replays must move the
    # weights as three eager steps do (same data and noise), and each replay must change them. The tolerance is
    # a quarter of one step's movement, so two or four steps fail where three pass.
    from wdmctl.diffusion.schedule import make_noise_scheduler
    from wdmctl.models.presets import build_model
    from wdmctl.train.graphed import capture_train_step

    def flat(model) -> torch.Tensor:
        return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])

    extra = dict(num_heads=2) if arch == "uvit" else {}
    x, y = torch.randn(4, 4, 8, 8, device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda")
    abar = alphas_cumprod(make_noise_scheduler(), "cuda")
    eager_after = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build_model("WDM-S/2" if arch == "wdmamba" else "UViT-S/2", sample_size=8, width=32, depth=1,
                            num_classes=10, **extra).cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True, capturable=graphed)

        def update():
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = diffusion_loss(model, x, y, abar, None, 0.0, 10)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        torch.cuda.manual_seed(1)
        if graphed:
            step = capture_train_step(update, opt, warmup=1)  # warm-up: one real step, as eager's first
            before = flat(model)
            step()
            assert not torch.equal(before, flat(model)), "a replay changed nothing"
            step()
            graphed_weights = flat(model)
        else:
            for n in (1, 2, 3):
                update()
                opt.zero_grad(set_to_none=True)
                eager_after[n] = flat(model)
    one_step = (eager_after[3] - eager_after[2]).norm()
    assert one_step > 0
    assert (graphed_weights - eager_after[3]).norm() < 0.25 * one_step
    assert (graphed_weights - eager_after[2]).norm() > 0.75 * one_step   # it did not stop a step short


def test_step_profile_groups_kernels_by_category():
    from wdmctl.core.timing import kernel_category, step_profile

    assert kernel_category("_scan_bwd2_kernel") == "selective scan"
    # every Triton kernel of the scan modules, read from their source so that a new pass cannot be filed under
    # "elementwise" (the segmented scan's state, carry and dh passes once were, in an H200 profile)
    scan_dir = Path(__file__).resolve().parent.parent / "wdmctl" / "scan" / "triton"
    scan_kernels = [name for module in ("scan_kernels.py", "segmented_kernels.py")
                    for name in re.findall(r"^def (_\w+_kernel)\(", (scan_dir / module).read_text(), re.M)]
    assert len(scan_kernels) >= 7 and "_seg_carry_kernel" in scan_kernels
    assert {kernel_category(name) for name in scan_kernels} == {"selective scan"}
    assert kernel_category("_causal_conv1d_fwd_kernel") == "causal conv1d"
    assert kernel_category("_conv_bwd_kernel") == kernel_category("_conv_fwd_kernel") == "causal conv1d"  # ours
    assert kernel_category("_grid_conv_bwd_pre_kernel") == kernel_category("_grid_conv_fwd_kernel") == "2-D conv"
    assert kernel_category("void at::native::conv_depthwise2d_forward_kernel<...>") == "2-D conv"
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "matmul (GEMM)"
    assert kernel_category("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob") == "attention"
    assert kernel_category("void at::native::multi_tensor_apply_kernel<...>") == "optimizer"
    assert kernel_category("void at::native::vectorized_elementwise_kernel<4, ...>") == "elementwise, copies, other"
    assert kernel_category("void onnxruntime::contrib::cuda::LinearAttentionKernel<float>(...)") == "selective scan"
    rows = [{"kernel": "_scan_fwd_kernel", "gpu_us": 3000.0, "launches": 26},
            {"kernel": "nvjet_tst_128x256", "gpu_us": 1000.0, "launches": 100},
            {"kernel": "elementwise_kernel", "gpu_us": 1000.0, "launches": 400}]
    prof = step_profile(rows, wall_ms=10.0)
    assert prof["gpu_ms"] == 5.0 and prof["gpu_busy"] == 0.5 and prof["launches"] == 526
    assert list(prof["categories"]) == ["selective scan", "matmul (GEMM)", "elementwise, copies, other"]
    assert prof["categories"]["selective scan"] == {"gpu_ms": 3.0, "share": 0.6, "launches": 26}


# ----------------------------------------------------------------------------------------------------
# Checkpoint layout
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_wdm_s2_checkpoint_holds_each_tensor_once(digits_cache, tmp_path):
    # the full WDM-S/2 (width 384, 26 blocks) on the 8x8 digits: sizes are what count, the data only has to be
    # small. Online weights (fp32), EMA (fp32) and Adam's two moments (fp32): 4 + 4 + 8 bytes a parameter.
    sets = [f"data.cache={json.dumps(str(digits_cache))}", "model.scan_backend=torch-sequential",
            "train.batch_size=2", "train.max_steps=1", "train.checkpoint_every=1", "train.precision=fp32",
            "data.num_workers=0", "sample.grid_n=1", "sample.steps=1", "sample.every=0", "log.tensorboard=false"]
    run = train(config.load_recipe(RECIPES / "cifar10.toml", sets), "cifar10", runs_dir=tmp_path / "runs")
    checkpoint = latest_checkpoint(run)
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    params = load_pipeline(checkpoint / "pipeline").model.num_parameters()
    assert params > 29e6  # WDM-S/2 itself, not a shrunk one
    size = sum(p.stat().st_size for p in files)
    assert size <= 1.05 * params * (4 + 4 + 8), f"{size / params:.2f} bytes per parameter"
    assert not [p for p in files if p.suffix in (".pkl", ".bin", ".pt", ".pth")]


def test_resume_reads_no_pickle(digits_cache, tmp_path, monkeypatch):
    import pickle

    runs = tmp_path / "runs"
    run = train_direct(digits_cache, runs)

    def refuse(*args, **kwargs):
        raise AssertionError("resume unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    train_direct(digits_cache, runs, "train.max_steps=3")
    assert "resumed from" in (run / "log.txt").read_text() and latest_checkpoint(run).name == "step-0000003"


def test_an_old_layout_checkpoint_gets_a_one_line_error(digits_cache, tmp_path, capsys):
    from wdmctl.cli import main

    runs = tmp_path / "runs"
    run = train_direct(digits_cache, runs)
    old = latest_checkpoint(run)
    (old / "trainer_state.json").unlink()
    (old / "custom_checkpoint_0.pkl").write_bytes(b"")   # what Accelerate's save_state left
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(RECIPES / "quickstart.toml"), "--runs-dir", str(runs), "--max-steps", "3",
              *[arg for s in tiny(digits_cache) for arg in ("--set", s)]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "written by an older wdmctl" in err and "--resume none" in err
    load_pipeline(checkpoint_pipeline(run))  # sample, fid and export still read its pipeline/ folder
