"""FID during training (`[fid] every`) and `wdmctl report`, on the quickstart model at tiny size, with a
stand-in for the Inception network (the real one takes minutes per FID on a CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from test_fid import PixelFeatures, invoke
from test_train import RECIPES, digits_cache, tiny  # noqa: F401  (digits_cache is a fixture)
from wdmctl import config
from wdmctl.apps.report import read_run, unique_labels
from wdmctl.cli import app
from wdmctl.fid import reference
from wdmctl.train import fid_monitor
from wdmctl.train.trainer import train

FID_EVERY = ["fid.every=1", "fid.every_num=8", "fid.every_batch_size=4", 'fid.ref="digits"', "fid.resolution=8",
             "fid.steps=2"]


@pytest.fixture
def stand_in_inception(tmp_path, monkeypatch):
    monkeypatch.setenv("WDMCTL_CACHE_DIR", str(tmp_path / "wdmctl-cache"))
    extractor = PixelFeatures()
    for module in (fid_monitor, reference):
        monkeypatch.setattr(module, "load_inception", lambda *args, **kwargs: extractor)
    return extractor


def train_with_fid(cache: Path, runs: Path, *extra: str) -> Path:
    recipe = config.load_recipe(RECIPES / "quickstart.toml", tiny(cache, *FID_EVERY, *extra))
    return train(recipe, "quickstart", runs_dir=runs)


def fid_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if "fid" in r]


def test_fid_during_training_is_recorded_at_every_interval(digits_cache, tmp_path, stand_in_inception):
    run = train_with_fid(digits_cache, tmp_path / "runs", "train.max_steps=3", "fid.every=2")
    records = fid_records(run)
    # every 2 steps, and at the last step
    assert [r["step"] for r in records] == [2, 3]
    assert all(math.isfinite(r["fid"]) and r["fid"] > 0 and r["fid_num"] == 8 for r in records)
    assert all(0 < r["stripes"] <= 1 for r in records)       # the stripe score of the same 8 images
    assert [r["images_seen"] for r in records] == [8, 12]
    assert "fid8" in (run / "log.txt").read_text()


def test_fid_during_training_uses_fixed_samples(digits_cache, tmp_path, stand_in_inception):
    # two runs with the same seed train the same weights: their FIDs must match exactly (fixed seeds and
    # labels), and a run with another training seed must not
    first = fid_records(train_with_fid(digits_cache, tmp_path / "a"))
    again = fid_records(train_with_fid(digits_cache, tmp_path / "b"))
    other = fid_records(train_with_fid(digits_cache, tmp_path / "c", "train.seed=5"))
    assert [r["fid"] for r in first] == [r["fid"] for r in again]
    assert [r["fid"] for r in first] != [r["fid"] for r in other]


def test_fid_every_needs_a_reference():
    with pytest.raises(Exception, match="fid.every needs fid.ref"):
        config.validate(config.load_recipe(RECIPES / "cifar10.toml", ["fid.every=100", 'fid.ref=""']))


def test_report_draws_curves_and_a_table(digits_cache, tmp_path, stand_in_inception):
    runs = [train_with_fid(digits_cache, tmp_path / name / "runs", "train.max_steps=3", f"train.seed={seed}")
            for name, seed in (("arm-a", 0), ("arm-b", 1))]
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("loss.png", "fid-images.png", "fid-time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "report.md").read_text()
    # the two runs share their folder name; the labels tell them apart by the folder above
    assert "arm-a/runs/" in table and "arm-b/runs/" in table
    last = fid_records(runs[1])[-1]
    assert f"| {last['fid']:.2f} | {100 * last['stripes']:.2f}% |" in table
    again = invoke(["report", str(runs[0]), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output


def test_report_training_time_follows_the_loss_records(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 10, "loss": 0.5, "images_seen": 40, "sec_per_step": 0.6},
               {"step": 20, "loss": 0.4, "images_seen": 80, "sec_per_step": 1.2},
               {"step": 15, "images_seen": 60, "fid": 90.0, "fid_num": 8}]
    (run / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = read_run(run, "run")
    assert curves.minutes == pytest.approx([0.1, 0.3])          # 10 x 0.6 s, then + 10 x 1.2 s
    assert curves.fid_minutes == pytest.approx([0.2])            # halfway through the second interval
    assert curves.fids == [90.0] and curves.fid_images == [60]


def test_report_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no stats.jsonl" in result.output and "Traceback" not in result.output


def test_unique_labels():
    paths = [Path("a/runs/00000-x"), Path("b/runs/00000-x"), Path("c/00001-y")]
    assert unique_labels(paths) == ["a/runs/00000-x", "b/runs/00000-x", "c/00001-y"]
    assert unique_labels([Path("r/00000-x"), Path("r/00001-x")]) == ["00000-x", "00001-x"]


def shared_gpu_run(folder: Path, preset: str, images_per_step: int, sec_per_step: float) -> Path:
    """A run folder as arms sharing a GPU leave it: loss records with their (shared) seconds per step, FIDs."""
    folder.mkdir(parents=True)
    (folder / "recipe.toml").write_text(f'[model]\npreset = "{preset}"\n')
    records = [{"step": s, "images_seen": s * images_per_step, "loss": 1.0 / s, "sec_per_step": sec_per_step}
               for s in (10, 20)]
    records += [{"step": 20, "images_seen": 20 * images_per_step, "fid": 50.0, "fid_num": 100}]
    (folder / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_report_solo_speed_turns_images_into_gpu_minutes(tmp_path):
    fast = shared_gpu_run(tmp_path / "fast", "UViT-S/2", 600, 9.0)
    slow = shared_gpu_run(tmp_path / "slow", "WDM-S/2", 600, 9.0)
    bench = tmp_path / "bench.json"
    # two rows for WDM-S/2 (e.g. eager and graphed): the fastest counts; rows without a speed are ignored
    bench.write_text(json.dumps({"results": [
        {"preset": "WDM-S/2", "images_per_s": 50.0}, {"preset": "WDM-S/2", "images_per_s": 100.0},
        {"preset": "UViT-S/2", "images_per_s": 200.0}, {"preset": "DiM-S/2", "error": "out of memory"}]}))
    result = invoke(["report", str(fast), str(slow), "--out", str(tmp_path / "r"), "--solo-speed", str(bench)])
    assert result.exit_code == 0, result.stderr
    table = (tmp_path / "r" / "report.md").read_text()
    # 12,000 images: 1.0 GPU-minute at 200 images/s, 2.0 at 100 images/s, whatever the shared wall time (3 min)
    assert "GPU min (solo)" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| fast") or
            line.startswith("| slow")}
    assert "| 12000 | 1.0 |" in rows["fast"] and "| 12000 | 2.0 |" in rows["slow"]
    plain = invoke(["report", str(fast), "--out", str(tmp_path / "p")])
    assert plain.exit_code == 0
    assert "| 12000 | 3.0 |" in (tmp_path / "p" / "report.md").read_text()


def test_report_solo_speed_merges_files_and_refuses_a_preset_timed_twice(tmp_path):
    # arms added in a later session bring their own solo-speed JSON: each preset is read from the file that has it
    wdm = shared_gpu_run(tmp_path / "wdm", "WDM-S/2", 600, 9.0)
    dim = shared_gpu_run(tmp_path / "dim", "DiM-S/2", 600, 9.0)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({"results": [{"preset": "WDM-S/2", "images_per_s": 100.0}]}))
    second.write_text(json.dumps({"results": [{"preset": "DiM-S/2", "images_per_s": 50.0}]}))
    result = invoke(["report", str(wdm), str(dim), "--out", str(tmp_path / "r"), "--solo-speed", str(first),
                     "--solo-speed", str(second)])
    assert result.exit_code == 0, result.stderr
    table = (tmp_path / "r" / "report.md").read_text()
    assert "| 12000 | 2.0 |" in table and "| 12000 | 4.0 |" in table   # 12,000 images at 100 and at 50 images/s
    second.write_text(json.dumps({"results": [{"preset": "WDM-S/2", "images_per_s": 90.0}]}))
    twice = invoke(["report", str(wdm), "--out", str(tmp_path / "t"), "--solo-speed", str(first),
                    "--solo-speed", str(second)])
    assert twice.exit_code != 0 and "WDM-S/2 is timed in both" in twice.stderr
    assert "Traceback" not in twice.stderr and not (tmp_path / "t").exists()
    # PRESET=FILE takes only that preset from a file that times it beside another: the later session's DiM
    second.write_text(json.dumps({"results": [{"preset": "WDM-S/2", "images_per_s": 90.0},
                                              {"preset": "DiM-S/2", "images_per_s": 25.0}]}))
    picked = invoke(["report", str(wdm), str(dim), "--out", str(tmp_path / "p"), "--solo-speed", str(first),
                     "--solo-speed", f"DiM-S/2={second}"])
    assert picked.exit_code == 0, picked.stderr
    table = (tmp_path / "p" / "report.md").read_text()
    assert "| 12000 | 2.0 |" in table and "| 12000 | 8.0 |" in table   # WDM from first, DiM at 25 images/s
    absent = invoke(["report", str(dim), "--out", str(tmp_path / "a"), "--solo-speed", f"UViT-S/2,DiM-S/2={second}"])
    assert absent.exit_code != 0 and "has no row for UViT-S/2" in absent.stderr and "Traceback" not in absent.stderr
    bare = invoke(["report", str(dim), "--out", str(tmp_path / "a"), "--solo-speed", f"={second}"])
    assert bare.exit_code != 0 and "name the presets before '='" in bare.stderr


def test_report_solo_speed_errors_name_the_problem(tmp_path):
    run = shared_gpu_run(tmp_path / "run", "DiM-S/2", 10, 1.0)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": [{"preset": "WDM-S/2", "images_per_s": 10.0}]}))
    missing = invoke(["report", str(run), "--out", str(tmp_path / "r"), "--solo-speed", str(bench)])
    assert missing.exit_code != 0 and "DiM-S/2 has no row" in missing.stderr and "WDM-S/2" in missing.stderr
    bench.write_text("not json")
    broken = invoke(["report", str(run), "--out", str(tmp_path / "r"), "--solo-speed", str(bench)])
    assert broken.exit_code != 0 and "not a `wdmctl bench train --out` JSON" in broken.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written
