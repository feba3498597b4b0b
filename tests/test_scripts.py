"""The GPU scripts' pieces that can be checked on a CPU: every arm of scripts/gpu-ablation.sh names recipe keys
that load and name the presets gpu-table1.sh times, every bench command of the gpu-*.sh scripts parses and names
known backends, and scripts/periodic-texture.py reads wdmctl's grids exactly as it reads the images."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_stripes import smooth_images
from wdmctl import config
from wdmctl.core.images import save_grid

ROOT = Path(__file__).resolve().parents[1]
ABLATION = ROOT / "scripts" / "gpu-ablation.sh"


def ablation_arms() -> list[str]:
    body = ABLATION.read_text().split("arm_overrides() {", 1)[1].split("\n}", 1)[0]
    return [a for a in re.findall(r"^\s+([\w.+-]+)\)", body, re.M) if a != "*"]


def arm_keys(arm: str) -> list[str]:
    source = f'source <(sed -n "/^arm_overrides()/,/^}}/p" {ABLATION}); arm_overrides {arm}'
    out = subprocess.run(["bash", "-c", source], capture_output=True, text=True, check=True).stdout
    return out.split()


def test_every_ablation_arm_loads_as_a_recipe():
    arms = ablation_arms()
    assert {"cycle", "conv2d", "noconv", "lr2e-4", "uvit", "umamba", "dim"} <= set(arms)
    for arm in arms + ["noconv+pads", "dim+depth26", "umamba+pads"]:
        recipe = config.load_recipe(ROOT / "recipes" / "cifar10.toml", arm_keys(arm))
        assert recipe.model.preset
    assert config.load_recipe(ROOT / "recipes" / "cifar10.toml", arm_keys("lr2e-4")).optim.lr == 2e-4
    assert config.load_recipe(ROOT / "recipes" / "cifar10.toml", arm_keys("noconv")).model.mixer_conv == "none"
    stack26 = config.load_recipe(ROOT / "recipes" / "cifar10.toml", arm_keys("dim+depth26")).model
    assert (stack26.preset, stack26.depth) == ("DiM-S/2", 26)   # the plain stack at WD-Mamba's block count
    assert config.load_recipe(ROOT / "recipes" / "cifar10.toml", arm_keys("skipavg")).model.skip_init == "average"
    assert config.load_recipe(ROOT / "recipes" / "cifar10.toml", arm_keys("skipxavier")).model.skip_init == "xavier"


def arm_env(arm: str) -> str:
    source = f'source <(sed -n "/^arm_env()/,/^}}/p" {ABLATION}); arm_env {arm}'
    return subprocess.run(["bash", "-c", source], capture_output=True, text=True, check=True).stdout.strip()


def test_only_the_unfused_arms_switch_the_fused_kernels_off():
    # the kernel control of the stripe ablation: its training and its scoring both run without fused kernels
    assert arm_env("unfused") == arm_env("noconv+unfused") == arm_env("unfused+pads") == "WDMCTL_FUSED_KERNELS=0"
    assert arm_env("cycle") == arm_env("noconv") == arm_env("mamba_ssm") == ""
    assert arm_keys("unfused") == []           # the same recipe as the default: only the environment differs
    assert arm_keys("mamba_ssm") == ['model.scan_backend="mamba_ssm"']


def arm_presets(*arms: str) -> subprocess.CompletedProcess:
    # the scripts call `python`: this interpreter (the one with wdmctl) comes first on PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", str(ABLATION), "preset", *arms], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PATH": path})


def test_table1_times_the_presets_its_arms_train():
    # gpu-table1.sh times the solo speeds (GPU-minutes) of the presets `preset` names: those the arms' recipes train
    result = arm_presets("cycle", "umamba", "dim", "uvit", "noconv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["WDM-S/2", "UMamba-S/2", "DiM-S/2", "UViT-S/2", "WDM-S/2"]
    refused = arm_presets("cycle", "nosuch")
    assert refused.returncode == 2 and "unknown arm: nosuch" in refused.stderr


def arm_steps(budget: str, solo: Path, *arms: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", str(ABLATION), "steps", budget, str(solo), *arms], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PATH": path})


def test_table1_gives_every_arm_equal_steps_or_equal_gpu_minutes(tmp_path):
    # gpu-table1.sh start ... 4.5min: each arm trains 4.5 GPU-minutes at its preset's solo speed (the fastest
    # row of that preset), over the recipe's batch of 128: U-ViT at 3,110 img/s gets more steps than WD-Mamba
    solo = tmp_path / "solo.json"
    solo.write_text('{"results": [{"preset": "WDM-S/2", "images_per_s": 1000.0}, '
                    '{"preset": "WDM-S/2", "images_per_s": 1912.7}, {"preset": "UViT-S/2", "images_per_s": 3109.8}]}')
    timed = arm_steps("4.5min", solo, "cycle", "uvit", "noconv")
    assert timed.returncode == 0, timed.stderr
    assert timed.stdout.split("\n")[:3] == ["cycle 4035", "uvit 6560", "noconv 4035"]   # 4.5 x 60 x img/s / 128
    same = arm_steps("4000", tmp_path / "not-needed.json", "cycle", "uvit")
    assert same.returncode == 0 and same.stdout.split() == ["cycle", "4000", "uvit", "4000"]
    missing = arm_steps("4.5min", solo, "dim")
    assert missing.returncode != 0 and "has no solo speed for DiM-S/2 (arm dim)" in missing.stderr
    assert "needs the solo speeds" in arm_steps("2min", tmp_path / "nothing.json", "cycle").stderr
    assert "budget must be steps or Nmin" in arm_steps("4.5h", solo, "cycle").stderr


def test_an_unknown_arm_is_refused():
    source = f'source <(sed -n "/^arm_overrides()/,/^}}/p" {ABLATION}); arm_overrides nosuch'
    result = subprocess.run(["bash", "-c", source], capture_output=True, text=True)
    assert result.returncode != 0 and "unknown arm: nosuch" in result.stderr


def load_script(name: str):
    """A scripts/NAME.py file as a module (the scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def texture():
    return load_script("periodic-texture")


def test_stripe_score_reads_a_grid_as_its_images(texture, tmp_path):
    images = smooth_images(100, seed=1)
    striped = images.copy()
    striped[:, ::2, ::2] = 255                         # a 2-pixel lattice in every image
    save_grid(images, tmp_path / "grid.png", columns=10)     # enlarged to >= 512 px, 2 px padding
    cells = texture.grid_cells(tmp_path / "grid.png", 32)
    assert len(cells) == 100
    np.testing.assert_array_equal(np.stack(cells), images)
    with pytest.raises(SystemExit, match="not a 10-column grid of 16-px images"):
        texture.grid_cells(tmp_path / "grid.png", 16)
    # the score of the grid is the score of its images, and the lattice is found through the grid
    save_grid(striped, tmp_path / "striped.png", columns=10)
    from_grid = texture.stripe_score(texture.grid_cells(tmp_path / "striped.png", 32), 4)
    assert from_grid == texture.stripe_score(list(striped), 4)
    assert from_grid["share"] > 10 * texture.stripe_score(cells, 4)["share"]



def test_compare_samples_measures_what_differs(tmp_path):
    from PIL import Image

    compare = load_script("compare-samples").compare
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "a" / f"{i:06d}.png")
        if i == 1:   # one value 7 levels off, one 1 level off
            image = image.copy()
            image[0, 0, 0] = (int(image[0, 0, 0]) + 7) % 256 if image[0, 0, 0] < 249 else image[0, 0, 0] - 7
            image[1, 1, 1] = image[1, 1, 1] + 1 if image[1, 1, 1] < 255 else 254
        Image.fromarray(image).save(tmp_path / "b" / f"{i:06d}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b" / "grid.png")   # grids are not samples
    result = compare(tmp_path / "a", tmp_path / "b")
    assert result["images"] == 3 and not result["identical"] and result["max_abs_levels"] == 7
    assert result["share_over_one_level"] == pytest.approx(1 / (3 * 8 * 8 * 3))
    assert 50 < result["psnr_db"] < 80
    same = compare(tmp_path / "a", tmp_path / "a")
    assert same["identical"] and same["psnr_db"] is None and same["max_abs_levels"] == 0
    (tmp_path / "a" / "000003.png").write_bytes((tmp_path / "a" / "000000.png").read_bytes())
    with pytest.raises(ValueError, match="hold different images"):
        compare(tmp_path / "a", tmp_path / "b")


# ----------------------------------------------------------------------------------------------------
# The bench scripts' command lines parse: a typo in an option costs a GPU session's minutes, not a CPU second
# ----------------------------------------------------------------------------------------------------

BENCH_SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("gpu-*.sh") if re.search(r"^timed ", p.read_text(), re.M))


def timed_commands(script: Path) -> list[list[str]]:
    """The wdmctl arguments of every `timed NAME SECONDS ARGS...` line (gpu-bench-lib.sh adds --out), with the
    script's own `name=value` assignments and $OUT substituted."""
    import shlex

    text = script.read_text().replace("\\\n", " ")
    assignments = dict(re.findall(r"^(\w+)=(\S+)$", text, re.M))
    commands = []
    for line in re.findall(r"^timed (.+)$", text, re.M):
        expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: assignments.get(m.group(1), "/tmp/out"), line)
        commands.append(shlex.split(expanded)[2:])  # past NAME and SECONDS
    return commands


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=lambda p: p.name)
def test_bench_script_commands_parse_and_name_known_backends(script):
    import typer

    from wdmctl.bench.denoiser import BENCH_BACKENDS
    from wdmctl.cli import app
    from wdmctl.scan import BACKENDS as SCAN_BACKENDS, available_backends

    available_backends()  # registers the built-in backends (triton's among them) by name

    commands = timed_commands(script)
    assert commands, f"{script.name} has no `timed` lines"
    group = typer.main.get_command(app)
    for args in commands:
        with group.context_class(group) as root:  # typer's own click (typer vendors it)
            name, command, rest = group.resolve_command(root, args)
            while hasattr(command, "resolve_command"):  # a group: bench -> bench scan
                name, command, rest = command.resolve_command(root, rest)
            # parses every option and converts its value (an unknown option or a bad int fails here)
            params = command.make_context(name, [*rest, "--out", "/tmp/out.json"], parent=root).params
        known = BENCH_BACKENDS if name == "denoiser" else SCAN_BACKENDS
        for backend in (params.get("backends") or "").split(","):
            assert backend in known, f"{script.name}: {name} --backends {backend} is not a {name} backend"
