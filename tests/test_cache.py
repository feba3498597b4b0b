"""`wdmctl cache`: the latent-cache writer and reader, the autoencoders, and the command's errors.

A tiny randomly initialised AutoencoderKL saved to a temporary folder stands in for the SD VAE (no
network); TAEF2 is checked on its real weights from ../shared when they are there.
"""

from __future__ import annotations

import json
import pickle
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import shared_path
from wdmctl.models.autoencoders import autoencoder_from_manifest, load_autoencoder
from wdmctl.data import cache as cache_module
from wdmctl.data.cache import LatentDataset, build_cache, load_manifest
from wdmctl.data.sources import center_crop_resize, open_source
from wdmctl.errors import WdmError

RES = 16  # the tiny VAE downsamples 2x: latents are 4x8x8
# (folder, name, width, height): three are smaller than RES and get upscaled
IMAGES = [("cat", "a.png", 20, 24), ("cat", "b.jpg", 40, 30), ("cat", "c.png", 12, 12),
          ("dog", "d.png", 16, 16), ("dog", "e.png", 33, 15), ("dog", "f.png", 10, 30), ("dog", "g.jpg", 64, 64)]
SMALLER_THAN_RES = 3


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    # non-default factors, so a forgotten scale/shift shows up in the reader tests
    vae = AutoencoderKL(block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2,
                        layers_per_block=1, sample_size=RES, scaling_factor=0.5, shift_factor=0.1)
    folder = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """Two class folders of RGB images of odd sizes, one corrupt image and one non-image file."""
    root = tmp_path_factory.mktemp("images") / "pets"
    rng = np.random.default_rng(0)
    for folder, name, width, height in IMAGES:
        (root / folder).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / folder / name, quality=95)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (root / "cat" / "notes.txt").write_text("ignored: not an image")
    return root


@pytest.fixture(scope="module")
def kl_cache(tiny_vae, image_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kl") / "cache"
    build_cache(str(image_tree), out, RES, vae=tiny_vae, batch_size=3, shard_size=4)
    return out


def preprocessed(root: Path, key: str) -> torch.Tensor:
    """The image as the cache sees it: center-cropped uint8 -> float (1, 3, RES, RES) in [-1, 1]."""
    array = center_crop_resize(Image.open(root / key), RES)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def timeless_manifest(cache_dir: Path) -> dict:
    """The manifest without its creation time and shard hashes, for comparing two builds (safetensors writes
    header metadata in hash-map order, so equal shards can differ in bytes; their tensors are compared instead)."""
    manifest = load_manifest(cache_dir)
    manifest.pop("created")
    for shard in manifest["shards"]:
        shard.pop("sha256")
    return manifest


def shard_tensors(cache_dir: Path) -> dict[str, torch.Tensor]:
    """All shards' tensors concatenated along the image axis."""
    parts: dict[str, list[torch.Tensor]] = {}
    for entry in load_manifest(cache_dir)["shards"]:
        for name, tensor in load_file(cache_dir / entry["file"]).items():
            parts.setdefault(name, []).append(tensor)
    return {name: torch.cat(tensors) for name, tensors in parts.items()}


def test_manifest_records_provenance(kl_cache, image_tree, tiny_vae):
    manifest = load_manifest(kl_cache)
    config = json.loads((Path(tiny_vae) / "config.json").read_text())
    assert manifest["count"] == len(IMAGES)
    assert manifest["source"]["fingerprint"] == open_source(str(image_tree)).fingerprint()
    assert manifest["source"]["images"] == len(IMAGES) + 1  # the corrupt png is listed by the source
    assert manifest["resolution"] == RES and manifest["flip"] is True
    assert manifest["crop"].startswith("adm-center-crop")
    assert manifest["num_classes"] == 2 and manifest["class_names"] == ["cat", "dog"]
    assert [s["file"] for s in manifest["skipped"]] == ["dog/broken.png"]
    assert manifest["upscaled"] == SMALLER_THAN_RES
    assert manifest["latent_shape"] == [4, RES // 2, RES // 2]
    assert manifest["stored"] == {"mean": "float16", "std": "float16"}
    assert manifest["tool"].startswith("wdmctl ")
    entry = manifest["autoencoder"]
    assert entry["kind"] == "kl" and entry["spec"] == str(Path(tiny_vae).resolve())
    assert entry["scaling_factor"] == config["scaling_factor"] == 0.5
    assert entry["shift_factor"] == config["shift_factor"] == 0.1
    assert entry["config_hash"] == load_autoencoder(tiny_vae).config_hash
    # 8 listed images in shards of 4; the broken one (sorted 4th) takes no row
    assert [(s["count"], s["first_index"], s["end_index"]) for s in manifest["shards"]] == [(3, 0, 4), (4, 4, 8)]


def test_cached_moments_are_the_images_and_their_flips(kl_cache, image_tree, tiny_vae):
    autoencoder = autoencoder_from_manifest(load_manifest(kl_cache)["autoencoder"])
    stored = shard_tensors(kl_cache)
    source = open_source(str(image_tree))
    assert stored["mean"].shape == (len(IMAGES), 2, 4, RES // 2, RES // 2)
    assert stored["mean"].dtype == stored["std"].dtype == torch.float16
    assert (stored["std"] > 0).all()
    for row, index in enumerate(stored["index"].tolist()):
        key = source.keys[index]
        assert stored["label"][row] == ["cat", "dog"].index(key.split("/")[0])
        image = preprocessed(image_tree, key)
        for variant, pixels in enumerate((image, image.flip(-1))):
            mean, std = autoencoder.encode_moments(pixels)
            torch.testing.assert_close(stored["mean"][row, variant].float(), mean[0], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(stored["std"][row, variant].float(), std[0], atol=2e-3, rtol=2e-3)
        # decoding the cached mean gives what decoding a fresh encoding gives
        cached = autoencoder.decode(autoencoder.scale(stored["mean"][row, :1].float()))
        fresh = autoencoder.decode(autoencoder.scale(autoencoder.encode_moments(image)[0]))
        torch.testing.assert_close(cached, fresh, atol=1e-2, rtol=0)
    # the flipped entry is not just the original again
    assert not torch.equal(stored["mean"][:, 0], stored["mean"][:, 1])


def test_zip_source_gives_the_same_cache(kl_cache, image_tree, tiny_vae, tmp_path):
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(image_tree.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(image_tree.parent).as_posix())  # one top folder: pets/
    build_cache(str(archive), tmp_path / "zip-cache", RES, vae=tiny_vae, batch_size=3, shard_size=4)
    from_zip, from_folder = shard_tensors(tmp_path / "zip-cache"), shard_tensors(kl_cache)
    assert from_zip.keys() == from_folder.keys()
    for name in from_zip:
        torch.testing.assert_close(from_zip[name], from_folder[name], atol=1e-3, rtol=0)
    manifest = load_manifest(tmp_path / "zip-cache")
    assert manifest["class_names"] == ["cat", "dog"]
    assert [s["file"] for s in manifest["skipped"]] == ["pets/dog/broken.png"]


def test_resumed_build_equals_uninterrupted_one(image_tree, tiny_vae, tmp_path, monkeypatch):
    write_shard = cache_module._write_shard
    written = []

    def killed_after_two(path, tensors, metadata):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        write_shard(path, tensors, metadata)
        written.append(path.name)

    interrupted = tmp_path / "interrupted"
    args = dict(resolution=RES, vae=tiny_vae, batch_size=2, shard_size=3)
    monkeypatch.setattr(cache_module, "_write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_cache(str(image_tree), interrupted, **args)
    monkeypatch.undo()
    assert sorted(p.name for p in interrupted.iterdir()) == ["manifest.json", *written]  # no temporaries left
    with pytest.raises(WdmError, match="unfinished"):
        LatentDataset(interrupted)

    resumed = build_cache(str(image_tree), interrupted, **args)
    assert (resumed.shards, resumed.shards_reused, resumed.encoded_images) == (3, 2, 2)
    build_cache(str(image_tree), tmp_path / "whole", **args)
    for name in ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]:
        a, b = load_file(interrupted / name), load_file(tmp_path / "whole" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert timeless_manifest(interrupted) == timeless_manifest(tmp_path / "whole")
    # a finished cache reruns as a no-op
    again = build_cache(str(image_tree), interrupted, **args)
    assert (again.shards_reused, again.encoded_images, again.count) == (3, 0, len(IMAGES))


def test_processes_split_shards_and_main_writes_the_manifest(image_tree, tmp_path, monkeypatch):
    """Two "processes" (threads with a real barrier, as under `accelerate launch`) build what one does."""
    barrier, rank = threading.Barrier(2), threading.local()
    monkeypatch.setattr(cache_module, "_current_process", lambda device: cache_module._Process(rank.value, 2, 0))
    monkeypatch.setattr(cache_module._Process, "barrier", lambda self: barrier.wait(timeout=60))
    # pixels: diffusers' model loading patches torch globally and is not thread-safe (real ranks are processes)
    args = dict(resolution=RES, vae="none", batch_size=2, shard_size=3)
    results = {}

    def run(process_rank):
        rank.value = process_rank
        try:
            results[process_rank] = build_cache(str(image_tree), tmp_path / "split", **args)
        except BaseException as err:  # surfaced by the asserts below
            results[process_rank] = err
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [type(results[r]).__name__ for r in (0, 1)] == ["CacheSummary"] * 2, results
    # shards 0 and 2 (3 + 2 listed images) on rank 0, shard 1 on rank 1
    assert (results[0].encoded_images, results[1].encoded_images) == (5, 3)
    assert results[0].count == results[1].count == len(IMAGES)
    monkeypatch.undo()
    build_cache(str(image_tree), tmp_path / "single", **args)
    split, single = shard_tensors(tmp_path / "split"), shard_tensors(tmp_path / "single")
    assert all(torch.equal(split[k], single[k]) for k in single)
    assert timeless_manifest(tmp_path / "split") == timeless_manifest(tmp_path / "single")


def test_different_build_is_refused_unless_overwrite(kl_cache, image_tree, tiny_vae, tmp_path):
    out = tmp_path / "cache"
    build_cache(str(image_tree), out, RES, vae="none", shard_size=4)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(WdmError, match=r"different resolution \(16 there, 8 asked\).*--overwrite"):
        build_cache(str(image_tree), out, 8, vae="none", shard_size=4)
    with pytest.raises(WdmError, match="different autoencoder"):
        build_cache(str(image_tree), out, RES, vae=tiny_vae, shard_size=4)
    with pytest.raises(WdmError, match="different source fingerprint"):
        build_cache("digits", out, RES, vae="none", shard_size=4)
    assert sorted(p.name for p in out.iterdir()) == before
    (out / "README.txt").write_text("the user's own file")
    build_cache(str(image_tree), out, 8, vae="none", shard_size=4, overwrite=True)
    assert load_manifest(out)["resolution"] == 8
    assert (out / "README.txt").read_text() == "the user's own file"
    # a folder that is not a cache is never written into, --overwrite or not
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(WdmError, match="not empty and holds no wdmctl cache"):
        build_cache(str(image_tree), tmp_path / "photos", RES, vae="none", overwrite=True)


def test_latent_dataset_samples_posterior_and_flip(kl_cache):
    dataset, no_flip = LatentDataset(kl_cache), LatentDataset(kl_cache, flip=False)
    stored = shard_tensors(kl_cache)
    assert len(dataset) == len(IMAGES)
    assert (dataset.num_classes, dataset.class_names, dataset.latent_shape) == (2, ["cat", "dog"], [4, 8, 8])

    def expected(i, seed, flip):
        torch.manual_seed(seed)  # replay the reader's draws: the flip (when flipping), then the noise
        variant = int(torch.randint(2, ())) if flip else 0
        mean, std = stored["mean"][i, variant].float(), stored["std"][i, variant].float()
        return (mean + std * torch.randn(mean.shape) - 0.1) * 0.5, variant  # the tiny VAE's shift and scale

    variants = set()
    for seed, i in enumerate([0, 5, -1, 2, 2, 2, 2, 2]):
        torch.manual_seed(seed)
        x, label = dataset[i]
        want, variant = expected(i, seed, flip=True)
        variants.add(variant)
        assert x.dtype == torch.float32 and x.shape == (4, 8, 8)
        torch.testing.assert_close(x, want)
        assert label.dtype == torch.int64 and label == stored["label"][i]
        torch.manual_seed(seed)
        torch.testing.assert_close(no_flip[i][0], expected(i, seed, flip=False)[0])
    assert variants == {0, 1}
    assert not torch.equal(dataset[0][0], dataset[0][0])  # fresh noise on every access
    with pytest.raises(IndexError):
        dataset[len(IMAGES)]
    clone = pickle.loads(pickle.dumps(dataset))  # DataLoader workers get a copy without open files
    torch.manual_seed(5)
    a = clone[3][0]
    torch.manual_seed(5)
    torch.testing.assert_close(a, dataset[3][0])


def test_pixel_cache_of_digits_without_flip(tmp_path):
    summary = build_cache("digits", tmp_path / "digits", 16, vae="none", shard_size=1000, flip=False)
    assert (summary.count, summary.num_classes, summary.upscaled, summary.shards) == (1797, 10, 1797, 2)
    manifest = load_manifest(tmp_path / "digits")
    assert manifest["autoencoder"]["kind"] == "none" and manifest["latent_shape"] == [3, 16, 16]
    stored = shard_tensors(tmp_path / "digits")
    assert stored["pixels"].shape == (1797, 1, 3, 16, 16) and stored["pixels"].dtype == torch.uint8
    dataset = LatentDataset(tmp_path / "digits")  # flip asked, but the cache has none: never flipped
    assert dataset.flip is False
    x, label = dataset[10]
    torch.testing.assert_close(x, stored["pixels"][10, 0].float() / 127.5 - 1)
    assert label == 0 and x.min() >= -1 and x.max() <= 1  # digit 10 is a 0


def test_unconditional_flat_folder_with_flips_in_pixels(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    build_cache(str(folder), tmp_path / "cache", 8, vae="none")
    stored = shard_tensors(tmp_path / "cache")
    assert torch.equal(stored["pixels"][:, 1], stored["pixels"][:, 0].flip(-1))
    dataset = LatentDataset(tmp_path / "cache")
    assert dataset.num_classes == 0 and dataset.class_names == []
    assert all(int(dataset[i][1]) == 0 for i in range(3))


def run_cli(argv, capsys) -> tuple[int, str, str]:
    from wdmctl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def the_error(err: str) -> str:
    """The one `error:` line, which must end stderr (a progress bar may precede it)."""
    lines = err.rstrip("\n").split("\n")
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    return lines[-1]


def test_cli_builds_and_reports(image_tree, tiny_vae, tmp_path, capsys):
    code, out, _ = run_cli(["cache", str(image_tree), "--out", str(tmp_path / "c"), "--resolution", str(RES),
                            "--vae", tiny_vae, "--batch-size", "4", "--no-flip"], capsys)
    assert code == 0
    assert f"cached {len(IMAGES)} images (2 classes) as 4x8x8" in out
    assert f"warning: {SMALLER_THAN_RES} images were smaller than {RES} px" in out
    assert "skipped 1 unreadable files" in out and "dog/broken.png" in out
    assert load_manifest(tmp_path / "c")["flip"] is False


@pytest.mark.parametrize("args, message", [
    (["--vae", "bogus"], "--vae 'bogus' is not a folder, a Hub id"),
    (["--vae", "taef2:"], "taef2: needs the weights folder"),
    (["--resolution", "15"], "resolution 15 is not divisible by the autoencoder's downsampling factor 2"),
    (["--vae", "acme/no-such-vae"], "cannot load autoencoder 'acme/no-such-vae'.*local diffusers AutoencoderKL "
                                    "folder, `taef2:DIR`.*`none`"),
])
def test_cli_errors_are_one_line(args, message, image_tree, tiny_vae, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    argv = ["cache", str(image_tree), "--out", str(tmp_path / "c"), "--resolution", str(RES), "--vae", tiny_vae]
    code, _, err = run_cli(argv + args, capsys)
    assert code == 2 and err.count("\n") == 1  # nothing but the error line
    assert re.search(message, the_error(err))
    assert not (tmp_path / "c").exists()


def test_cli_unreadable_sources(tmp_path, capsys):
    code, _, err = run_cli(["cache", str(tmp_path / "missing"), "--out", str(tmp_path / "c"), "--vae", "none"], capsys)
    assert code == 2 and "does not exist" in the_error(err) and err.count("\n") == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"garbage")
    (bad / "y.png").write_bytes(b"")
    code, _, err = run_cli(["cache", str(bad), "--out", str(tmp_path / "c"), "--vae", "none"], capsys)
    assert code == 2 and "none of the 2 images" in the_error(err)
    assert not (tmp_path / "c" / "manifest.json").exists()
    code, _, err = run_cli(["cache", "digits", "--out", str(tmp_path / "c"), "--batch-size", "0"], capsys)
    assert code == 2 and "--batch-size" in err  # typer's range check


CIFAR_PICKS = [0, 2500, 5000, 7500]  # airplane/0000, bird/0500, dog/0000, horse/0500 of the test split
# Measured on CPU (fp32) for these four images upscaled to 128 px: 37.8 dB (36.1 dB over one image of each
# of the ten classes); the same weights without the GroupNorm branch (stock AutoencoderTiny) give 17.3 dB.
TAEF2_PSNR_DB = 36.0


def test_taef2_round_trip_on_cifar10(tmp_path):
    weights = shared_path("assets", "taef2")
    archive = shared_path("assets", "cifar10", "cifar10-test.tar.gz")
    autoencoder = load_autoencoder(f"taef2:{weights}")  # strict loading: every key, including the GN branch
    assert (autoencoder.latent_channels, autoencoder.downsample_factor) == (32, 8)
    assert (autoencoder.scaling_factor, autoencoder.shift_factor) == (1.0, 0.0)
    source = open_source(str(archive))
    folder = tmp_path / "cifar"
    for i in CIFAR_PICKS:  # a small source for the cache test below
        (folder / source.keys[i].split("/")[-2]).mkdir(parents=True, exist_ok=True)
        source.open(i).save(folder / "/".join(source.keys[i].split("/")[-2:]).replace(".jpg", ".png"))
    images = torch.stack([torch.from_numpy(center_crop_resize(source.open(i), 128).copy()).permute(2, 0, 1)
                          for i in CIFAR_PICKS]).float() / 127.5 - 1
    latent, std = autoencoder.encode_moments(images)
    assert std is None and latent.shape == (4, 32, 16, 16)
    assert abs(latent.mean()) < 0.1 and 0.5 < latent.std() < 1.5  # already unit-scale: factors 1 and 0
    decoded = autoencoder.decode(autoencoder.scale(latent))
    psnr = 10 * torch.log10(4 / ((decoded - images) ** 2).mean())  # peak-to-peak 2 in [-1, 1]
    assert psnr > TAEF2_PSNR_DB, f"TAEF2 round trip {psnr:.2f} dB"

    build_cache(str(folder), tmp_path / "cache", 64, vae=f"taef2:{weights}", batch_size=4)
    manifest = load_manifest(tmp_path / "cache")
    assert manifest["stored"] == {"latent": "float16"} and manifest["latent_shape"] == [32, 8, 8]
    assert manifest["autoencoder"]["weights_hash"] == autoencoder.weights_hash
    stored = shard_tensors(tmp_path / "cache")
    first = torch.from_numpy(center_crop_resize(Image.open(folder / open_source(str(folder)).keys[0]), 64).copy())
    expected = autoencoder.encode_moments(first.permute(2, 0, 1)[None].float().flip(-1) / 127.5 - 1)[0][0]
    torch.testing.assert_close(stored["latent"][0, 1].float(), expected, atol=5e-3, rtol=5e-3)
    x, _ = LatentDataset(tmp_path / "cache", flip=False)[0]
    torch.testing.assert_close(x, stored["latent"][0, 0].float())


def test_verify_names_bad_shards_and_a_rerun_encodes_only_those(tmp_path, capsys):
    """The manifest records each shard's size and sha256; `cache verify` hashes them, training's reader checks
    sizes and framing, and rerunning the build re-encodes exactly the shards that are bad."""
    out = tmp_path / "digits"
    build = ["cache", "digits", "--out", str(out), "--resolution", "8", "--vae", "none", "--shard-size", "500"]
    assert run_cli(build, capsys)[0] == 0
    shards = load_manifest(out)["shards"]
    assert all(s["bytes"] == (out / s["file"]).stat().st_size and len(s["sha256"]) == 64 for s in shards)
    code, stdout, _ = run_cli(["cache", "verify", str(out)], capsys)
    assert code == 0 and "ok: 4 shards" in stdout and "sha256" in stdout
    intact = {name: (out / name).read_bytes() for name in ("shard-00000.safetensors", "shard-00002.safetensors")}

    cut = out / "shard-00001.safetensors"
    cut.write_bytes(cut.read_bytes()[:-100])
    flipped = out / "shard-00003.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 1  # same size, valid framing: only the hash shows it
    flipped.write_bytes(bytes(data))
    code, _, err = run_cli(["cache", "verify", str(out)], capsys)
    line = the_error(err)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "2 of 4 shards" in line and "shard-00001.safetensors: cut short" in line
    assert "shard-00003.safetensors: changed since it was written (sha256 differs)" in line
    with pytest.raises(WdmError, match=r"shard-00001.safetensors: cut short \(\d+ of \d+ bytes\); rerun the `wdmctl cache`"):
        LatentDataset(out)  # what training opens: the cut is found without hashing

    summary = build_cache("digits", out, 8, vae="none", shard_size=500)
    assert (summary.shards_reused, summary.encoded_images) == (2, 797)  # shards 1 and 3: 500 + 297 images
    assert {name: (out / name).read_bytes() for name in intact} == intact
    assert run_cli(["cache", "verify", str(out)], capsys)[0] == 0
    assert len(LatentDataset(out)) == 1797


def test_encoder_precision_takes_the_one_vocabulary(tmp_path):
    from wdmctl.data.cache import build_cache
    from wdmctl.errors import WdmError

    with pytest.raises(WdmError, match="--dtype must be one of fp32, bf16, fp16, not 'float32'"):
        build_cache("digits", tmp_path / "c", resolution=8, vae="none", dtype="float32")
    build_cache("digits", tmp_path / "c", resolution=8, vae="none", dtype="fp32")
    # the manifest keeps torch's name, as caches built before the one vocabulary did (so they still match)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["build"]["encode_dtype"] == "float32"
