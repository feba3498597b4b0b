"""Training recipes: a typed schema, TOML loading, `--set` overrides, validation, and resolution against
the latent cache.

A recipe is a TOML file with the sections below (every key is optional except `data.cache`; the
defaults are the paper's setting). Loading is strict, like nanoGPT's configurator: an unknown section or
key, or a value of the wrong type, is a one-line `WdmError` that names the key and suggests the closest
known one. `resolve` then fills the model's shape from the cache manifest (channels, size, classes), so a
recipe never has to repeat what the cache already knows, and refuses a cache that contradicts the
recipe. The resolved recipe is what the run directory stores (`to_toml`), what trackers get (`flatten`)
and what checkpoints are hashed against (`recipe_hash`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wdmctl.core.precision import PRECISIONS
from wdmctl.diffusion.schedule import BETA_SCHEDULES, SOLVERS
from wdmctl.diffusion.settings import DEFAULT_CFG, DEFAULT_STEPS
from wdmctl.errors import WdmError
from wdmctl.models.presets import preset_config
from wdmctl.models.wdmamba import CHOICES, WDMamba

TRAIN_PRECISIONS = ("auto", *PRECISIONS)
LR_SCHEDULES = ("constant", "cosine")
# values older recipes wrote, and what they mean now
VALUE_ALIASES = {"train.precision": {"no": "fp32"}}


# ----------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------

# The model's recipe keys are the constructor's arguments: a new argument of `WDMamba.__init__` is a recipe
# key (and a resolved, hashed part of every run) without being listed anywhere else.
NOT_RECIPE_KEYS = ("self", "arch", "scan_backend")   # arch comes with the preset; scan_backend is below


def _recipe_type(hint: Any) -> Any:
    """`hint | None`: every model key may be left unset (the cache manifest or the preset fills it)."""
    return hint if type(None) in typing.get_args(hint) else hint | None


def model_section_class(constructor: Callable[..., Any]) -> type:
    """The [model] section's dataclass for a model constructor: `preset`, one optional field per constructor
    argument (typed as annotated, default None), and `scan_backend`."""
    hints = typing.get_type_hints(constructor)
    fields = [(name, _recipe_type(hints.get(name, type(param.default))), field(default=None))
              for name, param in inspect.signature(constructor).parameters.items() if name not in NOT_RECIPE_KEYS]
    section = dataclasses.make_dataclass("ModelSection", [
        ("preset", str, field(default="WDM-XL/2")),
        *fields,
        ("scan_backend", str, field(default="auto")),   # runtime choice only: checkpoints run on every backend
    ])
    section.__doc__ = ("A preset plus overrides of its constructor arguments. Unset fields come from the cache "
                       "manifest (in_channels, sample_size, num_classes; num_classes = 0 trains an unconditional "
                       "model even on a labelled cache), then the preset, then the constructor's defaults; "
                       "`resolve` fills every field, so a resolved recipe pins the architecture.")
    return section


ModelSection = model_section_class(WDMamba.__init__)
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelSection) if f.name not in ("preset", "scan_backend"))


@dataclass
class DataSection:
    cache: str = ""                     # folder written by `wdmctl cache` (relative to the working directory)
    flip: bool = True                   # random horizontal flips (needs a cache built with flips)
    num_workers: int = 4                # DataLoader worker processes (0 reads in the training process)


@dataclass
class DiffusionSection:
    """The DDPM training schedule; saved with every checkpoint so sampling uses the same betas."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"


@dataclass
class OptimSection:
    lr: float = 2e-4
    weight_decay: float = 0.03
    betas: list[float] = field(default_factory=lambda: [0.99, 0.99])
    eps: float = 1e-8
    warmup_steps: int = 5000            # linear warm-up from 0, then constant (U-ViT / DiM)
    schedule: str = "constant"          # after warm-up: constant, or cosine decay to 0 at train.max_steps
    max_grad_norm: float = 1.0          # 0 disables clipping (the norm is still logged)


@dataclass
class TrainSection:
    batch_size: int = 128               # images per optimizer step, over all processes and accumulation
    grad_accum: int = 1                 # micro-batches per optimizer step
    max_steps: int = 100_000
    seed: int = 0
    precision: str = "auto"             # auto = bf16 on a CUDA device that supports it, fp32 otherwise ("no": fp32)
    label_dropout: float = 0.1          # share of labels replaced by the null class (CFG); conditional only
    compile: bool = False               # torch.compile the denoiser
    gradient_checkpointing: bool = False
    cuda_graph: bool = False            # replay each optimizer step as one CUDA graph (one CUDA GPU, no accumulation)
    tf32: bool = True                   # TF32 matmuls for the fp32 parts on Ampere and newer
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    max_nonfinite: int = 10             # stop after this many non-finite steps in a row


@dataclass
class EmaSection:
    decay: float = 0.9999
    warmup: bool = False                # decay min(decay, (1 + n) / (10 + n)) after n updates: short runs


@dataclass
class SampleSection:
    """The EMA sample grid written during training, and the defaults `wdmctl sample` reads from a checkpoint."""

    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG            # guidance w: uncond + w * (cond - uncond); 1 = off
    solver: str = "auto"                # auto = dpm++2m with guidance, dpm++3m without
    every: int = 5000                   # grid interval in steps (0 = only at the end)
    grid_n: int = 64
    seed: int = 0


@dataclass
class FidSection:
    """Defaults that `wdmctl fid` reads from a checkpoint, and the FID measured during training."""

    num: int = 50_000
    ref: str = ""                       # reference: a stats .npz, an image folder/archive, or `digits`
    resolution: int = 0                 # 0 = the cache's image resolution
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    solver: str = "auto"                # auto = dpm++2m with guidance, dpm++3m without
    every: int = 0                      # FID of the EMA weights every N training steps (0 = never)
    every_num: int = 5000               # images per FID during training (FID-K, biased high for small K)
    every_batch_size: int = 500         # sampling batch of those FIDs
    inception: str = ""                 # Inception weights for them ("" = the usual search: docs/fid.md)


@dataclass
class LogSection:
    every: int = 100                    # steps between log lines / stats.jsonl records
    tensorboard: bool = True            # through Accelerate's tracker, when tensorboard is installed


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    ema: EmaSection = field(default_factory=EmaSection)
    sample: SampleSection = field(default_factory=SampleSection)
    fid: FidSection = field(default_factory=FidSection)
    log: LogSection = field(default_factory=LogSection)


SECTIONS: dict[str, type] = typing.get_type_hints(Recipe)  # section name -> dataclass, in schema order

# Keys a run may change when it is resumed (bookkeeping, not the optimisation itself). Rerunning a command
# whose recipe differs elsewhere starts a new run instead of silently continuing a different experiment.
RESUMABLE_KEYS = (
    "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite",
    "train.compile", "train.gradient_checkpointing", "train.cuda_graph", "data.num_workers", "model.scan_backend",
    "log.", "sample.", "fid.",
)


def all_keys() -> list[str]:
    """Every `section.key` of the schema."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# ----------------------------------------------------------------------------------------------------
# Loading, type checks, overrides
# ----------------------------------------------------------------------------------------------------

# names other trainers use for our keys: a suggestion difflib alone would not find
ALIASES = {
    "learning_rate": "optim.lr", "lr_warmup_steps": "optim.warmup_steps", "warmup": "optim.warmup_steps",
    "grad_clip": "optim.max_grad_norm", "clip_grad_norm": "optim.max_grad_norm", "adam_betas": "optim.betas",
    "mixed_precision": "train.precision", "gradient_accumulation_steps": "train.grad_accum",
    "num_steps": "train.max_steps", "total_steps": "train.max_steps", "ema_decay": "ema.decay",
    "cfg_scale": "sample.cfg", "guidance_scale": "sample.cfg", "model": "model.preset",
}


def _suggest(name: str, candidates: list[str]) -> str:
    alias = ALIASES.get(name.rsplit(".", 1)[-1])
    if alias:
        return f" (did you mean {alias}?)"
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (list, tuple):
        return f"a list of {_PLURAL.get(typing.get_args(hint)[0], 'values')}"
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _value_desc(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as type `hint`, or raise TypeError. Integers are accepted for floats; bools are never numbers."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        (item,) = typing.get_args(hint)
        return [_coerce(v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list):
            raise TypeError
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise TypeError
        return tuple(_coerce(v, k) for v, k in zip(value, kinds))
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise TypeError
    raise TypeError


def _set_key(recipe: Recipe, section: str, key: str, value: Any, where: str) -> None:
    """Type-check `value` and assign recipe.section.key; errors name the key and suggest the closest."""
    if section not in SECTIONS:
        hint = _suggest(f"{section}.{key}", all_keys()) if key else _suggest(section, list(SECTIONS))
        raise WdmError(f"{where}: unknown section [{section}]{hint}; sections: {', '.join(SECTIONS)}")
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    if key not in hints:
        dotted = f"{section}.{key}"
        # a key that exists in another section is the most likely mistake: suggest that first
        elsewhere = [k for k in all_keys() if k.split(".", 1)[1] == key]
        hint = f" (did you mean {elsewhere[0]}?)" if elsewhere else _suggest(dotted, all_keys())
        raise WdmError(f"{where}: unknown key {dotted}{hint}")
    try:
        coerced = _coerce(value, hints[key])
    except TypeError:
        raise WdmError(f"{where}: {section}.{key} must be {_type_name(hints[key])}, got {_value_desc(value)}") from None
    if f"{section}.{key}" in VALUE_ALIASES:
        coerced = VALUE_ALIASES[f"{section}.{key}"].get(coerced, coerced)
    setattr(getattr(recipe, section), key, coerced)


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    """Build a Recipe from parsed TOML, strictly (see the module docstring)."""
    recipe = Recipe()
    for section, table in data.items():
        if section not in SECTIONS:
            _set_key(recipe, section, "", None, where)  # raises: unknown section, with a suggestion
        if not isinstance(table, dict):
            raise WdmError(f"{where}: [{section}] must be a table of keys, got {_value_desc(table)}")
        for key, value in table.items():
            _set_key(recipe, section, key, value, where)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe, apply `--set section.key=value` overrides, validate the ranges."""
    path = Path(path)
    if not path.is_file():
        raise WdmError(f"recipe {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise WdmError(f"{path} is not valid TOML: {err}") from None
    recipe = recipe_from_dict(data, where=str(path))
    apply_overrides(recipe, overrides or [])
    validate(recipe)
    return recipe


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value). The value is read as a TOML value (`2e-4`, `true`,
    `[0.9, 0.99]`, `"WDM-B/2"`); what is not valid TOML is taken as a bare string, so `model.preset=WDM-B/2`
    needs no shell quoting (the type check still catches `optim.lr=fast`)."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or "." not in name:
        raise WdmError(f"--set {text!r}: expected section.key=value, e.g. --set optim.lr=1e-4")
    section, key = name.split(".", 1)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    for text in overrides:
        section, key, value = parse_override(text)
        _set_key(recipe, section, key, value, where=f"--set {text}")
    return recipe


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------

def _check(ok: bool, message: str) -> None:
    if not ok:
        raise WdmError(message)


def validate(recipe: Recipe) -> None:
    """Range and choice checks that do not need the cache. Messages name the key and the allowed range."""
    m, d, df, o, t, e, s, f, lg = (recipe.model, recipe.data, recipe.diffusion, recipe.optim, recipe.train,
                                    recipe.ema, recipe.sample, recipe.fid, recipe.log)
    preset_config(m.preset)  # unknown preset: one-line error with a suggestion
    for key in ("width", "depth", "patch_size", "sample_size", "in_channels", "d_state", "d_conv", "expand",
                "num_heads"):
        value = getattr(m, key)
        _check(value is None or value >= 1, f"model.{key} must be >= 1, got {value}")
    _check(m.num_classes is None or m.num_classes >= 0, f"model.num_classes must be >= 0, got {m.num_classes}")
    _check(m.mlp_ratio is None or m.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    for key, allowed in CHOICES.items():
        value = getattr(m, key, None)
        _check(value is None or value in allowed, f"model.{key} must be one of {', '.join(allowed)}, got {value!r}")
    _check(m.pad_tokens is None or m.pad_tokens >= 0, f"model.pad_tokens must be >= 0, got {m.pad_tokens}")
    _check(bool(m.scan_backend), "model.scan_backend must not be empty (use \"auto\")")
    _check(bool(d.cache), "data.cache is required: the folder written by `wdmctl cache` (see the recipe's comments)")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _check(df.num_train_timesteps >= 2, f"diffusion.num_train_timesteps must be >= 2, got {df.num_train_timesteps}")
    _check(df.beta_schedule in BETA_SCHEDULES,
           f"diffusion.beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {df.beta_schedule!r}")
    _check(0 < df.beta_start < df.beta_end < 1,
           f"diffusion betas need 0 < beta_start < beta_end < 1, got {df.beta_start} and {df.beta_end}")
    _check(o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    _check(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(o.schedule in LR_SCHEDULES, f"optim.schedule must be one of {', '.join(LR_SCHEDULES)}, got {o.schedule!r}")
    _check(o.max_grad_norm >= 0, f"optim.max_grad_norm must be >= 0 (0 = no clipping), got {o.max_grad_norm}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _check(t.batch_size % t.grad_accum == 0,
           f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    _check(t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
    _check(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    _check(t.precision in TRAIN_PRECISIONS,
           f"train.precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {t.precision!r}")
    _check(0 <= t.label_dropout < 1, f"train.label_dropout must be in [0, 1), got {t.label_dropout}")
    _check(t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}")
    _check(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    _check(t.max_nonfinite >= 1, f"train.max_nonfinite must be >= 1, got {t.max_nonfinite}")
    if t.cuda_graph:  # what one captured step cannot hold (docs/train.md, Speed)
        for bad, why in ((t.grad_accum > 1, "train.grad_accum > 1"), (t.precision == "fp16", "train.precision = fp16 "
                         "(its loss scaler decides on the host)"), (t.compile, "train.compile (use one or the other)"),
                         (t.gradient_checkpointing, "train.gradient_checkpointing (its recomputation reseeds the RNG)")):
            _check(not bad, f"train.cuda_graph does not work with {why}")
    _check(0 <= e.decay < 1, f"ema.decay must be in [0, 1), got {e.decay}")
    for section, sec in (("sample", s), ("fid", f)):
        _check(sec.steps >= 1, f"{section}.steps must be >= 1, got {sec.steps}")
        _check(sec.cfg >= 0, f"{section}.cfg must be >= 0 (1 = no guidance), got {sec.cfg}")
        _check(sec.solver == "auto" or sec.solver in SOLVERS, f"{section}.solver must be auto or one of "
               f"{', '.join(SOLVERS)}, got {sec.solver!r}{_suggest(sec.solver, list(SOLVERS))}")
    _check(s.every >= 0, f"sample.every must be >= 0 (0 = only at the end), got {s.every}")
    _check(1 <= s.grid_n <= 1024, f"sample.grid_n must be in [1, 1024], got {s.grid_n}")
    _check(s.seed >= 0, f"sample.seed must be >= 0, got {s.seed}")
    _check(f.num >= 1, f"fid.num must be >= 1, got {f.num}")
    _check(f.resolution >= 0, f"fid.resolution must be >= 0 (0 = the cache's), got {f.resolution}")
    _check(f.every >= 0, f"fid.every must be >= 0 (0 = no FID during training), got {f.every}")
    _check(f.every_num >= 2, f"fid.every_num must be >= 2, got {f.every_num}")
    _check(f.every_batch_size >= 1, f"fid.every_batch_size must be >= 1, got {f.every_batch_size}")
    _check(not f.every or bool(f.ref), "fid.every needs fid.ref: reference statistics (.npz) or an image source")
    _check(lg.every >= 1, f"log.every must be >= 1, got {lg.every}")


# ----------------------------------------------------------------------------------------------------
# Resolution against the cache manifest
# ----------------------------------------------------------------------------------------------------

def _constructor_defaults() -> dict[str, Any]:
    params = inspect.signature(WDMamba.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def with_model_defaults(recipe: Recipe) -> Recipe:
    """A run's resolved recipe with the model keys it lacks set to the model's defaults. A resolved recipe
    sets every model key that existed when it was written; a key added since (e.g. `skip_init`) is absent
    there, and that run's model is the one the key's default describes (a new key's default keeps the
    behaviour from before it), so comparing with today's resolved recipe must not count it as a change."""
    defaults = _constructor_defaults()
    model = dataclasses.replace(recipe.model, **{k: defaults[k] for k in MODEL_KEYS
                                                 if getattr(recipe.model, k) is None and k in defaults})
    return dataclasses.replace(recipe, model=model)


def resolve(recipe: Recipe, manifest: dict[str, Any] | None) -> Recipe:
    """A copy of `recipe` with every model field filled: explicit settings, then the cache manifest
    (channels, size, classes), then the preset, then the model's defaults. Refuses a manifest that
    contradicts explicit settings. `manifest` None (no cache yet, e.g. a dry run) fills from the preset."""
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model))
    m = recipe.model
    explicit = {k: getattr(m, k) for k in MODEL_KEYS if getattr(m, k) is not None}
    from_data: dict[str, Any] = {}
    if manifest is not None:
        channels, height, width = (int(v) for v in manifest["latent_shape"])
        what = f"the cache {recipe.data.cache} holds {channels}x{height}x{width} samples"
        if height != width:
            raise WdmError(f"{what}; the denoiser needs square inputs")
        from_data = {"in_channels": channels, "sample_size": height}
        for key, value in from_data.items():
            if key in explicit and explicit[key] != value:
                raise WdmError(f"model.{key} = {explicit[key]} contradicts the data: {what}; remove model.{key} "
                               f"from the recipe or build a matching cache")
        cache_classes = int(manifest.get("num_classes") or 0)
        wanted = explicit.get("num_classes")
        if wanted is None:
            from_data["num_classes"] = cache_classes
        elif wanted > 0 and wanted != cache_classes:
            kind = f"{cache_classes} classes" if cache_classes else "no labels (unconditional)"
            raise WdmError(f"model.num_classes = {wanted} contradicts the data: the cache {recipe.data.cache} has "
                           f"{kind}; remove model.num_classes (or set 0 to train unconditionally)")
    full = {**_constructor_defaults(), **preset_config(m.preset), **from_data, **explicit}
    for key in MODEL_KEYS:
        setattr(m, key, full[key])
    if m.sample_size % m.patch_size:
        raise WdmError(f"model.patch_size {m.patch_size} does not divide the sample size {m.sample_size}")
    if m.num_classes == 0:
        for section in ("sample", "fid"):
            cfg = getattr(recipe, section).cfg
            if cfg != 1.0:
                raise WdmError(f"{section}.cfg = {cfg} needs a class-conditional model, but this one is "
                               f"unconditional; set {section}.cfg = 1")
    return recipe


def model_kwargs(recipe: Recipe) -> dict[str, Any]:
    """Constructor arguments of the (resolved) recipe's model, for `build_model(preset, **kwargs)`.
    The scan backend is a runtime choice and stays "auto" in the saved config."""
    return {k: getattr(recipe.model, k) for k in MODEL_KEYS if getattr(recipe.model, k) is not None}


# ----------------------------------------------------------------------------------------------------
# Views: TOML, flat dict, hash, differences
# ----------------------------------------------------------------------------------------------------

def to_dict(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """Nested plain dict, unset (None) keys left out (TOML has no null)."""
    return {section: {k: v for k, v in dataclasses.asdict(getattr(recipe, section)).items() if v is not None}
            for section in SECTIONS}


def to_toml(recipe: Recipe) -> str:
    import tomli_w  # here: only writing a run's recipe.toml needs it

    return tomli_w.dumps(to_dict(recipe))


def flatten(recipe: Recipe) -> dict[str, int | float | str | bool]:
    """`section.key` -> scalar, lists as strings: what TensorBoard's hparams accept."""
    flat: dict[str, int | float | str | bool] = {}
    for section, table in to_dict(recipe).items():
        for key, value in table.items():
            flat[f"{section}.{key}"] = str(value) if isinstance(value, list) else value
    return flat


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(to_toml(recipe).encode()).hexdigest()[:12]


def differences(old: Recipe, new: Recipe, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every key whose value differs, except keys starting with an `ignore` prefix."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in ignore)]


def read_recipe_file(path: str | Path) -> Recipe:
    """A resolved recipe written by `to_toml` (a run's recipe.toml), checked like any other."""
    path = Path(path)
    try:
        return recipe_from_dict(tomllib.loads(path.read_text()), where=str(path))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise WdmError(f"{path} is unreadable: {err}") from None
