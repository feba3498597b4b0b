"""Sampler settings and where their defaults come from: arguments, then the recipe saved with the model,
then the toolkit's defaults below (one place for each). Also which class each image gets."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from wdmctl.diffusion.schedule import default_clip_x0, default_solver
from wdmctl.errors import WdmError

DEFAULT_STEPS = 50
DEFAULT_CFG = 1.0  # guidance w in uncond + w (cond - uncond): 1 is off and costs no extra pass


def resolve_classes(classes: Sequence[str] | None, num_classes: int, class_names: Sequence[str]) -> list[int] | str | None:
    """`--class` values -> ids. Accepts ids, class names, comma lists, or `random`. None for unconditional."""
    if not classes:
        return "random" if num_classes > 0 else None
    if num_classes == 0:
        raise WdmError("--class was given but the model is unconditional (num_classes = 0)")
    items = [c.strip() for value in classes for c in str(value).split(",") if c.strip()]
    if items == ["random"]:
        return "random"
    ids = []
    for item in items:
        if item.lstrip("-").isdigit():
            cid = int(item)
        elif item in class_names:
            cid = list(class_names).index(item)
        else:
            hint = f"; names: {', '.join(class_names[:10])}{'...' if len(class_names) > 10 else ''}" if class_names else ""
            raise WdmError(f"unknown class {item!r}: give an id in 0..{num_classes - 1}, a class name or 'random'{hint}")
        if not 0 <= cid < num_classes:
            raise WdmError(f"class id {cid} is out of range 0..{num_classes - 1}")
        ids.append(cid)
    return ids


def labels_for(seeds: Sequence[int], classes: list[int] | str | None, num_classes: int) -> list[int] | None:
    """One label per image: cycle through the given ids, or draw from the image's own seed for `random`."""
    if classes is None:
        return None
    if classes == "random":
        return [int(np.random.default_rng([s, 1]).integers(num_classes)) for s in seeds]
    return [classes[i % len(classes)] for i in range(len(seeds))]


def pick_solver(solver: str | None, guided: bool) -> str:
    """The one place "auto" (or nothing) becomes a solver: DPM-Solver++ 2M guided, 3M unguided."""
    return default_solver(guided) if solver in (None, "auto") else solver


def sampling_defaults(meta: dict[str, Any]) -> dict[str, Any]:
    """The recipe's sampling settings saved with the model, with the toolkit's defaults beneath them
    (solver None: `pick_solver` decides once guidance is known)."""
    saved = dict(meta.get("sample") or {})
    return {"steps": int(saved.get("steps", DEFAULT_STEPS)), "cfg": float(saved.get("cfg", DEFAULT_CFG)),
            "solver": saved.get("solver")}


def resolve_settings(pipe, steps: int | None, cfg: float | None, solver: str | None,
                     clip_x0: bool | None) -> dict[str, Any]:
    """The sampler settings a request gets from a loaded pipeline: arguments left None take the saved recipe's
    values, then the toolkit's defaults (DPM-Solver++ 2M guided, 3M unguided; x0 clipped for pixel models).
    Unconditional models always get cfg 1."""
    conditional = pipe.num_classes > 0
    defaults = sampling_defaults(pipe.meta)
    cfg = (defaults["cfg"] if cfg is None else cfg) if conditional else 1.0
    solver = pick_solver(solver if solver not in (None, "auto") else defaults["solver"], conditional and cfg != 1.0)
    clip_x0 = default_clip_x0(pipe.autoencoder, solver) if clip_x0 is None else clip_x0
    return {"steps": steps or defaults["steps"], "cfg": cfg, "solver": solver, "clip_x0": clip_x0}
