"""Issue 15's architecture options: zigzag token orders, pad tokens, the 2-D mixer conv, DiM's smoothers,
sin-cos positions, adaLN-Zero and the cycle offset. Shapes, gradients, and the token bookkeeping checked
against permutations built independently, index by index."""

from __future__ import annotations

import itertools

import pytest
import torch

from wdmctl.models import build_model
from wdmctl.models.token_order import ScanLayout
from wdmctl.models.embeddings import sincos_2d_embedding
from wdmctl.models.wdmamba import CYCLE, MambaBlock, SSMBranch

OPTIONS = [dict(), dict(token_order="zigzag"), dict(pad_tokens=3), dict(mixer_conv="2d"), dict(smoother=True),
           dict(mixer_conv="none"), dict(mixer_conv="none", scan="bidirectional"),
           dict(position_embedding="sincos"), dict(zero_init=True), dict(cycle_offset=2), dict(skip_init="average"),
           dict(scan="bidirectional", token_order="zigzag", pad_tokens=2, mixer_conv="2d", smoother=True,
                position_embedding="sincos", zero_init=True)]


def tiny(**options):
    return build_model("WDM-S/2", width=32, depth=1, sample_size=8, in_channels=3, num_classes=10, d_state=4,
                       scan_backend="torch", **options)


def expected_scan_order(extra, rows, cols, column, zigzag, pads):
    """Scan position -> token index (None for a pad), built one index at a time without tensor ops."""
    order = list(range(extra))
    lines, length = (cols, rows) if column else (rows, cols)
    for line in range(lines):
        positions = range(length - 1, -1, -1) if zigzag and line % 2 else range(length)
        for position in positions:
            row, col = (position, line) if column else (line, position)
            order.append(extra + row * cols + col)
        order += [None] * pads
    return order


@pytest.mark.parametrize("column,zigzag,pads", list(itertools.product([False, True], [False, True], [0, 2])))
def test_scan_layout_matches_an_independent_permutation(column, zigzag, pads):
    extra, rows, cols, channels = 2, 3, 4, 5
    layout = ScanLayout(extra, rows, cols, column=column, zigzag=zigzag, pads=pads)
    tokens = torch.arange(2 * (extra + rows * cols) * channels, dtype=torch.float32).view(2, -1, channels)
    pad = -1 - torch.arange(pads * channels, dtype=torch.float32).view(pads, channels) if pads else None
    sequence = layout.to_scan(tokens, pad)
    order = expected_scan_order(extra, rows, cols, column, zigzag, pads)
    assert sequence.shape == (2, layout.scan_length, channels) and len(order) == layout.scan_length
    pads_seen = 0
    for position, index in enumerate(order):
        if index is None:
            torch.testing.assert_close(sequence[:, position], pad[pads_seen % pads].expand(2, channels))
            pads_seen += 1
        else:
            torch.testing.assert_close(sequence[:, position], tokens[:, index])
    torch.testing.assert_close(layout.from_scan(sequence), tokens)


def test_zigzag_steps_are_always_between_neighbours():
    for column in (False, True):
        order = expected_scan_order(0, 4, 5, column, True, 0)
        layout = ScanLayout(0, 4, 5, column=column, zigzag=True)
        tokens = torch.arange(20, dtype=torch.float32).view(1, 20, 1)
        got = layout.to_scan(tokens)[0, :, 0].long().tolist()
        assert got == order
        cells = [divmod(i, 5) for i in got]
        assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(cells, cells[1:]))


def test_pad_layout_refuses_a_missing_pad():
    with pytest.raises(ValueError, match="pad tensor"):
        ScanLayout(1, 2, 2, pads=2).to_scan(torch.zeros(1, 5, 3))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_options_keep_shapes_and_every_parameter_gets_a_gradient(options):
    torch.manual_seed(0)
    model = tiny(**options)
    if options.get("zero_init"):   # adaLN-Zero starts with zero gates: move off the origin first
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([3.0, 500.0]), torch.tensor([1, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_options_are_checked_with_one_message():
    for bad, message in ((dict(token_order="spiral"), "token_order must be one of"),
                         (dict(mixer_conv="3d"), "mixer_conv must be one of"),
                         (dict(position_embedding="rope"), "position_embedding must be one of"),
                         (dict(skip_init="identity"), "skip_init must be one of"),
                         (dict(pad_tokens=-1), "pad_tokens must be >= 0")):
        with pytest.raises(ValueError, match=message):
            tiny(**bad)


@pytest.mark.parametrize("arch", ["wdmamba", "uvit"])
def test_average_skip_init_fuses_as_the_mean_of_stream_and_skip(arch):
    # every long skip's fusion starts as (stream + skip) / 2, for Mamba and transformer blocks alike; the
    # rest of the model is initialised exactly as with the default (same seed, same draws)
    preset = "WDM-S/2" if arch == "wdmamba" else "UViT-S/2"
    models = {}
    for init in ("xavier", "average"):
        torch.manual_seed(0)
        models[init] = build_model(preset, width=32, depth=2, sample_size=8, in_channels=3, num_classes=10,
                                   d_state=4, num_heads=2, scan_backend="torch", skip_init=init)
    fusions = [m.skip_linear for m in models["average"].modules() if getattr(m, "skip_linear", None) is not None]
    assert len(fusions) == (4 if arch == "wdmamba" else 2)   # depth skips per U
    stream, skip = torch.randn(5, 32), torch.randn(5, 32)
    for fusion in fusions:
        torch.testing.assert_close(fusion(torch.cat([stream, skip], -1)), (stream + skip) / 2)
    xavier = dict(models["xavier"].named_parameters())
    for name, p in models["average"].named_parameters():
        if "skip_linear" not in name or name.endswith("bias"):   # both inits zero the fusion's bias
            assert torch.equal(p, xavier[name]), name
        else:
            assert not torch.equal(p, xavier[name]), name


def test_average_skip_init_changes_nothing_without_skips():
    models = []
    for init in ("xavier", "average"):
        torch.manual_seed(0)
        models.append(build_model("DiM-S/2", width=32, depth=3, sample_size=8, in_channels=3, d_state=4,
                                  scan_backend="torch", skip_init=init))
    for (name, a), (_, b) in zip(*(m.named_parameters() for m in models)):
        assert torch.equal(a, b), name


def test_zero_init_starts_as_a_constant_prediction():
    # every gate is zero and the output projection too: the network ignores its input at initialisation
    model = tiny(zero_init=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, MambaBlock)]
    assert all(b.scale_shift_table[2].abs().sum() == 0 for b in blocks)
    a = model(torch.randn(1, 3, 8, 8), torch.tensor([10.0]), torch.tensor([2]))
    b = model(torch.randn(1, 3, 8, 8), torch.tensor([900.0]), torch.tensor([7]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0, :, 0, 0], model.final_conv.bias)


def test_two_d_conv_reaches_the_patch_below():
    # the point of the 2-D conv: in a row scan the patch below is a whole row away; here it is one tap
    torch.manual_seed(0)
    branch = SSMBranch(d_inner=4, d_state=2, d_conv=3, dt_rank=1, mixer_conv="2d")
    grid = (1, 3, 3)
    x = torch.zeros(1, 10, 4)
    base = branch.grid_conv(x, grid)
    x[0, 1 + 0 * 3 + 1] = 1.0                      # patch (0, 1)
    changed = (branch.grid_conv(x, grid) - base).abs().sum(-1)[0]
    below, far = 1 + 1 * 3 + 1, 1 + 2 * 3 + 1      # patches (1, 1) and (2, 1)
    assert changed[below] > 0 and changed[far] == 0 and changed[0] == 0   # the extra token is untouched


def test_no_local_conv_mixes_tokens_only_through_the_scan():
    # mixer_conv = "none" (an ablation arm): no conv parameters; a token's change reaches only itself and the
    # tokens after it in the scan's direction (a row-forward scan), never the tokens before it
    torch.manual_seed(0)
    branch = SSMBranch(d_inner=4, d_state=2, d_conv=3, dt_rank=1, mixer_conv="none")
    assert branch.conv1d is None and branch.conv2d is None
    assert not any("conv" in name for name, _ in branch.named_parameters())
    x, z = torch.randn(1, 10, 4), torch.randn(1, 10, 4)
    base = branch(x, z, False, None, {"backend": "torch"})
    x[0, 5] += 1.0
    changed = (branch(x, z, False, None, {"backend": "torch"}) - base).abs().sum(-1)[0]
    assert changed[:5].abs().max() == 0 and changed[5] > 0 and changed[6] > 0


def test_sincos_positions_follow_the_formula_and_resize_without_interpolation():
    table = sincos_2d_embedding(8, 3, 4)
    row, col = 2, 3
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    expected = torch.cat([torch.sin(row * omega), torch.cos(row * omega), torch.sin(col * omega), torch.cos(col * omega)])
    torch.testing.assert_close(table[row * 4 + col], expected.float())
    model = tiny(position_embedding="sincos")
    assert model.pos_embed.shape == (1, 2, 32)      # learned rows for the time and class tokens only
    assert model(torch.randn(1, 3, 12, 8), torch.tensor([5.0]), torch.tensor([1])).shape == (1, 3, 12, 8)


def test_cycle_offset_moves_the_orders():
    orders = [b.order for b in tiny(cycle_offset=2).modules() if isinstance(b, MambaBlock)]
    assert orders[:4] == [CYCLE[2], CYCLE[3], CYCLE[0], CYCLE[1]]
    last = [b.order for b in tiny().modules() if isinstance(b, MambaBlock)][-1]
    assert last.startswith("row") and orders[-1].startswith("column")
