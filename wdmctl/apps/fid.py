"""`wdmctl fid` on a training run: sample with the recipe's settings, score against the recipe's reference
(built and cached first when it is an image source), and keep the JSON in the run folder."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from wdmctl.apps.sample import generate_images
from wdmctl.core.io import write_json_atomic
from wdmctl.errors import WdmError
from wdmctl.fid.inception import default_device, load_inception
from wdmctl.fid.reference import ProgressFn, check_reference, load_reference, resolve_reference
from wdmctl.fid.score import DEFAULT_NUM, score_images
from wdmctl.fid.stripes import StripeMeter
from wdmctl.pipeline import require_intact_pipeline
from wdmctl.runs import checkpoint_pipeline, find_run


def _recipe_fid_section(run_dir: Path) -> dict[str, Any]:
    recipe_path = run_dir / "recipe.toml"
    if not recipe_path.is_file():
        raise WdmError(f"{run_dir} has no recipe.toml; is it a wdmctl run folder?")
    try:
        recipe = tomllib.loads(recipe_path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise WdmError(f"{recipe_path}: {err}") from None
    return dict(recipe.get("fid") or {})


def _result_path(run_dir: Path, pipeline_dir: Path, num: int) -> Path:
    """`<run>/fid/<checkpoint>-n<num>.json`; pipelines live in `checkpoints/step-NNNNNNN/pipeline/`."""
    checkpoint_name = pipeline_dir.parent.name if pipeline_dir.name == "pipeline" else pipeline_dir.name
    return run_dir / "fid" / f"{checkpoint_name}-n{num}.json"


def fid_for_run(run: str | None = None, checkpoint: str = "latest", num: int | None = None, steps: int | None = None,
                cfg: float | None = None, ref: str | None = None, allow_small: bool = False, *, seed: int = 0,
                batch_size: int = 64, device: str | None = None, precision: str = "fp32", pr: bool = False,
                inception: str | Path | None = None, overwrite: bool = False, clip_x0: bool | None = None,
                solver: str | None = None, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Sample `num` images (default: the recipe's `[fid] num`, else 50,000) from a run's checkpoint (the
    newest run and checkpoint by default) and score them; arguments left None come from the recipe's
    `[fid]` section (`num`, `ref`, `steps`, `cfg`, `solver`, `resolution`); `clip_x0` None clips pixel models. Writes and returns the score
    JSON, extended with the run, checkpoint and sampler settings."""
    run_dir = Path(find_run(run))
    section = _recipe_fid_section(run_dir)
    num = int(num or section.get("num", DEFAULT_NUM))
    steps = steps if steps is not None else section.get("steps")
    cfg = cfg if cfg is not None else section.get("cfg")
    solver = solver or section.get("solver")   # "auto" or None: the saved recipe's sampler, else the default
    ref_spec = ref or section.get("ref")
    if not ref_spec:
        raise WdmError(f"no reference statistics: pass --ref REF.npz|IMAGE_SOURCE or set [fid] ref in "
                       f"{run_dir / 'recipe.toml'}")
    pipeline_dir = Path(checkpoint_pipeline(run_dir, checkpoint))
    require_intact_pipeline(pipeline_dir, full=False)  # a damaged model is named before Inception loads
    out = _result_path(run_dir, pipeline_dir, num)
    if out.exists() and not overwrite:
        raise WdmError(f"{out} exists; pass --overwrite to score this checkpoint again")

    device = device or default_device()
    extractor = load_inception(inception, device)
    ref_path = resolve_reference(ref_spec, section.get("resolution"), extractor=extractor, device=device)
    # refuse mismatched statistics before spending the sampling time
    check_reference(load_reference(ref_path), extractor)

    used: dict[str, Any] = {}  # the sampler settings after the saved recipe's defaults, filled while sampling
    batches = generate_images(pipeline_dir=pipeline_dir, n=num, classes=None, steps=steps, cfg=cfg, solver=solver,
                              seed=seed, batch_size=batch_size, device=device, precision=precision,
                              clip_x0=clip_x0, resolved=used)
    stripes = StripeMeter()   # the scored images' stripe score (wdmctl/fid/stripes.py) goes in the JSON too
    result = score_images(stripes.tap(images for images, _labels in batches), ref_path, num_expected=num,
                          allow_small=allow_small, pr=pr, extractor=extractor, on_progress=on_progress)
    result["stripes"] = stripes.result()
    result.update(
        run=str(run_dir), checkpoint=checkpoint, pipeline=str(pipeline_dir),
        sampler={**used, "ema": True, "precision": precision,
                 "seeds": [seed, seed + num - 1], "classes": "sampler default (uniform for class-conditional)"},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    result["json"] = str(out)
    return result
