"""`wdmctl sample` and the sampling library on tiny randomly initialised pixel models (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wdmctl.cli import app
from wdmctl.diffusion import SOLVERS, default_clip_x0, make_noise_scheduler, make_sampler
from wdmctl.models import build_model
from wdmctl.pipeline import load_pipeline, pipeline_from_saved, save_pipeline
from wdmctl.errors import WdmError
from wdmctl.diffusion.sampler import denoise_loop, guided_eps, sample_images

runner = CliRunner()


def tiny_model(num_classes=10, channels=3, size=8, seed=0):
    torch.manual_seed(seed)
    return build_model("WDM-S/2", width=32, depth=1, sample_size=size, in_channels=channels,
                       num_classes=num_classes).eval()


@pytest.fixture
def saved_model(tmp_path):
    model = tiny_model()
    meta = {"autoencoder": {"spec": "none"}, "class_names": [f"c{i}" for i in range(10)],
            "sample": {"steps": 4, "cfg": 2.0}, "step": 7}
    return save_pipeline(tmp_path / "model", model, make_noise_scheduler(), meta, online_model=tiny_model(seed=1))


@pytest.fixture
def saved_uncond(tmp_path):
    model = tiny_model(num_classes=0)
    return save_pipeline(tmp_path / "uncond", model, make_noise_scheduler(), {"autoencoder": {"spec": "none"}})


def sample(args):
    result = runner.invoke(app, ["sample", *args], catch_exceptions=False)
    return result


def test_same_seed_same_images_for_any_batch_size(saved_model):
    pipe = load_pipeline(saved_model)
    seeds, labels = list(range(8)), [3, 1, 4, 1, 5, 9, 2, 6]
    outs = [sample_images(pipe.model, dict(pipe.scheduler.config), None, seeds, labels, steps=3, cfg=2.0,
                          batch_size=bs) for bs in (1, 3, 8)]
    assert outs[0].shape == (8, 8, 8, 3) and outs[0].dtype == np.uint8
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    # and a different seed gives different images
    other = sample_images(pipe.model, dict(pipe.scheduler.config), None, [100], [3], steps=3, cfg=2.0)
    assert not np.array_equal(other[0], outs[0][0])


def test_cfg_one_is_the_conditional_output_in_one_pass():
    calls = []

    def denoise(x, t, y):
        calls.append(len(x))
        return x * 0.5 + y[:, None, None, None].float()

    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([10.0, 10.0]), torch.tensor([1, 2])
    out = guided_eps(denoise, x, t, y, null_class=10, cfg=1.0)
    torch.testing.assert_close(out, denoise(x, t, y))
    assert calls[0] == 2  # one pass of batch 2, no unconditional half
    guided = guided_eps(denoise, x, t, y, null_class=10, cfg=3.0)
    cond, uncond = denoise(x, t, y), denoise(x, t, torch.full_like(y, 10))
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))


def test_cli_writes_pngs_grid_metadata_npz(saved_model, tmp_path):
    out = tmp_path / "samples"
    r = sample(["--model", str(saved_model), "--n", "5", "--class", "3", "--class", "c7", "--steps", "2",
                "--batch-size", "2", "--out", str(out), "--npz", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    pngs = sorted(out.glob("0*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    grid = np.asarray(Image.open(out / "grid.png"))
    # 3 columns x 2 rows of 8 px with 2 px padding (32 x 22), enlarged 16x to reach 512 px, without smoothing
    assert grid.shape[:2] == (16 * 22, 16 * 32)
    first = np.asarray(Image.open(pngs[0]))
    np.testing.assert_array_equal(grid[32:32 + 128:16, 32:32 + 128:16], first)     # one pixel per 16x16 block
    np.testing.assert_array_equal(grid[32 + 15:32 + 128:16, 32 + 15:32 + 128:16], first)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["classes"] == [3, 7, 3, 7, 3] and meta["class_names"][1] == "c7"
    assert meta["steps"] == 2 and meta["cfg"] == 2.0 and meta["solver"] == "dpm++2m" and meta["ema"] is True
    assert meta["seeds"] == [0, 4] and meta["checkpoint_step"] == 7
    assert meta["clip_x0"] is True  # a pixel model: predicted x0 clipped to [-1, 1] by default
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (5, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(npz["arr_1"], [3, 7, 3, 7, 3])
    np.testing.assert_array_equal(npz["arr_0"][2], np.asarray(Image.open(pngs[2])))


def test_cli_refuses_to_overwrite_and_bad_input_writes_nothing(saved_model, saved_uncond, tmp_path):
    out = tmp_path / "s"
    assert sample(["--model", str(saved_model), "--n", "1", "--steps", "1", "--out", str(out)]).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    r = runner.invoke(app, ["sample", "--model", str(saved_model), "--n", "1", "--steps", "1", "--out", str(out)])
    assert r.exit_code != 0 and "--overwrite" in str(r.exception)
    assert sorted(p.name for p in out.iterdir()) == before
    bad = [
        (["--model", str(saved_model), "--class", "10"], "out of range"),
        (["--model", str(saved_model), "--class", "dog"], "unknown class"),
        (["--model", str(saved_uncond), "--class", "1"], "unconditional"),
        (["--model", str(tmp_path / "nothing")], "not a wdmctl model folder"),
    ]
    for args, message in bad:
        target = tmp_path / "never"
        r = runner.invoke(app, ["sample", *args, "--n", "1", "--steps", "1", "--out", str(target)])
        assert r.exit_code != 0 and message in str(r.exception), (args, r.exception)
        assert not target.exists()
    r = runner.invoke(app, ["sample", "--model", str(saved_model), "--n", "0"])
    assert r.exit_code == 2 and "--n" in r.output


def test_no_ema_uses_the_online_weights(saved_model, tmp_path):
    a = sample(["--model", str(saved_model), "--n", "2", "--steps", "2", "--out", str(tmp_path / "a")])
    b = sample(["--model", str(saved_model), "--n", "2", "--steps", "2", "--out", str(tmp_path / "b"), "--no-ema"])
    assert a.exit_code == 0 and b.exit_code == 0
    assert json.loads((tmp_path / "b" / "metadata.json").read_text())["ema"] is False
    ia, ib = (np.asarray(Image.open(tmp_path / d / "000000.png")) for d in "ab")
    assert not np.array_equal(ia, ib)


def test_pipeline_round_trip_samples_identically(saved_model, tmp_path):
    from wdmctl.pipeline import WDMambaPipeline

    pipe = pipeline_from_saved(load_pipeline(saved_model))
    first = pipe(num_images=3, class_labels=[2], num_inference_steps=2, seed=5)
    pipe.save_pretrained(tmp_path / "pipe")
    again = WDMambaPipeline.from_pretrained(tmp_path / "pipe")
    second = again(num_images=3, class_labels=[2], num_inference_steps=2, seed=5)
    np.testing.assert_array_equal(first, second)
    assert again.wdmctl_meta["step"] == 7
    # the CLI samples the same images from the pipeline folder
    r = sample(["--model", str(tmp_path / "pipe"), "--n", "3", "--class", "2", "--steps", "2", "--seed", "5",
                "--out", str(tmp_path / "cli"), "--cfg", "2.0"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cli" / "000006.png")), first[1])  # seed 6


def test_unconditional_and_solvers(saved_uncond):
    pipe = load_pipeline(saved_uncond)
    for solver in ("dpm++3m", "ddim", "unipc", "euler", "dpm++2m-sde"):
        imgs = sample_images(pipe.model, dict(pipe.scheduler.config), None, [0, 1], None, steps=3, solver=solver)
        assert imgs.shape == (2, 8, 8, 3)
    a = sample_images(pipe.model, dict(pipe.scheduler.config), None, [0, 1], None, steps=3, solver="dpm++2m-sde", batch_size=1)
    b = sample_images(pipe.model, dict(pipe.scheduler.config), None, [0, 1], None, steps=3, solver="dpm++2m-sde", batch_size=2)
    np.testing.assert_array_equal(a, b)  # stochastic solvers draw per-image noise too


# ----------------------------------------------------------------------------------------------------
# The solvers themselves, with an exact denoiser
# ----------------------------------------------------------------------------------------------------

def oracle_denoiser(data: torch.Tensor, abar: torch.Tensor):
    """The exact epsilon of a dataset of a few images (a Gaussian mixture): a perfect denoiser, so any
    solver must land on one of those images."""
    data = data.double()

    def denoise(x, t, y):
        a = abar[t.round().long()].double().view(-1, 1, 1, 1)
        d2 = ((x.double()[:, None] - a.sqrt()[:, None] * data[None]) ** 2).flatten(2).sum(-1)
        w = torch.softmax(-d2 / (2 * (1 - a.view(-1, 1))), dim=1)
        x0 = torch.einsum("bk,kchw->bchw", w, data)
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()

    return denoise


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_every_solver_lands_on_the_data_with_an_exact_denoiser(schedule):
    torch.manual_seed(0)
    data = torch.rand(6, 3, 4, 4) * 2 - 1
    kw = {"beta_start": 1e-4, "beta_end": 0.02} if schedule == "linear" else {}
    config = dict(make_noise_scheduler(beta_schedule=schedule, **kw).config)
    denoise = oracle_denoiser(data, make_noise_scheduler(beta_schedule=schedule, **kw).alphas_cumprod)
    for solver in SOLVERS:
        generators = [torch.Generator().manual_seed(i) for i in range(8)] if solver.endswith("sde") else None
        x = denoise_loop(denoise, make_sampler(config, solver), torch.randn(8, 3, 4, 4), None, None, 1.0, 30, generators)
        nearest = ((x[:, None] - data[None]) ** 2).flatten(2).mean(-1).min(1).values
        assert nearest.max() < 1e-2, (solver, nearest)


def test_clip_x0_bounds_what_a_bad_denoiser_can_do():
    # eps = 0 claims x0 = x_t / sqrt(abar): ~150x the noise at t = 999 of the linear schedule
    config = dict(make_noise_scheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).config)
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    for solver in ("dpm++2m", "dpm++3m", "ddim", "unipc"):
        free = denoise_loop(zero, make_sampler(config, solver), noise, None, None, 1.0, 10, None)
        clipped = denoise_loop(zero, make_sampler(config, solver, clip_x0=True), noise, None, None, 1.0, 10, None)
        assert free.abs().max() > 10, solver
        assert clipped.abs().max() <= 1 + 1e-4, solver


def test_clip_x0_defaults_and_refusals(saved_model, tmp_path):
    assert default_clip_x0({"spec": "none"}, "dpm++2m") and default_clip_x0(None, "ddim")
    assert not default_clip_x0({"spec": "stabilityai/sd-vae-ft-ema"}, "dpm++2m")  # latents are unbounded
    assert not default_clip_x0({"spec": "none"}, "euler")                         # euler has no x0 to clip
    with pytest.raises(WdmError, match="euler cannot clip x_0"):
        make_sampler(dict(make_noise_scheduler().config), "euler", clip_x0=True)
    out = tmp_path / "s"
    r = runner.invoke(app, ["sample", "--model", str(saved_model), "--n", "1", "--steps", "1", "--solver", "euler",
                            "--clip-x0", "--out", str(out), "--device", "cpu"])
    assert r.exit_code != 0 and "cannot clip" in str(r.exception) and not out.exists()
    r = sample(["--model", str(saved_model), "--n", "1", "--steps", "1", "--no-clip-x0", "--out", str(out),
                "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metadata.json").read_text())["clip_x0"] is False


def test_bench_sample_times_each_backend_and_the_same_size_uvit_once(tmp_path):
    out = tmp_path / "sample.json"
    r = runner.invoke(app, ["bench", "sample", "--presets", "WDM-S/2", "--backends", "torch,mamba_ssm", "--batch", "1",
                            "--resolution", "8", "--steps", "1", "--cfgs", "1.0,2.0", "--precisions", "fp32", "--iters", "1", "--out", str(out)],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    rows = [(row["preset"], row["scan_backend"], row["cfg"]) for row in data["results"]]
    assert rows == [("WDM-S/2", "torch", 1.0), ("WDM-S/2", "torch", 2.0), ("UViT-S/2", None, 1.0), ("UViT-S/2", None, 2.0)]
    assert all(row["images_per_second"] > 0 and row["steps"] == 1 and row["resolution"] == 8 for row in data["results"])
    assert data["skipped_backends"] == ["mamba_ssm"]


def test_bench_scan_mode_applies_to_the_mamba_presets_only(tmp_path):
    # --scan bidirectional builds the WD-Mamba preset with two branches per block and says so in each row;
    # the U-ViT has no scan; a wrong mode is refused before anything runs
    out = tmp_path / "sample.json"
    r = runner.invoke(app, ["bench", "sample", "--presets", "WDM-S/2", "--backends", "torch", "--scan", "bidirectional",
                            "--batch", "1", "--resolution", "8", "--steps", "1", "--cfgs", "1.0", "--precisions", "fp32",
                            "--iters", "1", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert [(row["preset"], row["scan"]) for row in json.loads(out.read_text())["results"]] == [
        ("WDM-S/2", "bidirectional"), ("UViT-S/2", None)]
    for command in ("sample", "train"):
        r = runner.invoke(app, ["bench", command, "--presets", "WDM-S/2", "--backends", "torch", "--scan", "both"])
        assert r.exit_code != 0 and "--scan must be one of cycle, bidirectional, not 'both'" in str(r.exception)


@pytest.mark.parametrize("command", ["sample", "fid", "export"])
def test_a_missing_run_is_one_precise_line(command, tmp_path, capsys, monkeypatch):
    # every command that takes --run finds it the same way (wdmctl.runs), and says which run and where it looked
    from wdmctl.cli import main

    if command == "export":
        pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "00000-other-WDM-S2").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--run", "7"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == "error: run '7' not found (neither a folder nor a run under runs/)\n"


def test_scaling_summary_pairs_each_mamba_row_with_its_uvit_and_finds_the_crossover():
    # synthetic rows: WD-Mamba's ratio goes 0.5 -> 2 between 256 and 1,024 tokens (log-linear: 1 at 512), graphed
    # U-ViT runs out of memory at 4,096 tokens; eager never reaches 1
    from wdmctl.bench.scaling import scaling_summary

    def row(preset, side, rate, graph, **extra):
        return {"preset": preset, "backend": "triton" if preset.startswith("WDM") else "n/a", "resolution": side,
                "tokens": (side // 2) ** 2, "batch_size": 8, "cuda_graph": graph, "compile": False,
                "images_per_s": rate, "peak_memory_gib": 1.0, **extra}

    rows = [row("WDM-B/2", 32, 50, True), row("UViT-B/2", 32, 100, True),
            row("WDM-B/2", 64, 40, True), row("UViT-B/2", 64, 20, True),
            row("WDM-B/2", 128, 10, True), {**row("UViT-B/2", 128, None, True), "error": "out of memory"},
            row("WDM-B/2", 32, 10, False), row("UViT-B/2", 32, 100, False),
            row("WDM-B/2", 64, 10, False), row("UViT-B/2", 64, 50, False)]
    summary = scaling_summary(rows, "images_per_s", "batch_size", ("cuda_graph", "compile"))
    ratios = [(e["tokens"], e["cuda_graph"], e["ratio"]) for e in summary["versus_uvit"]]
    assert ratios == [(256, True, 0.5), (1024, True, 2.0), (4096, True, "U-ViT out of memory"),
                      (256, False, 0.1), (1024, False, 0.2)]
    graphed, eager = summary["crossover"]
    assert graphed["crossover"] == {"tokens": 512, "latent_side": 45.3, "pixels_through_sd_vae": 362}
    assert eager["crossover"] == "not reached by 1024 tokens"


def test_bench_sizes_and_compile_modes_are_checked_before_any_run():
    from wdmctl.cli.bench import parse_sizes

    assert parse_sizes("32:64, 64:32,128", 16, 4) == [(32, 64), (64, 32), (128, 4)]
    assert parse_sizes(None, 16, 4) == [(16, 4)]
    for bad in ("32x64", "0:8", ""):
        with pytest.raises(WdmError, match="--sizes takes latent sides with optional batches"):
            parse_sizes(bad, 16, 4)
    r = runner.invoke(app, ["bench", "train", "--presets", "WDM-S/2", "--compile", "yes"])
    assert r.exit_code != 0 and "--compile takes off, on or off,on, not 'yes'" in str(r.exception)


def test_bench_sample_over_sizes_reports_memory_and_the_uvit_ratio(tmp_path):
    out = tmp_path / "sample.json"
    r = runner.invoke(app, ["bench", "sample", "--presets", "WDM-S/2", "--backends", "torch", "--sizes", "8,4:2",
                            "--batch", "1", "--steps", "1", "--cfgs", "1.0", "--precisions", "fp32", "--iters", "1",
                            "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [(row["preset"], row["resolution"], row["batch"], row["tokens"]) for row in data["results"]] == [
        ("WDM-S/2", 8, 1, 16), ("UViT-S/2", 8, 1, 16), ("WDM-S/2", 4, 2, 4), ("UViT-S/2", 4, 2, 4)]
    assert all("peak_memory_gib" in row for row in data["results"])   # None on CPU
    assert [(e["tokens"], e["uvit"]) for e in data["versus_uvit"]] == [(16, "UViT-S/2"), (4, "UViT-S/2")]
    assert all(e["ratio"] > 0 for e in data["versus_uvit"]) and len(data["crossover"]) == 1
