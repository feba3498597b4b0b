"""The latent cache: images encoded once by `wdmctl cache`, read many times by the trainer.

Layout of a cache folder:

    manifest.json                 provenance and everything the reader needs (see `build_cache`)
    shard-00000.safetensors       images [0, shard_size) of the source, minus unreadable ones
    shard-00001.safetensors       ...

Each shard holds, for the N readable images of its range and F variants (F=2: the image and its
horizontal flip, F=1 with --no-flip):

    KL VAE     mean, std   float16 (N, F, C, h, w)   unscaled posterior moments
    TAEF2      latent      float16 (N, F, C, h, w)   unscaled deterministic latent
    none       pixels      uint8   (N, F, 3, H, W)   the preprocessed image
    all        label       int64   (N,)              class id, 0 when unconditional
               index       int64   (N,)              the image's position in the sorted source

and safetensors metadata (build hash, source range, skipped files, upscaled count), so a shard on disk
describes itself: a rerun keeps the shards of the same build and encodes only the missing ones. The
reader samples `mean + std * noise` and a random flip on every access (U-ViT's design), so posterior
noise and flip augmentation survive caching.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from bisect import bisect_right
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from wdmctl.core.integrity import file_problem
from wdmctl.core.io import write_json_atomic
from wdmctl.core.version import __version__
from wdmctl.data.cache_integrity import recorded, recorded_shards, require_intact_shards, shard_record, verify_shards
from wdmctl.models.autoencoders import DEFAULT_AUTOENCODER, load_autoencoder
from wdmctl.data.sources import center_crop_resize, open_source
from wdmctl.core.precision import torch_dtype
from wdmctl.errors import WdmError

MANIFEST = "manifest.json"
FORMAT = "wdmctl-latent-cache"
FORMAT_VERSION = 1
CROP_METHOD = "adm-center-crop (RGB; box-halve while >= 2x the resolution; bicubic short side; center crop)"
STORED_TENSORS = {"kl": ("mean", "std"), "taef2": ("latent",), "none": ("pixels",)}


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _is_cache_file(name: str) -> bool:
    """Files a cache build creates (and --overwrite may delete); nothing else in the folder is touched."""
    return (name == MANIFEST or (name.startswith("shard-") and name.endswith(".safetensors"))
            or (name.startswith((".shard-", f".{MANIFEST}.")) and name.endswith(".tmp")))


class CacheProgress(Protocol):
    """What `build_cache` reports to (the CLI's rich progress bar)."""

    def start(self, total: int, done: int) -> None:
        """`total` images for this process, `done` of them already in finished shards."""

    def advance(self, images: int) -> None:
        """`images` more images encoded (readable or skipped)."""


@dataclass
class CacheSummary:
    """The outcome of `build_cache` (totals over all shards; rates for this process)."""

    out: Path
    count: int
    skipped: list[dict[str, str]]
    upscaled: int
    shards: int
    shards_reused: int
    encoded_images: int
    seconds: float
    latent_shape: list[int]
    autoencoder: str
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    rank: int = 0
    processes: int = 1

    @property
    def images_per_s(self) -> float:
        return self.encoded_images / self.seconds if self.seconds > 0 else 0.0


# ---- writer -------------------------------------------------------------------------------------------

@dataclass
class _Process:
    """This process's place in an `accelerate launch` (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def is_main_process() -> bool:
    """True unless this is a non-zero rank of `accelerate launch` (which sets RANK): the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def _current_process(device: str) -> _Process:
    """Rank and world size from Accelerate. `accelerate launch` (torchrun underneath) sets WORLD_SIZE;
    importing accelerate only then keeps the plain path light."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1:
        from accelerate import PartialState

        # cpu=True makes Accelerate join CPU processes over gloo; otherwise it expects one GPU each
        state = PartialState(cpu=device == "cpu")
        if state.num_processes != launched:
            # every process would write every shard: refuse rather than race
            raise WdmError(f"launched as {launched} processes but Accelerate joined {state.num_processes}; "
                           f"use `accelerate launch --multi_gpu` with --device cuda")
        return _Process(state.process_index, state.num_processes, state.local_process_index)
    return _Process()


def _resolve_device(device: str, process: _Process) -> str:
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise WdmError("--device cuda: no CUDA device is visible; use --device cpu")
        return f"cuda:{process.local_rank % torch.cuda.device_count()}"
    raise WdmError(f"--device {device!r}: choose cpu or cuda")


def _load_image(source, index: int, resolution: int) -> tuple[np.ndarray | None, bool, str | None]:
    """Decode and preprocess one image: (uint8 HWC, was upscaled, None) or (None, False, why unreadable)."""
    try:
        image = source.open(index)
        upscaled = min(image.size) < resolution
        return center_crop_resize(image, resolution), upscaled, None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        text = str(err).strip().splitlines()
        return None, False, f"{type(err).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _decoded_shards(source, shard_ids: Sequence[int], shard_size: int, resolution: int,
                    workers: int) -> Iterator[tuple[int, list[tuple[int, np.ndarray | None, bool, str | None]]]]:
    """Yield (shard, [(index, pixels, upscaled, error)]) in order, decoding the next shard on a thread pool
    while the caller encodes the current one (PIL releases the GIL while decoding and resizing)."""
    def submit(shard: int) -> list[tuple[int, Future]]:
        start, end = shard * shard_size, min((shard + 1) * shard_size, len(source))
        return [(i, pool.submit(_load_image, source, i, resolution)) for i in range(start, end)]

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = submit(shard_ids[0]) if shard_ids else []
        for k, shard in enumerate(shard_ids):
            current = pending
            pending = submit(shard_ids[k + 1]) if k + 1 < len(shard_ids) else []
            yield shard, [(i, *future.result()) for i, future in current]


def _encode_variants(pixels: torch.Tensor, autoencoder, flip: bool, batch_size: int) -> dict[str, torch.Tensor]:
    """uint8 (N, 3, H, W) -> the stored tensors, each (N, F, ...) with F = 2 (image, flip) or 1."""
    variants = [pixels, pixels.flip(-1)] if flip else [pixels]
    if autoencoder.kind == "none":
        return {"pixels": torch.stack(variants, dim=1).contiguous()}
    names = STORED_TENSORS[autoencoder.kind]
    per_variant: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for variant in variants:
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for batch in variant.split(batch_size):
            # move uint8 (4x smaller than float) and convert on the device
            images = batch.to(autoencoder.device, non_blocking=True).float().div_(127.5).sub_(1)
            mean, std = autoencoder.encode_moments(images)
            chunks[names[0]].append(mean.half().cpu())
            if std is not None:
                chunks["std"].append(std.half().cpu())
        for name in names:
            per_variant[name].append(torch.cat(chunks[name]))
    return {name: torch.stack(parts, dim=1).contiguous() for name, parts in per_variant.items()}


def _empty_tensors(autoencoder, flip: bool, resolution: int) -> dict[str, torch.Tensor]:
    """Zero-length tensors of the right shape for a shard whose images were all unreadable."""
    variants = 2 if flip else 1
    if autoencoder.kind == "none":
        return {"pixels": torch.zeros(0, variants, 3, resolution, resolution, dtype=torch.uint8)}
    shape = (0, variants, *autoencoder.latent_shape(resolution))
    return {name: torch.zeros(shape, dtype=torch.float16) for name in STORED_TENSORS[autoencoder.kind]}


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary name, fsync, rename: a killed run never leaves a half shard under a shard name."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_shard_metadata(path: Path) -> dict[str, str] | None:
    """A shard's metadata, or None when the file is missing or unreadable (then it is rebuilt)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # truncated or foreign file: safetensors raises its own error types
        return None


def _build_identity(source, autoencoder, resolution: int, flip: bool, shard_size: int, dtype_name: str) -> dict:
    """Everything that makes two caches' shards interchangeable; any difference refuses to mix them."""
    return {
        "format_version": FORMAT_VERSION,
        "source_fingerprint": source.fingerprint(),
        "resolution": resolution,
        "crop": CROP_METHOD,
        "flip": flip,
        "shard_size": shard_size,
        "encode_dtype": dtype_name,
        "autoencoder": {"kind": autoencoder.kind, "config_hash": autoencoder.config_hash,
                        "weights_hash": autoencoder.weights_hash},
    }


def _build_hash(build: dict) -> str:
    return hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()[:16]


def _describe_difference(old: dict, new: dict) -> str:
    parts = []
    for key in new:
        if old.get(key) != new[key]:
            if isinstance(new[key], dict) or key == "crop":
                parts.append(key.replace("_", " "))
            else:
                parts.append(f"{key.replace('_', ' ')} ({old.get(key)} there, {new[key]} asked)")
    return ", ".join(parts) or "format"


def _prepare_out(out: Path, build: dict, overwrite: bool, process: _Process) -> None:
    """Refuse to mix with or clobber what is in `out`; with --overwrite remove an old cache's files
    (never other files). Every process checks (so all raise alike); only the main one changes files."""
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            existing = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            existing = None
        if not isinstance(existing, dict) or existing.get("format") != FORMAT:
            raise WdmError(f"--out {out} holds a manifest.json that is not a wdmctl cache's; choose another folder")
        if existing.get("build") != build or overwrite:
            if not overwrite:
                raise WdmError(f"--out {out} holds a cache built with a different "
                               f"{_describe_difference(existing.get('build') or {}, build)}; "
                               f"pass --overwrite to replace it or choose another --out")
            if process.is_main:
                for entry in out.iterdir():
                    if entry.is_file() and _is_cache_file(entry.name):
                        entry.unlink()
    elif out.exists():
        if not out.is_dir():
            raise WdmError(f"--out {out} is a file, not a folder")
        if any(not _is_cache_file(e.name) for e in out.iterdir()):
            raise WdmError(f"--out {out} is not empty and holds no wdmctl cache; choose a new or empty folder")
    if process.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for entry in out.iterdir():  # temporaries of a killed run
            if entry.name.endswith(".tmp") and _is_cache_file(entry.name):
                entry.unlink()


def _manifest(src: str, source, autoencoder, build: dict, resolution: int, flip: bool, shard_size: int,
              shards: list[dict] | None) -> dict[str, Any]:
    """manifest.json; `shards` None while the build is in progress (the reader refuses it then)."""
    entries = shards or []
    skipped = [s for entry in entries for s in entry["skipped"]]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": shards is not None,
        "tool": f"wdmctl {__version__}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"spec": src, "description": source.description, "fingerprint": source.fingerprint(),
                   "images": len(source)},
        "count": sum(entry["count"] for entry in entries),
        "resolution": resolution,
        "crop": CROP_METHOD,
        "flip": flip,
        "stored": {name: ("uint8" if name == "pixels" else "float16") for name in STORED_TENSORS[autoencoder.kind]},
        "layout": "(N, F, C, H, W); F index 0 = image, 1 = horizontal flip",
        "autoencoder": autoencoder.manifest_entry(),
        "latent_shape": autoencoder.latent_shape(resolution),
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "skipped": skipped,
        "upscaled": sum(entry["upscaled"] for entry in entries),
        "shard_size": shard_size,
        "shards": [{k: entry[k] for k in ("file", "count", "first_index", "end_index", "bytes", "sha256") if k in entry}
                   for entry in entries],
        "build": build,
        "build_hash": _build_hash(build),
    }


def _encode_shard(path: Path, first_index: int, items: list, source, autoencoder, flip: bool, batch_size: int,
                  resolution: int, build_hash: str) -> None:
    """Encode one shard's decoded images and write it, with the metadata that makes it self-describing."""
    readable = [(i, pixels, upscaled) for i, pixels, upscaled, error in items if error is None]
    skipped = [{"file": source.keys[i], "error": error} for i, _, _, error in items if error is not None]
    if readable:
        pixels = torch.from_numpy(np.stack([p for _, p, _ in readable])).permute(0, 3, 1, 2)
        tensors = _encode_variants(pixels, autoencoder, flip, batch_size)
    else:
        tensors = _empty_tensors(autoencoder, flip, resolution)
    indices = [i for i, _, _ in readable]
    labels = [source.labels[i] for i in indices] if source.labels is not None else [0] * len(indices)
    tensors["label"] = torch.tensor(labels, dtype=torch.int64)
    tensors["index"] = torch.tensor(indices, dtype=torch.int64)
    _write_shard(path, tensors, {
        "format": FORMAT, "build": build_hash, "first_index": str(first_index),
        "end_index": str(first_index + len(items)), "count": str(len(readable)),
        "upscaled": str(sum(up for _, _, up in readable)), "skipped": json.dumps(skipped),
    })


def _shard_records(out: Path, num_shards: int, build_hash: str) -> list[dict[str, Any]]:
    """Every shard's counts and skipped files, from the shard headers (no tensor data is read)."""
    records = []
    for shard in range(num_shards):
        path = out / shard_name(shard)
        metadata = read_shard_metadata(path)
        if metadata is None or metadata.get("build") != build_hash:
            raise WdmError(f"{path} is missing or from another build after encoding; rerun the same command")
        records.append({"file": path.name, "count": int(metadata["count"]),
                        "first_index": int(metadata["first_index"]), "end_index": int(metadata["end_index"]),
                        "upscaled": int(metadata["upscaled"]), "skipped": json.loads(metadata["skipped"])})
    return records


def build_cache(src: str, out: str | Path, resolution: int, vae: str = DEFAULT_AUTOENCODER,
                batch_size: int = 64, flip: bool = True, shard_size: int = 1000, overwrite: bool = False,
                device: str = "cpu", dtype: str = "fp32", workers: int | None = None,
                progress: CacheProgress | None = None) -> CacheSummary:
    """Encode every readable image of SRC (and its horizontal flip) into a sharded cache in `out`.

    Resumable: shards already written by the same build are kept. Under `accelerate launch` each process
    encodes every world-th shard and the main process writes manifest.json. Unreadable images are skipped
    and listed; the build fails only when none is readable. Returns totals for the whole cache.
    """
    if resolution < 1 or batch_size < 1 or shard_size < 1:
        raise WdmError("--resolution, --batch-size and --shard-size must be positive")
    encode_dtype = torch_dtype(dtype, "--dtype")
    out = Path(out)
    process = _current_process(device)
    source = open_source(src)
    if len(source) == 0:
        raise WdmError(f"{src}: no images found (looked for .png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, .ppm)")
    autoencoder = load_autoencoder(vae, _resolve_device(device, process), encode_dtype)
    autoencoder.latent_shape(resolution)  # one-line error when the resolution does not divide
    # the identity keeps torch's name ("float32"), which caches built before the one vocabulary recorded
    build = _build_identity(source, autoencoder, resolution, flip, shard_size, str(encode_dtype).removeprefix("torch."))
    build_hash = _build_hash(build)
    _prepare_out(out, build, overwrite, process)
    previous = recorded_shards(out / MANIFEST)  # size + sha256 of the shards a finished build of these settings wrote
    verified: dict[str, dict[str, Any]] = {}
    if process.is_main and not (out / MANIFEST).exists():
        write_json_atomic(out / MANIFEST, _manifest(src, source, autoencoder, build, resolution, flip,
                                                    shard_size, None))
    process.barrier()

    num_shards = math.ceil(len(source) / shard_size)
    mine = list(range(process.rank, num_shards, process.world))

    def shard_done(shard: int) -> bool:
        """Written by this build and intact: hashed against its record when it has one (a bad shard found by
        `wdmctl cache verify` is encoded again), else checked on its safetensors framing."""
        path = out / shard_name(shard)
        metadata = read_shard_metadata(path)
        if metadata is None or metadata.get("build") != build_hash:
            return False
        record = recorded(previous.get(path.name))
        if file_problem(path, record, full=True) is not None:
            return False
        if record is not None:
            verified[path.name] = {"bytes": record["bytes"], "sha256": record["sha256"]}
        return True

    def shard_images(shard: int) -> int:
        return min((shard + 1) * shard_size, len(source)) - shard * shard_size

    reused = [s for s in mine if shard_done(s)]
    todo = [s for s in mine if s not in reused]
    if progress is not None:
        progress.start(sum(shard_images(s) for s in mine), sum(shard_images(s) for s in reused))
    started = time.perf_counter()
    encoded = 0
    decode_threads = workers or min(8, os.cpu_count() or 1)
    for shard, items in _decoded_shards(source, todo, shard_size, resolution, decode_threads):
        _encode_shard(out / shard_name(shard), shard * shard_size, items, source, autoencoder, flip, batch_size,
                      resolution, build_hash)
        encoded += len(items)
        if progress is not None:
            progress.advance(len(items))
    seconds = time.perf_counter() - started
    process.barrier()

    # every process reads the (small) shard headers, so all agree on the totals and on failure
    records = _shard_records(out, num_shards, build_hash)
    count = sum(r["count"] for r in records)
    skipped = [s for r in records for s in r["skipped"]]
    if count == 0:
        process.barrier()
        if process.is_main:
            for shard in range(num_shards):
                (out / shard_name(shard)).unlink(missing_ok=True)
            (out / MANIFEST).unlink(missing_ok=True)
        first = skipped[0] if skipped else {"file": "?", "error": "?"}
        raise WdmError(f"none of the {len(source)} images in {src} could be read "
                       f"(first: {first['file']}: {first['error']})")
    if process.is_main:
        for record in records:  # shards verified above keep their hashes; the others are hashed now
            record.update(verified.get(record["file"]) or shard_record(out / record["file"]))
        write_json_atomic(out / MANIFEST, _manifest(src, source, autoencoder, build, resolution, flip,
                                                    shard_size, records))
    process.barrier()
    return CacheSummary(out=out, count=count, skipped=skipped, upscaled=sum(r["upscaled"] for r in records),
                        shards=num_shards, shards_reused=len(reused), encoded_images=encoded, seconds=seconds,
                        latent_shape=autoencoder.latent_shape(resolution), autoencoder=autoencoder.spec,
                        num_classes=source.num_classes, class_names=list(source.class_names),
                        rank=process.rank, processes=process.world)


# ---- reader -------------------------------------------------------------------------------------------

def load_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished cache; WdmError when missing, unreadable, foreign or unfinished."""
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise WdmError(f"{cache_dir} is not a latent cache (no {MANIFEST}); build one with `wdmctl cache`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WdmError(f"{path} is unreadable ({err}); rebuild the cache with `wdmctl cache --overwrite`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WdmError(f"{path} is not a wdmctl latent cache manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise WdmError(f"{path} has cache format {manifest.get('format_version')}; this wdmctl reads "
                       f"{FORMAT_VERSION}: rebuild it with `wdmctl cache --overwrite`")
    if not manifest.get("complete"):
        raise WdmError(f"the cache in {cache_dir} is unfinished (an interrupted `wdmctl cache`); rerun the same "
                       f"command to finish it")
    missing = [k for k in ("autoencoder", "latent_shape", "shards", "count", "num_classes") if k not in manifest]
    if missing:
        raise WdmError(f"{path} lacks {', '.join(missing)}; rebuild the cache with `wdmctl cache --overwrite`")
    return manifest


def verify_cache(cache_dir: str | Path, full: bool = True) -> dict[str, Any]:
    """Every shard of a finished cache against its manifest (`wdmctl cache verify DIR`, `train --verify`):
    one-line error naming the bad shards; see wdmctl.data.cache_integrity.verify_shards."""
    return verify_shards(cache_dir, load_manifest(cache_dir)["shards"], full)


class LatentDataset(torch.utils.data.Dataset):
    """Training samples from a cache: `(x, label)` with x float32 (C, H, W) already scaled for the denoiser.

    Every access draws fresh posterior noise (KL: mean + std * noise) and, with `flip`, picks the stored
    flipped entry half of the time, from torch's global RNG (DataLoader seeds each worker's). `flip` is
    off when the cache was built with --no-flip. Shards are memory-mapped on first use (safetensors), so a
    cache larger than RAM is fine; handles are per process and dropped when pickled to workers.
    """

    def __init__(self, cache_dir: str | Path, flip: bool = True):
        self.cache_dir = Path(cache_dir)
        self.manifest = load_manifest(cache_dir)
        entry = self.manifest["autoencoder"]
        self.kind = entry.get("kind", "none")
        if self.kind not in STORED_TENSORS:
            raise WdmError(f"{cache_dir}: unknown autoencoder kind {self.kind!r} in the manifest")
        self.scaling_factor = float(entry.get("scaling_factor", 1.0))
        self.shift_factor = float(entry.get("shift_factor", 0.0))
        self.latent_shape = list(self.manifest["latent_shape"])
        self.num_classes = int(self.manifest["num_classes"])
        self.class_names = list(self.manifest.get("class_names") or [])
        self.flip = bool(flip and self.manifest.get("flip"))
        shards = self.manifest["shards"]
        self._files = [self.cache_dir / s["file"] for s in shards]
        absent = [f.name for f in self._files if not f.exists()]
        if absent:
            raise WdmError(f"{cache_dir}: {len(absent)} shard(s) missing (first {absent[0]}); rerun `wdmctl cache`")
        require_intact_shards(self.cache_dir, shards)  # sizes and framing: a cut-short shard is named here
        # _starts[k] is the dataset index of shard k's first row (empty shards take no room)
        self._starts = np.cumsum([0] + [int(s["count"]) for s in shards]).tolist()
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}  # open safetensors files do not travel to worker processes
        return state

    def _shard(self, k: int):
        handle = self._handles.get(k)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[k] = safe_open(str(self._files[k]), framework="pt")
        return handle

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a cache of {n} images")
        k = bisect_right(self._starts, i) - 1
        row = i - self._starts[k]
        shard = self._shard(k)
        variant = int(torch.randint(2, ())) if self.flip else 0

        def read(name: str) -> torch.Tensor:
            return shard.get_slice(name)[row:row + 1, variant:variant + 1][0, 0]

        if self.kind == "none":
            x = read("pixels").float().div_(127.5).sub_(1)
        else:
            if self.kind == "kl":
                mean, std = read("mean").float(), read("std").float()
                z = mean + std * torch.randn(mean.shape)
            else:
                z = read("latent").float()
            x = (z - self.shift_factor) * self.scaling_factor
        label = shard.get_slice("label")[row:row + 1][0]
        return x, label
