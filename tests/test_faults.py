"""Fault injection (issue 18): each fault that damages files rather than the process ends in a one-line
message and a clean exit code, with the fallback where there is one, no traceback, and no intact file lost
or changed. Plus kill -9 during a checkpoint write, after which resume is still bitwise exact. CPU only.

| fault                                             | test                                                  |
| newest checkpoint's weights truncated (the online | test_truncated_newest_checkpoint_resumes_from_the_one_before, |
|   weights resume reads, or optimizer.safetensors) |   test_resume_path_to_a_damaged_checkpoint_is_an_error |
| pipeline/denoiser weights truncated               | test_truncated_pipeline_weights_are_one_line_errors (sample, fid, export) |
| an export's ONNX file truncated                   | test_damaged_export_is_a_one_line_error                |
| one cache shard truncated (or changed)            | test_truncated_cache_shard_is_named_and_re_encoded    |
| disk fills while a checkpoint is written          | test_full_disk_on_a_small_tmpfs (root only), test_full_disk_injected_in_process |
| newest checkpoint's JSON invalid (what was        | test_invalid_checkpoint_json_is_detected_and_skipped  |
|   meta.json: trainer_state.json, wdmctl.json)     |                                                       |
| a checkpoint without integrity.json (incomplete)  | test_every_checkpoint_damaged_is_an_error_not_a_fresh_start |
| kill -9 during a checkpoint write                 | test_kill_9_during_a_checkpoint_write_then_exact_resume |
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import REPO, TINY, assert_bitwise_equal, state_of
from wdmctl.cli import main
from wdmctl.runs import list_checkpoints
from wdmctl.train.checkpoint import checkpoint_problem, prune_checkpoints

RECIPE = REPO / "recipes" / "quickstart.toml"
RUN = "00000-quickstart-WDM-S2"
ONLINE_WEIGHTS = "pipeline/denoiser_online/diffusion_pytorch_model.safetensors"  # what resume loads the net from


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The digits at 8x8 in pixel space, in four shards (so one can be damaged)."""
    from wdmctl.data.cache import build_cache

    out = tmp_path_factory.mktemp("faults-cache") / "digits8"
    build_cache("digits", out, resolution=8, vae="none", shard_size=500)
    return out


def train_argv(cache: Path, runs: Path, *extra: str) -> list[str]:
    argv = ["train", str(RECIPE), "--runs-dir", str(runs), "--max-steps", "4"]
    for setting in [*TINY, f"data.cache={json.dumps(str(cache))}"]:
        argv += ["--set", setting]
    return argv + list(extra)


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI as `wdmctl` would (WdmError -> one line, exit code); anything else escaping is a failure."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return info.value.code, out, err


def one_line(err: str, kind: str) -> str:
    """stderr holds exactly one line, of `kind` ("error" or "warning")."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{kind}: "), err
    return lines[0]


def one_error_line(err: str) -> str:
    return one_line(err, "error")


def one_warning_line(err: str) -> str:
    return one_line(err, "warning")


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: proves nothing intact was lost or changed."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: Path, by: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:-by])


@pytest.fixture(scope="module")
def pristine(cache, tmp_path_factory) -> Path:
    """A runs folder with one 4-step run (checkpoints at steps 2 and 4), trained once and copied per test."""
    runs = tmp_path_factory.mktemp("faults-runs") / "runs"
    with pytest.raises(SystemExit) as info:
        main(train_argv(cache, runs))
    assert info.value.code == 0
    return runs


@pytest.fixture
def runs(pristine, tmp_path) -> Path:
    copy = tmp_path / "runs"
    shutil.copytree(pristine, copy)
    return copy


@pytest.fixture(scope="module")
def reference(pristine):
    """The uninterrupted run's step-4 weights, EMA, optimizer and counters: what every recovery must reach."""
    return state_of(pristine / RUN / "checkpoints" / "step-0000004")


def checkpoint(runs: Path, step: int) -> Path:
    return runs / RUN / "checkpoints" / f"step-{step:07d}"


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damaged", [ONLINE_WEIGHTS, "optimizer.safetensors"])
def test_truncated_newest_checkpoint_resumes_from_the_one_before(cache, runs, reference, capsys, damaged):
    truncate(checkpoint(runs, 4) / damaged)
    intact = snapshot(checkpoint(runs, 2))
    code, out, err = cli(capsys, *train_argv(cache, runs, "--dry-run"))  # the plan says it too
    assert code == 0 and "\nwarning: skipped damaged checkpoint step-0000004 (" in out
    assert f"resume: {checkpoint(runs, 2)}" in out
    code, out, err = cli(capsys, *train_argv(cache, runs))
    assert code == 0, err
    warning = one_warning_line(err)
    assert f"skipped damaged checkpoint step-0000004 ({checkpoint(runs, 4) / damaged}: cut short" in warning
    assert warning.endswith("resuming from step-0000002")
    assert f"resumed from {checkpoint(runs, 2)} at step 2" in out and warning in (runs / RUN / "log.txt").read_text()
    assert snapshot(checkpoint(runs, 2)) == intact
    assert_bitwise_equal(state_of(checkpoint(runs, 4)), reference)  # the damaged step 4, recomputed exactly


def test_resume_path_to_a_damaged_checkpoint_is_an_error(cache, runs, capsys):
    truncate(checkpoint(runs, 4) / ONLINE_WEIGHTS)
    before = snapshot(runs)
    code, out, err = cli(capsys, *train_argv(cache, runs, "--resume", str(checkpoint(runs, 4))))
    line = one_error_line(err)
    assert code == 2 and f"--resume {checkpoint(runs, 4)}: the checkpoint is damaged" in line
    assert f"step-0000004/{ONLINE_WEIGHTS}: cut short" in line and "resume from another checkpoint of" in line
    assert snapshot(runs) == before
    # the run folder instead of the checkpoint: its newest intact checkpoint, with the warning
    code, out, err = cli(capsys, *train_argv(cache, runs, "--resume", str(runs / RUN)))
    assert code == 0 and "resuming from step-0000002" in one_warning_line(err)


@pytest.mark.parametrize("damaged", ["trainer_state.json", "pipeline/wdmctl.json"])
def test_invalid_checkpoint_json_is_detected_and_skipped(cache, runs, reference, capsys, damaged):
    """What was meta.json: the counters resume reads, and the pipeline's metadata that sample/fid/export read."""
    (checkpoint(runs, 4) / damaged).write_text("{not json")
    intact = snapshot(checkpoint(runs, 2))
    code, out, err = cli(capsys, *train_argv(cache, runs))
    assert code == 0, err
    assert f"{checkpoint(runs, 4) / damaged}: invalid JSON" in one_warning_line(err)
    assert snapshot(checkpoint(runs, 2)) == intact
    assert_bitwise_equal(state_of(checkpoint(runs, 4)), reference)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(cache, runs, capsys):
    truncate(checkpoint(runs, 4) / "optimizer.safetensors")
    (checkpoint(runs, 2) / "integrity.json").unlink()  # as a checkpoint cut off before its manifest
    before = snapshot(runs)
    code, _, err = cli(capsys, *train_argv(cache, runs))
    line = one_error_line(err)
    assert code == 2 and "has no intact checkpoint to resume from (2 damaged" in line and "--resume none" in line
    assert snapshot(runs) == before
    assert checkpoint_problem(checkpoint(runs, 2)) == f"{checkpoint(runs, 2) / 'integrity.json'}: missing (the save " \
                                                      f"did not finish, or a wdmctl without integrity records wrote it)"


def test_checkpoint_checks_and_pruning_count_intact_ones(runs):
    run = runs / RUN
    assert checkpoint_problem(checkpoint(runs, 4), full=True) is None
    meta = checkpoint(runs, 4) / "trainer_state.json"
    text = meta.read_text()
    assert '"step": 4,' in text
    meta.write_text(text.replace('"step": 4,', '"step": 9,'))  # same size, valid JSON: the hash and the step tell
    assert "sha256 differs" in checkpoint_problem(checkpoint(runs, 4), full=True)
    assert checkpoint_problem(checkpoint(runs, 4)) == f"{meta}: no step matching the folder name (step 9)"
    intact = snapshot(checkpoint(runs, 2))
    assert prune_checkpoints(run, keep=1) == []  # step 4 is damaged: step 2 is the one intact checkpoint kept
    assert [s for s, _ in list_checkpoints(run)] == [2, 4] and snapshot(checkpoint(runs, 2)) == intact
    meta.write_text(text)
    assert prune_checkpoints(run, keep=1) == [checkpoint(runs, 2)]


# ----------------------------------------------------------------------------------------------------
# Saved pipelines and exports
# ----------------------------------------------------------------------------------------------------

def test_truncated_pipeline_weights_are_one_line_errors(runs, tmp_path, capsys):
    weights = checkpoint(runs, 4) / "pipeline" / "denoiser" / "diffusion_pytorch_model.safetensors"
    truncate(weights)
    before = snapshot(runs)
    run = runs / RUN
    for argv in (["sample", "--run", run, "--n", "2", "--steps", "2", "--out", tmp_path / "samples"],
                 ["fid", "--run", run, "--num", "2", "--allow-small"],
                 ["export", "--run", run, "--batch-size", "2", "--no-verify"]):
        code, out, err = cli(capsys, *argv)
        line = one_error_line(err)
        assert code == 2 and f"{weights}: cut short" in line, (argv[0], line)
        assert "use another checkpoint (--checkpoint STEP)" in line
    assert snapshot(runs) == before and not (tmp_path / "samples").exists()
    assert not (checkpoint(runs, 4) / "export").exists()


def test_damaged_export_is_a_one_line_error(runs, capsys):
    from wdmctl.apps.export import ExportRequest, run_export
    from wdmctl.export.onnx_export import ExportSettings

    export_dir, manifest = run_export(ExportRequest(run=str(runs / RUN), settings=ExportSettings(batch_size=2),
                                                    verify=False), log=lambda line: None)
    onnx = export_dir / manifest["onnx"]["file"]
    truncate(onnx, by=1000)
    before = snapshot(runs)
    sample = ["sample", "--run", runs / RUN, "--n", "2", "--steps", "2", "--backend", "onnx", "--out", runs / "s"]
    code, _, err = cli(capsys, *sample)
    line = one_error_line(err)
    assert code == 2 and f"{onnx}: cut short (sha256 differs" in line and "wdmctl export --overwrite" in line
    (export_dir / "manifest.json").write_text('{"format": ')
    code, _, err = cli(capsys, *sample)
    assert code == 2 and f"{export_dir / 'manifest.json'}: invalid JSON" in one_error_line(err)
    assert {k: v for k, v in snapshot(runs).items() if "export/" not in k} == \
        {k: v for k, v in before.items() if "export/" not in k}


# ----------------------------------------------------------------------------------------------------
# Cache shards
# ----------------------------------------------------------------------------------------------------

def test_truncated_cache_shard_is_named_and_re_encoded(cache, tmp_path, capsys):
    damaged = tmp_path / "digits8"
    shutil.copytree(cache, damaged)
    truncate(damaged / "shard-00001.safetensors")
    others = {k: v for k, v in snapshot(damaged).items() if k.startswith("shard-") and "00001" not in k}
    runs = tmp_path / "runs"
    code, _, err = cli(capsys, *train_argv(damaged, runs))
    line = one_error_line(err)
    assert code == 2 and f"{damaged / 'shard-00001.safetensors'}: cut short" in line and "rerun the `wdmctl cache`" in line
    assert not runs.exists()  # refused before a run folder was made

    code, out, _ = cli(capsys, "cache", "digits", "--out", damaged, "--resolution", "8", "--vae", "none",
                       "--shard-size", "500")
    assert code == 0 and "(4 shards, 3 reused)" in out
    assert {k: v for k, v in snapshot(damaged).items() if k in others} == others

    shard = damaged / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # a changed byte: sizes and framing pass, only --verify's hashes see it
    shard.write_bytes(bytes(data))
    code, _, err = cli(capsys, *train_argv(damaged, runs, "--verify"))
    line = one_error_line(err)
    assert code == 2 and f"{shard}: changed since it was written (sha256 differs)" in line
    assert not runs.exists()
    code, out, err = cli(capsys, *train_argv(damaged, runs))  # without --verify the cheap check lets it train
    assert code == 0, err


# ----------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------

def assert_full_disk_failure(code: int, err: str, runs: Path, intact: dict[str, str]) -> str:
    """Saving step 4 failed on a full disk: exit 2, the one line naming the file, the free space and step 2 (the
    newest intact checkpoint), step 2 unchanged, nothing half-written left. Returns the line."""
    line = one_error_line(err)
    assert code == 2
    assert "saving checkpoint step-0000004 failed: no space left on device writing " in line
    assert "checkpoints/.step-0000004.tmp/" in line and " free); the newest intact checkpoint is " in line
    assert line.rstrip().endswith(f"{checkpoint(runs, 2)}; free some space and rerun the same command to resume "
                                  f"from it")
    assert snapshot(checkpoint(runs, 2)) == intact
    assert [s for s, _ in list_checkpoints(runs / RUN)] == [2] and not list((runs / RUN / "checkpoints").glob(".*"))
    return line


@pytest.fixture
def small_disk(tmp_path):
    """A size-limited tmpfs (root and a kernel that allows mounting it), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a size-limited tmpfs needs root to mount; the in-process ENOSPC test covers the same path")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the in-process ENOSPC test covers the path")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def resize(mount: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes // 1024 + 1}k", str(mount)], check=True)


def test_full_disk_on_a_small_tmpfs(cache, small_disk, reference, capsys):
    runs = small_disk / "runs"
    code, _, err = cli(capsys, *train_argv(cache, runs, "--max-steps", "2"))
    assert code == 0, err
    used = shutil.disk_usage(small_disk).used
    one_checkpoint = sum(p.stat().st_size for p in checkpoint(runs, 2).rglob("*") if p.is_file())
    resize(small_disk, used + one_checkpoint // 2)  # room for the log lines, not for the step-4 checkpoint
    intact = snapshot(checkpoint(runs, 2))
    code, out, err = cli(capsys, *train_argv(cache, runs))
    assert_full_disk_failure(code, err, runs, intact)
    resize(small_disk, 16 << 20)  # space freed: the same command resumes
    code, out, err = cli(capsys, *train_argv(cache, runs))
    assert code == 0, err
    assert_bitwise_equal(state_of(checkpoint(runs, 4)), reference)


@pytest.mark.parametrize("failure", ["ENOSPC", "safetensors"])
def test_full_disk_injected_in_process(cache, tmp_path, monkeypatch, capsys, failure):
    """The same fault where no tmpfs can be mounted: the write path raises what a full disk raises there (an
    OSError with errno ENOSPC from diffusers' save_pretrained; safetensors' SafetensorError, which carries no
    errno, from optimizer.safetensors, the last large file)."""
    from safetensors import SafetensorError

    from wdmctl.train import checkpoint as checkpoint_mod

    runs = tmp_path / "runs"
    assert cli(capsys, *train_argv(cache, runs, "--max-steps", "2"))[0] == 0
    intact = snapshot(checkpoint(runs, 2))
    if failure == "ENOSPC":
        def partial_then_full(folder, *args, **kwargs):
            folder.mkdir(parents=True)
            (folder / "half-written.safetensors").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(checkpoint_mod, "save_pipeline", partial_then_full)
    else:
        def serialize_fails(tensors, filename, *args, **kwargs):
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(checkpoint_mod, "save_file", serialize_fails)
    code, _, err = cli(capsys, *train_argv(cache, runs))
    line = assert_full_disk_failure(code, err, runs, intact)
    written = "pipeline/half-written.safetensors" if failure == "ENOSPC" else ".step-0000004.tmp/optimizer.safetensors"
    assert f"writing {runs / RUN / 'checkpoints'}" in line and f"{written} (" in line


# ----------------------------------------------------------------------------------------------------
# kill -9 during a checkpoint write
# ----------------------------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
from pathlib import Path
from wdmctl.train import checkpoint

name = sys.argv[1]
real = getattr(checkpoint, name)

def killed(*args, **kwargs):
    if any(isinstance(a, (str, Path)) and ".step-0000004.tmp" in str(a) for a in args):
        if name == "write_integrity":
            real(*args, **kwargs)  # the checkpoint is whole; killed before its rename
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(checkpoint, name, killed)
from wdmctl.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("moment", ["save_file", "write_integrity"])
def test_kill_9_during_a_checkpoint_write_then_exact_resume(cache, tmp_path, reference, capsys, moment):
    """SIGKILL while step 4's checkpoint is written (mid-way: the pipeline written, optimizer.safetensors about
    to be; or whole, integrity.json included, but not yet renamed): step 2 is untouched, and rerunning the
    command ends bitwise where an uninterrupted run does."""
    runs = tmp_path / "runs"
    assert cli(capsys, *train_argv(cache, runs, "--max-steps", "2"))[0] == 0
    intact = snapshot(checkpoint(runs, 2))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, moment, *train_argv(cache, runs)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (runs / RUN / "checkpoints" / ".step-0000004.tmp").is_dir()  # the partial save, left by the kill
    assert [s for s, _ in list_checkpoints(runs / RUN)] == [2] and snapshot(checkpoint(runs, 2)) == intact
    code, out, err = cli(capsys, *train_argv(cache, runs))
    assert code == 0, err
    assert f"resumed from {checkpoint(runs, 2)} at step 2" in out
    assert_bitwise_equal(state_of(checkpoint(runs, 4)), reference)
    assert not list((runs / RUN / "checkpoints").glob(".*"))
