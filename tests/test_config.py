"""Recipe schema: strict loading, `--set` overrides, range checks, resolution against the cache manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from wdmctl import config
from wdmctl.errors import WdmError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def write(tmp_path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def manifest(shape=(4, 32, 32), num_classes=0) -> dict:
    return {"latent_shape": list(shape), "num_classes": num_classes, "autoencoder": {"spec": "none"}}


def test_shipped_recipes_exist_and_validate():
    assert {p.stem for p in RECIPES} >= {"celebahq", "imagenet256", "cifar10", "quickstart"}
    for path in RECIPES:
        recipe = config.load_recipe(path)
        assert recipe.data.cache, path
    celeba = config.load_recipe(RECIPES[[p.stem for p in RECIPES].index("celebahq")])
    # the paper's setting
    assert (celeba.model.preset, celeba.train.batch_size, celeba.train.max_steps) == ("WDM-XL/2", 128, 100_000)
    assert (celeba.optim.lr, celeba.ema.decay, celeba.model.num_classes) == (2e-4, 0.9999, 0)


def test_unknown_keys_name_the_key_and_suggest(tmp_path):
    with pytest.raises(WdmError, match=r"unknown key optim\.lrr \(did you mean optim\.lr\?\)"):
        config.load_recipe(write(tmp_path, "[data]\ncache='c'\n[optim]\nlrr = 1e-4\n"))
    with pytest.raises(WdmError, match=r"unknown key train\.lr \(did you mean optim\.lr\?\)"):
        config.load_recipe(write(tmp_path, "[data]\ncache='c'\n"), ["train.lr=1e-4"])
    with pytest.raises(WdmError, match=r"unknown key optim\.learning_rate \(did you mean optim\.lr\?\)"):
        config.load_recipe(write(tmp_path, "[data]\ncache='c'\n"), ["optim.learning_rate=1e-4"])
    with pytest.raises(WdmError, match=r"unknown section \[optimizer\].*did you mean optim"):
        config.load_recipe(write(tmp_path, "[data]\ncache='c'\n[optimizer]\nlr = 1\n"))
    with pytest.raises(WdmError, match=r"\[train\] must be a table"):
        config.load_recipe(write(tmp_path, "train = 3\n[data]\ncache='c'\n"))


def test_wrong_types_are_refused(tmp_path):
    path = write(tmp_path, "[data]\ncache='c'\n")
    with pytest.raises(WdmError, match=r"--set optim\.lr=fast: optim\.lr must be a number, got 'fast' \(a string\)"):
        config.load_recipe(path, ["optim.lr=fast"])
    with pytest.raises(WdmError, match=r"train\.batch_size must be an integer, got 1\.5"):
        config.load_recipe(path, ["train.batch_size=1.5"])
    with pytest.raises(WdmError, match=r"train\.compile must be true or false, got 1"):
        config.load_recipe(path, ["train.compile=1"])
    with pytest.raises(WdmError, match=r"optim\.betas must be a list of numbers"):
        config.load_recipe(write(tmp_path, "[data]\ncache='c'\n[optim]\nbetas = 0.9\n", "betas.toml"))
    with pytest.raises(WdmError, match=r"expected section\.key=value"):
        config.load_recipe(path, ["lr=1e-4"])
    with pytest.raises(WdmError, match=r"not valid TOML"):
        config.load_recipe(write(tmp_path, "[data\ncache='c'\n", "broken.toml"))


def test_overrides_are_toml_values_with_bare_strings_allowed(tmp_path):
    recipe = config.load_recipe(write(tmp_path, "[data]\ncache='c'\n"), [
        "optim.lr=3e-4", "optim.betas=[0.9, 0.999]", "train.compile=true", "model.preset=WDM-B/2",
        'sample.solver="ddim"', "optim.weight_decay=0",
    ])
    assert recipe.optim.lr == 3e-4 and recipe.optim.betas == [0.9, 0.999] and recipe.train.compile is True
    assert recipe.model.preset == "WDM-B/2" and recipe.sample.solver == "ddim"
    assert recipe.optim.weight_decay == 0.0 and isinstance(recipe.optim.weight_decay, float)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", r"train\.batch_size must be >= 1, got 0"),
    ("train.label_dropout=1.0", r"train\.label_dropout must be in \[0, 1\), got 1\.0"),
    ("ema.decay=1.0", r"ema\.decay must be in \[0, 1\)"),
    ("optim.lr=-1", r"optim\.lr must be > 0"),
    ("train.grad_accum=3", r"train\.batch_size \(128\) must be divisible by train\.grad_accum \(3\)"),
    ("train.precision=fp8", r"train\.precision must be one of auto, fp32, bf16, fp16"),
    ("sample.solver=dpm++2", r"sample\.solver must be auto or one of .*did you mean dpm\+\+2m"),
    ("fid.solver=unipcc", r"fid\.solver must be auto or one of .*did you mean unipc"),
    ("optim.schedule=linear", r"optim\.schedule must be one of constant, cosine, got 'linear'"),
    ("model.preset=WDM-X/2", r"unknown model preset 'WDM-X/2' \(did you mean"),
    ("model.scan=zigzag", r"model\.scan must be one of cycle, bidirectional"),
    ("diffusion.beta_end=0.0001", r"beta_start < beta_end"),
])
def test_ranges_are_checked(tmp_path, override, message):
    with pytest.raises(WdmError, match=message):
        config.load_recipe(write(tmp_path, "[data]\ncache='c'\n"), [override])


def test_missing_cache_key_and_missing_file(tmp_path):
    with pytest.raises(WdmError, match="data.cache is required"):
        config.load_recipe(write(tmp_path, "[optim]\nlr = 1e-4\n"))
    with pytest.raises(WdmError, match="not found"):
        config.load_recipe(tmp_path / "absent.toml")


def test_resolve_fills_the_model_from_the_manifest_and_preset():
    recipe = config.Recipe()
    recipe.data.cache = "c"
    recipe.model.preset, recipe.model.width = "WDM-S/2", 96
    resolved = config.resolve(recipe, manifest((3, 16, 16), num_classes=10))
    m = resolved.model
    assert (m.in_channels, m.sample_size, m.num_classes, m.width, m.patch_size, m.depth) == (3, 16, 10, 96, 2, 6)
    assert recipe.model.in_channels is None  # the input recipe is not modified
    assert config.model_kwargs(resolved)["width"] == 96
    # no manifest (dry run before the cache exists): the preset's shape
    assert config.resolve(recipe, None).model.in_channels == 4


def test_resolve_refuses_a_contradicting_cache():
    recipe = config.Recipe()
    recipe.data.cache = "c"
    recipe.model.in_channels = 4
    with pytest.raises(WdmError, match=r"model\.in_channels = 4 contradicts the data: the cache c holds 3x32x32"):
        config.resolve(recipe, manifest((3, 32, 32)))
    recipe.model.in_channels, recipe.model.num_classes = None, 1000
    with pytest.raises(WdmError, match=r"model\.num_classes = 1000 contradicts the data.*10 classes"):
        config.resolve(recipe, manifest((4, 32, 32), num_classes=10))
    with pytest.raises(WdmError, match=r"no labels \(unconditional\)"):
        config.resolve(recipe, manifest((4, 32, 32), num_classes=0))
    recipe.model.num_classes, recipe.model.patch_size = None, 3
    with pytest.raises(WdmError, match=r"patch_size 3 does not divide the sample size 32"):
        config.resolve(recipe, manifest((4, 32, 32)))
    with pytest.raises(WdmError, match="square"):
        config.resolve(config.Recipe(), manifest((4, 32, 16)))


def test_unconditional_training_and_guidance_rules():
    recipe = config.Recipe()
    recipe.data.cache = "c"
    recipe.model.num_classes = 0  # unconditional on a labelled cache is allowed
    assert config.resolve(recipe, manifest(num_classes=10)).model.num_classes == 0
    recipe.sample.cfg = 1.5
    with pytest.raises(WdmError, match=r"sample\.cfg = 1\.5 needs a class-conditional model"):
        config.resolve(recipe, manifest(num_classes=10))


def test_toml_round_trip_flatten_hash_and_differences(tmp_path):
    recipe = config.Recipe()
    recipe.data.cache = "c"
    resolved = config.resolve(recipe, manifest(num_classes=10))
    path = tmp_path / "recipe.toml"
    path.write_text(config.to_toml(resolved))
    again = config.read_recipe_file(path)
    assert again == resolved and config.recipe_hash(again) == config.recipe_hash(resolved)
    flat = config.flatten(resolved)
    assert flat["optim.betas"] == "[0.99, 0.99]" and flat["model.num_classes"] == 10
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    changed = config.Recipe()
    changed.data.cache, changed.optim.lr, changed.train.max_steps = "c", 1e-4, 5
    changed = config.resolve(changed, manifest(num_classes=10))
    assert [k for k, _, _ in config.differences(resolved, changed)] == ["optim.lr", "train.max_steps"]
    assert config.differences(resolved, changed, ignore=config.RESUMABLE_KEYS) == [("optim.lr", 2e-4, 1e-4)]


def test_model_keys_are_the_constructor_arguments():
    # every argument of WDMamba.__init__ but arch (the preset's) and scan_backend (a runtime choice) is a
    # recipe key, so a new architecture option needs no second list anywhere
    import inspect

    from wdmctl.models.wdmamba import WDMamba

    arguments = [p for p in inspect.signature(WDMamba.__init__).parameters if p not in config.NOT_RECIPE_KEYS]
    assert list(config.MODEL_KEYS) == arguments
    assert {f.name for f in dataclasses.fields(config.ModelSection)} == {"preset", "scan_backend", *arguments}


def test_a_new_constructor_argument_becomes_a_typed_recipe_key(monkeypatch):
    from wdmctl.models.wdmamba import WDMamba

    def init(self, arch: str = "wdmamba", width: int = 8, gate_bias: float = 0.5, levels: tuple[int, ...] = (1, 2),
             scan_backend: str = "auto"):
        pass

    section = config.model_section_class(init)
    monkeypatch.setitem(config.SECTIONS, "model", section)
    recipe = config.Recipe(model=section())
    config.apply_overrides(recipe, ["model.gate_bias=2", "model.levels=[3, 4]"])
    assert recipe.model.gate_bias == 2.0 and recipe.model.levels == (3, 4)
    with pytest.raises(WdmError, match="model.gate_bias must be a number, got 'high'"):
        config.apply_overrides(recipe, ["model.gate_bias=high"])
    with pytest.raises(WdmError, match="unknown key model.arch"):
        config.apply_overrides(recipe, ["model.arch=uvit"])
    assert WDMamba  # the real class is untouched
