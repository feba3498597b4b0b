"""The WD-Mamba model: presets, wiring (long skips, token orders), gradients, save/load, CLI info."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from wdmctl.cli import app
from wdmctl.models import PRESETS, build_model
from wdmctl.models.wdmamba import CYCLE, MambaBlock, WDMamba
from wdmctl.scan import transpose_patch_grid

# Parameter counts pinned so an accidental architecture change shows up here (and in README's table).
EXPECTED_PARAMS = {
    "WDM-S/2": 30_025_892, "WDM-B/2": 116_822_180, "WDM-L/2": 206_225_572, "WDM-XL/2": 460_726_436,
    "UMamba-S/2": 29_064_356, "DiM-S/2": 29_366_948, "UMamba-B/2": 60_778_148, "UMamba-XL/2": 238_636_196,
    "UViT-S/2": 29_427_620, "UViT-B/2": 116_362_916, "UViT-L/2": 206_268_580, "UViT-XL/2": 462_757_028,
}


def tiny(preset="WDM-S/2", **kw):
    args = dict(width=32, depth=2, sample_size=8, in_channels=3, num_classes=10)
    args.update(kw)
    return build_model(preset, **args)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_and_shapes(name):
    with torch.device("meta"):
        model = build_model(name)
        out = model(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 4, 8, 8)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


def test_paper_model_has_463M_parameters_within_2_percent():
    assert abs(EXPECTED_PARAMS["WDM-XL/2"] / 463e6 - 1) < 0.02


def test_table1_arms_match_wdm_s2_within_5_percent():
    for name in ("UMamba-S/2", "DiM-S/2", "UViT-S/2"):
        assert abs(EXPECTED_PARAMS[name] / EXPECTED_PARAMS["WDM-S/2"] - 1) < 0.05, name


def test_plain_stack_has_no_long_skips_and_trains_every_parameter():
    model = tiny(preset="DiM-S/2", depth=5, scan_backend="torch")
    blocks = [m for m in model.modules() if isinstance(m, MambaBlock)]
    assert len(blocks) == 5 and all(b.skip_linear is None for b in blocks)
    assert [b.order for b in blocks] == [CYCLE[i % 4] for i in range(5)]
    model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # the same-size U-ViT really is the same size (within 2%)
    assert abs(EXPECTED_PARAMS["UViT-B/2"] / EXPECTED_PARAMS["WDM-B/2"] - 1) < 0.02


def test_only_the_wnet_presets_start_their_skip_fusions_as_the_mean():
    # issue 15's skip-init ablation chose "average" for WD-Mamba; U-Mamba keeps the xavier its Table 1 rows were
    # measured with, and U-ViT its paper's
    for name in PRESETS:
        expected = "average" if name.startswith("WDM-") else "xavier"
        assert build_model(name, width=8, depth=1, num_heads=2).config.skip_init == expected, name
    fusions = [b.skip_linear for b in tiny().modules() if isinstance(b, MambaBlock) and b.skip_linear is not None]
    assert len(fusions) == 2 * 2 and all(torch.equal(f.weight, torch.eye(32).repeat(1, 2) / 2) for f in fusions)


@pytest.mark.parametrize("name", ["WDM-S/2", "UMamba-B/2", "UViT-S/2"])
def test_presets_run_forward_on_cpu(name):
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([0, 999]), torch.tensor([5, 1000]))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_w_net_layout_matches_the_paper():
    model = build_model("WDM-S/2")
    assert len(model.w_net) == 2
    for stage in model.w_net:
        assert len(stage.encoder) == 6 and len(stage.decoder) == 6
        assert all(b.skip_linear is None for b in stage.encoder) and stage.bottleneck.skip_linear is None
        assert all(b.skip_linear.in_features == 2 * 384 for b in stage.decoder)
    blocks = [b for m in model.modules() if isinstance(m, MambaBlock) for b in [m]]
    assert len(blocks) == 26
    assert [b.order for b in blocks[:5]] == list(CYCLE) + [CYCLE[0]]  # directions cycle block by block
    assert len(build_model("UMamba-B/2").w_net) == 1


@pytest.mark.parametrize("scan", ["cycle", "bidirectional"])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_every_parameter_gets_a_gradient(scan, num_classes):
    model = tiny(scan=scan, num_classes=num_classes)
    x = torch.randn(3, 3, 8, 8)
    y = torch.tensor([1, 2, 10]) if num_classes else None
    loss = (model(x, torch.tensor([3, 500, 999]), y) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, f"parameters without gradient: {dead}"


def test_long_skips_connect_mirror_blocks():
    model = tiny(depth=3)
    seen = {}
    for s, stage in enumerate(model.w_net):
        for i, block in enumerate(stage.encoder):
            block.register_forward_hook(lambda m, a, out, key=(s, i): seen.__setitem__(("enc",) + key, out))
        for i, block in enumerate(stage.decoder):
            block.register_forward_pre_hook(lambda m, args, key=(s, i): seen.__setitem__(("dec",) + key, args[2]))
    model(torch.randn(1, 3, 8, 8), torch.tensor([10]), torch.tensor([1]))
    for s in range(2):
        for i in range(3):  # decoder block i gets encoder block (depth - 1 - i) of the same U
            assert torch.equal(seen[("dec", s, i)], seen[("enc", s, 2 - i)])


def test_column_major_order_round_trips():
    x = torch.arange(2 + 12).view(1, -1, 1).expand(2, -1, 3)  # 2 extra tokens + a 3x4 grid, 3 channels
    col = transpose_patch_grid(x, 2, 3, 4)
    assert col[0, :2, 0].tolist() == [0, 1]
    assert col[0, 2:6, 0].tolist() == [2, 6, 10, 3]  # down the first column of the 3x4 grid
    assert torch.equal(transpose_patch_grid(col, 2, 4, 3), x)


def test_tokens_return_to_row_major_order():
    # with every mixer's token-wise work an identity map, the model is token-order agnostic only if each
    # mixer restores the row-major order it permuted for a backend that can't read the column order in
    # place; a leftover permutation would move patches around
    model = tiny(depth=1).eval()
    for block in (m for m in model.modules() if isinstance(m, MambaBlock)):
        block.mixer._mix = lambda h, reverse, column_grid, backend, layout, grid: h * 1.0
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        tokens_before = model.patch_embed(x).flatten(2).transpose(1, 2)
        # a model where blocks permute would still give the same output for a spatially constant input,
        # so compare against a run in which blocks never permute
        out = model(x, torch.tensor([1]), torch.tensor([1]))
        for block in (m for m in model.modules() if isinstance(m, MambaBlock)):
            block.order = "row"
        ref = model(x, torch.tensor([1]), torch.tensor([1]))
    assert tokens_before.shape[1] == 16
    torch.testing.assert_close(out, ref)


def test_backends_and_chunk_sizes_agree_on_the_whole_model():
    model = tiny(scan="bidirectional").eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 900]), torch.tensor([4, 10])
    outs = []
    for backend, opts in [("torch", {}), ("torch", {"chunk_size": 5}), ("torch-sequential", {})]:
        model.set_scan_backend(backend, **opts)
        with torch.no_grad():
            outs.append(model(x, t, y))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)


def test_other_resolutions_interpolate_positions():
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 12, 16), torch.tensor([5]), torch.tensor([2]))
    assert out.shape == (1, 3, 12, 16)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 3, 9, 8), torch.tensor([5]))


def test_save_and_load_round_trip_is_exact(tmp_path):
    model = tiny(scan="bidirectional").eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").exists()
    assert not list((tmp_path / "m").glob("*.bin"))  # no pickle
    loaded = WDMamba.from_pretrained(tmp_path / "m", use_safetensors=True).eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 900]), torch.tensor([4, 10])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_cli_model_info(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["model", "info", "WDM-S/2", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["parameters"] == EXPECTED_PARAMS["WDM-S/2"] and info["tokens"] == 258
    assert info["gflops_per_forward"] > 1
    assert sum(info["parameters_by_stage"].values()) == info["parameters"]
    tiny().save_pretrained(tmp_path / "m")
    r = runner.invoke(app, ["model", "info", str(tmp_path / "m"), "--resolution", "16"])
    assert r.exit_code == 0 and "66 tokens" in r.output  # 8x8 patches + time + class
    r = runner.invoke(app, ["model", "info", "WDM-Q/2"])
    assert r.exit_code != 0 and "unknown model preset" in str(r.exception)
