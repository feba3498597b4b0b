"""WD-Mamba: a W-shaped network of Mamba blocks that predicts diffusion noise.

Reads top to bottom like the paper's Figure 2:

    image/latent (B, C, H, W) --PatchEmbed--> patch tokens
    [time token, class token, patch tokens] + learned position embedding
    W-Net:  encoder 1 (6 blocks) -> bottleneck 1 -> decoder 1 (6)      (decoder k fuses encoder 7-k's output)
            encoder 2 (6 blocks) -> bottleneck 2 -> decoder 2 (6)
    RMSNorm -> Linear -> unpatchify -> Conv2d 3x3 -> predicted noise (B, C, H, W)

Each Mamba block: pre-norm RMSNorm, adaLN-single modulation (shift/scale/gate from one shared MLP of the
conditioning plus a small per-block table), a Mamba-1 mixer scanning one token order, residual. The presets'
mixer has no local conv before the scan (`mixer_conv="none"`): Mamba's causal conv1d along the scan
(`"causal1d"`) drew wide stripes and a depthwise 3x3 over the patch grid (`"2d"`) fine ones
(docs/results.md); both remain options.
Scan orders cycle from block to block over row-major forward, row-major backward, column-major forward
and column-major backward (`scan="cycle"`), or every block scans both directions of one orientation
(`scan="bidirectional"`). Row-major order is restored after every block, so long skips, the position
embedding and unpatchify all see tokens in the same order.

The same class builds the paper's comparisons: `arch="umamba"` (one U of Mamba blocks, the ablation),
`arch="stack"` (DiM-style blocks in a row, no long skips) and `arch="uvit"` (U-ViT: transformer blocks with
the same long skips). Issue 15's other options (zigzag orders, pad tokens, smoothers, sin-cos positions,
adaLN-Zero, a cycle offset) are constructor arguments; embeddings live in embeddings.py and the scan-order
copies of zigzag orders and pad tokens in token_order.py.
Differences from the paper's text and released code are listed in docs/architecture.md.

Activations stay in (batch, tokens, channels) layout and in row-major token order; the scan reads
transposed views of them. Scan backends that read the column-major order in place (triton) get the patch
grid instead of permuted copies; bidirectional blocks run both directions in one launch where the backend
can (`selective_scan_pair`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch.utils.checkpoint import checkpoint

from wdmctl.models.embeddings import TimestepEmbedder, sincos_2d_embedding
from wdmctl.models.grid_conv import grid_conv_silu
from wdmctl.models.norm_modulate import gated_residual, norm_modulate
from wdmctl.models.token_order import ScanLayout
from wdmctl.scan import (
    causal_conv1d,
    causal_conv1d_pair,
    resolve_backend,
    selective_scan,
    selective_scan_pair,
    transpose_patch_grid,
)

ARCHS = ("wdmamba", "umamba", "stack", "uvit")
SCAN_MODES = ("cycle", "bidirectional")
TOKEN_ORDERS = ("raster", "zigzag")
MIXER_CONVS = ("causal1d", "2d", "none")
POSITION_EMBEDDINGS = ("learned", "sincos")
SKIP_INITS = ("xavier", "average")
CYCLE = ("row", "row_reverse", "column", "column_reverse")
# the vocabulary of every string argument of WDMamba, checked by the constructor and by recipe validation
CHOICES = {"arch": ARCHS, "scan": SCAN_MODES, "token_order": TOKEN_ORDERS, "mixer_conv": MIXER_CONVS,
           "position_embedding": POSITION_EMBEDDINGS, "skip_init": SKIP_INITS}


# ----------------------------------------------------------------------------------------------------
# The Mamba-1 mixer (selective state space, S6)
# ----------------------------------------------------------------------------------------------------

class SSMBranch(nn.Module):
    """The per-direction half of a Mamba mixer: local conv + SiLU, x_proj -> (dt, B, C), dt_proj,
    A_log, D. Parameter names follow mamba-ssm's `Mamba` so checkpoints are easy to read across projects.

    The local conv is Mamba's causal depthwise conv1d along the scan (`mixer_conv="causal1d"`), a
    depthwise 3x3 conv over the patch grid (`"2d"`, as VMamba's SS2D does), which sees the vertical
    neighbours that a row scan puts a whole row apart (extra tokens get its centre tap), or none (`"none"`,
    the presets'). `pads` > 0 adds
    learned pad tokens (one set for the scanned input, one for the gate z) after every line of the scan.
    """

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int, mixer_conv: str = "causal1d",
                 pads: int = 0, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = self.conv2d = None   # "none": no local conv, the SiLU alone (the presets')
        if mixer_conv == "2d":
            self.conv2d = nn.Conv2d(d_inner, d_inner, 3, groups=d_inner, padding=1)
        elif mixer_conv == "causal1d":
            self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.pad_tokens = nn.Parameter(torch.randn(2, pads, d_inner) * 0.02) if pads else None
        if self.pad_tokens is not None:
            self.pad_tokens._no_weight_decay = True
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # Mamba's initialisation: dt_proj bias so that softplus(bias) is log-uniform in [dt_min, dt_max]
        nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def grid_conv(self, x: torch.Tensor, grid) -> torch.Tensor:
        """The 2-D local conv + SiLU on (B, L, d_inner) tokens in memory order; grid = (extra, rows, cols).
        One Triton kernel each way on CUDA (wdmctl/models/grid_conv.py), the PyTorch expression elsewhere."""
        return grid_conv_silu(x, self.conv2d.weight, self.conv2d.bias, grid)

    def forward(self, x: torch.Tensor, z: torch.Tensor, reverse: bool, column_grid, scan_options: dict,
                layout: ScanLayout | None = None, grid=None) -> torch.Tensor:
        """x, z: (B, L, d_inner) in memory order -> (B, L, d_inner). Scans towards the end (or the start if
        `reverse`), in column-major order of column_grid when given, or in the order of `layout` (which then
        builds the scan-order copies). `grid` = (extra, rows, cols) is needed by the 2-D conv."""
        backend = scan_options.get("backend", "auto")
        pad_x, pad_z = self.pad_tokens if self.pad_tokens is not None else (None, None)
        if self.conv2d is not None:   # the 2-D conv works on the grid, before any reordering
            x = self.grid_conv(x, grid)
        elif self.conv1d is None:
            x = F.silu(x)
        if layout is not None:
            x, z = layout.to_scan(x, pad_x), layout.to_scan(z, pad_z)
        if self.conv1d is None:
            u = x.transpose(1, 2)
        else:
            u = causal_conv1d(x.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu",
                              reverse=reverse, column_grid=column_grid, backend=backend)   # (B, E, L)
        y = self._scan(u, z, reverse, column_grid, scan_options).transpose(1, 2)
        return y if layout is None else layout.from_scan(y)

    def _scan(self, u, z, reverse, column_grid, scan_options):
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)                              # bias goes in as delta_bias
        y = selective_scan(
            u, delta.transpose(1, 2), -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
            self.D.float(), z.transpose(1, 2), self.dt_proj.bias.float(), delta_softplus=True,
            reverse=reverse, column_grid=column_grid, **scan_options,
        )
        return y


class MambaMixer(nn.Module):
    """in_proj -> (x, z); one SSM branch per scan direction; out_proj.

    With two branches (bidirectional), the outputs are averaged: the /2 keeps the residual stream's
    scale, which is what kept Vim's bidirectional blocks from overflowing in bf16."""

    def __init__(self, width: int, d_state: int = 16, d_conv: int = 3, expand: int = 2,
                 bidirectional: bool = False, mixer_conv: str = "causal1d", token_order: str = "raster",
                 pad_tokens: int = 0):
        super().__init__()
        d_inner = expand * width
        dt_rank = math.ceil(width / 16)
        self.zigzag, self.pads = token_order == "zigzag", pad_tokens
        self.in_proj = nn.Linear(width, 2 * d_inner, bias=False)
        self.forward_branch = SSMBranch(d_inner, d_state, d_conv, dt_rank, mixer_conv, pad_tokens)
        self.backward_branch = (SSMBranch(d_inner, d_state, d_conv, dt_rank, mixer_conv, pad_tokens)
                                if bidirectional else None)
        self.out_proj = nn.Linear(d_inner, width, bias=False)
        self.scan_options: dict = {}

    def forward(self, x: torch.Tensor, order: str = "row", grid=None) -> torch.Tensor:
        """x: (B, L, width) in row-major token order; order: one of CYCLE (the forward branch's order);
        grid: (extra tokens, grid rows, grid cols), needed by column orders, zigzag, pads and the 2-D conv.

        Raster orders without pads are read in place by backends that can (column-major included), else
        scanned between one transposing copy each way (cheaper than permuting the conv's and the scan's
        inputs separately). Zigzag orders and pad tokens are scanned through a ScanLayout's copies."""
        backend = resolve_backend(self.scan_options.get("backend", "auto"), x.device.type)
        reverse, column = order.endswith("reverse"), order.startswith("column")
        conv2d = self.forward_branch.conv2d is not None
        if self.zigzag or self.pads or (column and conv2d and not backend.reads_column_order):
            layout = ScanLayout(*grid, column=column, zigzag=self.zigzag, pads=self.pads)
            return self._mix(x, reverse, None, backend, layout, grid)
        column_grid = grid if column else None
        if column_grid and not backend.reads_column_order:
            extra, rows, cols = column_grid
            y = self._mix(transpose_patch_grid(x, extra, rows, cols), reverse, None, backend, None, None)
            return transpose_patch_grid(y, extra, cols, rows)
        return self._mix(x, reverse, column_grid, backend, None, grid)

    def _mix(self, x, reverse, column_grid, backend, layout, grid):
        x_in, z = self.in_proj(x).chunk(2, dim=-1)
        options = self.scan_options
        if self.backward_branch is None:
            y = self.forward_branch(x_in, z, reverse, column_grid, options, layout, grid)
        elif backend.selective_scan_pair is not None and layout is None:
            y = self._both_directions_at_once(x_in, z, reverse, column_grid, grid)
        else:
            y = 0.5 * (self.forward_branch(x_in, z, reverse, column_grid, options, layout, grid)
                       + self.backward_branch(x_in, z, not reverse, column_grid, options, layout, grid))
        return self.out_proj(y)

    def _both_directions_at_once(self, x_in, z, reverse, column_grid, grid):
        """The two branches as one: each step (conv, x_proj, dt_proj, scan) runs both directions in one
        launch, their inputs stacked on the batch axis and their weights on a new leading axis. The same
        arithmetic as calling the branches one after the other."""
        fwd, bwd = self.forward_branch, self.backward_branch
        batch, length, d_inner = x_in.shape
        options = dict(self.scan_options)
        backend = options.pop("backend", "auto")

        def both(get):
            return torch.stack([get(fwd), get(bwd)])

        if fwd.conv2d is not None:   # the 2-D conv does not depend on the direction: both weights, one launch
            u = grid_conv_silu(x_in, both(lambda m: m.conv2d.weight), both(lambda m: m.conv2d.bias), grid).transpose(1, 2)
        elif fwd.conv1d is None:     # no local conv: both directions scan the same SiLU(x)
            u = F.silu(x_in).repeat(2, 1, 1).transpose(1, 2)
        else:
            u = causal_conv1d_pair(x_in.transpose(1, 2), both(lambda m: m.conv1d.weight.squeeze(1)),
                                   both(lambda m: m.conv1d.bias), "silu", reverse, column_grid, backend)  # (2B, E, L)
        tokens = u.transpose(1, 2).reshape(2, batch * length, d_inner)
        dt, B, C = torch.bmm(tokens, both(lambda m: m.x_proj.weight).transpose(1, 2)).split(
            [fwd.dt_rank, fwd.d_state, fwd.d_state], dim=-1)
        delta = torch.bmm(dt, both(lambda m: m.dt_proj.weight).transpose(1, 2))

        def rows(t):  # (2, B * L, k) -> (2B, k, L), a view
            return t.reshape(2 * batch, length, -1).transpose(1, 2)

        y = selective_scan_pair(
            u, rows(delta), -torch.exp(both(lambda m: m.A_log).float()), rows(B), rows(C),
            both(lambda m: m.D).float(), z.transpose(1, 2), both(lambda m: m.dt_proj.bias).float(),
            delta_softplus=True, reverse=reverse, column_grid=column_grid, backend=backend, **options,
        ).transpose(1, 2)
        return 0.5 * (y[:batch] + y[batch:])


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------

class MambaBlock(nn.Module):
    """[skip fusion] -> RMSNorm -> adaLN modulate -> Mamba mixer in this block's token order -> gated residual."""

    def __init__(self, width: int, order: str, has_skip: bool, d_state: int, d_conv: int, expand: int,
                 bidirectional: bool, mixer_conv: str = "causal1d", token_order: str = "raster", pad_tokens: int = 0):
        super().__init__()
        self.order = order
        self.skip_linear = nn.Linear(2 * width, width) if has_skip else None
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.mixer = MambaMixer(width, d_state, d_conv, expand, bidirectional, mixer_conv, token_order, pad_tokens)
        self.scale_shift_table = nn.Parameter(torch.randn(3, width) / width ** 0.5)

    def forward(self, x, modulation, skip=None, grid=None):
        """grid: (extra tokens, grid height, grid width)."""
        if self.skip_linear is not None:
            # back to the residual stream's dtype: under bf16 autocast the stream stays fp32 (no bf16 drift
            # accumulating over 26 blocks, a cause of the NaNs Mamba diffusion users report)
            x = self.skip_linear(torch.cat([x, skip], dim=-1)).to(x.dtype)
        shift, scale, gate = (modulation + self.scale_shift_table[None]).unbind(1)
        h = norm_modulate(x, self.norm, shift, scale)   # modulate(norm(x), shift, scale), one kernel on CUDA
        # tokens stay row-major (skips and the head never see a permuted order); the mixer scans the grid
        # in this block's order and returns its output in row-major order
        h = self.mixer(h, self.order, grid)
        return gated_residual(x, gate, h)   # x + gate * h, one kernel on CUDA


class TransformerBlock(nn.Module):
    """U-ViT's block: [skip fusion] -> LN -> self-attention (SDPA) -> LN -> MLP, pre-norm residuals."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, has_skip: bool):
        super().__init__()
        self.num_heads = num_heads
        self.skip_linear = nn.Linear(2 * width, width) if has_skip else None
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, modulation=None, skip=None, grid=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class BlockSequence(nn.Module):
    """What a U and a plain stack share: running a block, through activation checkpointing when enabled."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    def _run(self, block, *args):
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


class UStage(BlockSequence):
    """One U: encoder blocks -> bottleneck -> decoder blocks; decoder block k fuses encoder block
    (depth-1-k)'s output (U-ViT's long skips: concat + Linear(2D -> D))."""

    def __init__(self, make_block, depth: int, first_index: int):
        super().__init__()
        self.encoder = nn.ModuleList([make_block(first_index + i, False) for i in range(depth)])
        self.bottleneck = make_block(first_index + depth, False)
        self.decoder = nn.ModuleList([make_block(first_index + depth + 1 + i, True) for i in range(depth)])

    def forward(self, x, modulation, grid):
        skips = []
        for block in self.encoder:
            x = self._run(block, x, modulation, None, grid)
            skips.append(x)
        x = self._run(self.bottleneck, x, modulation, None, grid)
        for block in self.decoder:
            x = self._run(block, x, modulation, skips.pop(), grid)
        return x


class PlainStack(BlockSequence):
    """DiM's plain stack for the paper's comparison: `depth` blocks one after another, no long skips."""

    def __init__(self, make_block, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList([make_block(i, False) for i in range(depth)])

    def forward(self, x, modulation, grid):
        for block in self.blocks:
            x = self._run(block, x, modulation, None, grid)
        return x


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

class WDMamba(ModelMixin, ConfigMixin):
    """Noise-prediction network: (x_t, t, y) -> epsilon. See the module docstring for the layout.

    Args:
        arch: "wdmamba" (W-Net of two Us), "umamba" (one U), "stack" (DiM-style: `depth` Mamba blocks in a
            row, no long skips) or "uvit" (one U of transformer blocks).
        sample_size: trained latent/pixel side (H = W); other sizes interpolate the position embedding.
        in_channels: latent or pixel channels.
        patch_size: side of a square patch.
        width: token width D.
        depth: encoder (and decoder) blocks per U; 6 in the paper (for "stack": the number of blocks).
        num_classes: 0 = unconditional; otherwise label `num_classes` is the null class for CFG.
        d_state, d_conv, expand: Mamba-1 mixer sizes (N, conv width, d_inner / D).
        scan: "cycle" (one direction per block, cycling row/column x forward/backward) or "bidirectional".
        cycle_offset: shifts which order of the cycle each block gets (block i scans CYCLE[(i + offset) % 4]).
        token_order: "raster" (each line of the grid scanned the same way) or "zigzag" (every second line
            backwards, so consecutive tokens are always neighbours: ZigMa).
        pad_tokens: learned pad tokens after every scanned line (DiM uses 3); 0 = none.
        mixer_conv: the Mamba mixer's local conv: "causal1d" (Mamba's, along the scan), "2d" (depthwise
            3x3 over the patch grid) or "none" (no local conv: an ablation of where stripes come from).
        smoother: DiM's depthwise 3x3 convs on the patch grid before the first and after the last block
            (residual, zero-initialised).
        position_embedding: "learned" table (interpolated for other sizes) or fixed 2-D "sincos" for the patches.
        zero_init: adaLN-Zero: every block's gate and the output projection start at zero, so the
            network starts as the identity on its residual stream and predicts zero noise (DiT).
        skip_init: how each long skip's fusion, Linear(2D -> D) over [stream, skip], starts: "xavier" (U-ViT's:
            a random mix, so the residual stream is scrambled at every fusion) or "average" ([I/2, I/2], zero
            bias: the mean of stream and skip, HDiT's learnable lerp at its initial 0.5). No effect without
            long skips (arch "stack").
        num_heads, mlp_ratio: transformer sizes (uvit only).
        scan_backend: default selective-scan backend ("auto", "torch", "mamba_ssm", ...).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        arch: str = "wdmamba",
        sample_size: int = 32,
        in_channels: int = 4,
        patch_size: int = 2,
        width: int = 768,
        depth: int = 6,
        num_classes: int = 0,
        d_state: int = 16,
        d_conv: int = 3,
        expand: int = 2,
        scan: str = "cycle",
        cycle_offset: int = 0,
        token_order: str = "raster",
        pad_tokens: int = 0,
        mixer_conv: str = "causal1d",
        smoother: bool = False,
        position_embedding: str = "learned",
        zero_init: bool = False,
        skip_init: str = "xavier",
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        scan_backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("arch", arch), ("scan", scan), ("token_order", token_order),
                            ("mixer_conv", mixer_conv), ("position_embedding", position_embedding),
                            ("skip_init", skip_init)):
            if value not in CHOICES[name]:
                raise ValueError(f"{name} must be one of {CHOICES[name]}, not {value!r}")
        if pad_tokens < 0:
            raise ValueError(f"pad_tokens must be >= 0, not {pad_tokens}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        self.num_extra_tokens = 2 if num_classes > 0 else 1
        grid = sample_size // patch_size

        # Embeddings: patches, time token (+ adaLN conditioning), class token, positions
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.time_embed = TimestepEmbedder(width)
        self.class_embed = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        # learned: a table over [extra tokens, patches]; sincos: fixed patch positions, a table for the extras
        learned_positions = self.num_extra_tokens + (grid * grid if position_embedding == "learned" else 0)
        self.pos_embed = nn.Parameter(torch.randn(1, learned_positions, width) * 0.02)
        # the trained grid's fixed table, a buffer so it moves with the model (and CUDA graphs capture no copy)
        self.register_buffer("sincos_patches", sincos_2d_embedding(width, grid, grid)[None]
                             if position_embedding == "sincos" else None, persistent=False)

        # W-Net body
        self.is_mamba = arch != "uvit"
        num_stages = 2 if arch == "wdmamba" else 1

        def make_block(index: int, has_skip: bool) -> nn.Module:
            if not self.is_mamba:
                return TransformerBlock(width, num_heads, mlp_ratio, has_skip)
            if scan == "bidirectional":
                order = ("row", "column")[(index + cycle_offset) % 2]
            else:
                order = CYCLE[(index + cycle_offset) % 4]
            return MambaBlock(width, order, has_skip, d_state, d_conv, expand, scan == "bidirectional",
                              mixer_conv, token_order, pad_tokens)

        blocks_per_stage = 2 * depth + 1
        if arch == "stack":
            self.w_net = nn.ModuleList([PlainStack(make_block, depth)])
        else:
            self.w_net = nn.ModuleList([UStage(make_block, depth, s * blocks_per_stage) for s in range(num_stages)])
        # DiM's "smoothers": depthwise 3x3 convs on the patch grid before and after the body
        self.smoothers = (nn.ModuleList([nn.Conv2d(width, width, 3, padding=1, groups=width) for _ in range(2)])
                          if smoother else None)
        # adaLN-single: one shared projection of the conditioning into (shift, scale, gate) for all blocks
        self.block_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width)) if self.is_mamba else None

        # Head: norm -> (adaLN) -> Linear -> unpatchify -> Conv2d 3x3
        if self.is_mamba:
            self.norm_out = nn.RMSNorm(width, eps=1e-6)
            self.head_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        else:
            self.norm_out = nn.LayerNorm(width)
            self.head_modulation = None
        self.proj_out = nn.Linear(width, patch_size * patch_size * in_channels)
        self.final_conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)

        self._init_weights()
        self.set_scan_backend(scan_backend)

    def _init_weights(self) -> None:
        ssm_linears = {m.dt_proj for m in self.modules() if isinstance(m, SSMBranch)}  # keep Mamba's dt init
        for module in self.modules():
            if isinstance(module, nn.Linear) and module not in ssm_linears:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.block_modulation is not None:
            nn.init.normal_(self.block_modulation[1].weight, std=0.02)
            nn.init.normal_(self.head_modulation[1].weight, std=0.02)
        nn.init.normal_(self.proj_out.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        if self.smoothers is not None:   # residual convs that start as the identity
            for conv in self.smoothers:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        if self.config.skip_init == "average":
            # the fusion starts as (stream + skip) / 2: the stream passes every fusion unscrambled
            with torch.no_grad():
                for module in self.modules():
                    fusion = getattr(module, "skip_linear", None)
                    if isinstance(fusion, nn.Linear):
                        half = torch.eye(fusion.out_features, dtype=fusion.weight.dtype) / 2
                        fusion.weight.copy_(torch.cat([half, half], dim=1))
                        nn.init.zeros_(fusion.bias)
        if self.config.zero_init:
            # adaLN-Zero (DiT): gate = 0 in every block (shared projection's gate third and each table's gate
            # row), and a zero output projection
            with torch.no_grad():
                if self.block_modulation is not None:
                    width = self.config.width
                    self.block_modulation[1].weight[2 * width:].zero_()
                    self.block_modulation[1].bias[2 * width:].zero_()
                    for module in self.modules():
                        if isinstance(module, MambaBlock):
                            module.scale_shift_table[2].zero_()
                nn.init.zeros_(self.proj_out.weight)
                nn.init.zeros_(self.proj_out.bias)

    # ---- runtime options -------------------------------------------------------------------------

    def set_scan_backend(self, backend: str = "auto", **options) -> None:
        """Choose the selective-scan backend (and its options, e.g. chunk_size for "torch") for every block."""
        for module in self.modules():
            if isinstance(module, MambaMixer):
                module.scan_options = {"backend": backend, **options}

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        for stage in self.w_net:
            stage.gradient_checkpointing = enabled

    @property
    def null_class(self) -> int | None:
        return self.config.num_classes if self.config.num_classes > 0 else None

    # ---- forward ---------------------------------------------------------------------------------

    def _position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        pos = self.pos_embed
        if self.sincos_patches is not None:
            patches = self.sincos_patches
            if patches.shape[1] != grid_h * grid_w:
                patches = sincos_2d_embedding(self.config.width, grid_h, grid_w)[None].to(pos.device)
            return torch.cat([pos, patches.to(pos.dtype)], dim=1)
        trained = self.config.sample_size // self.config.patch_size
        if (grid_h, grid_w) == (trained, trained):
            return pos
        extra, patches = pos[:, : self.num_extra_tokens], pos[:, self.num_extra_tokens:]
        patches = patches.reshape(1, trained, trained, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patches = patches.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([extra, patches], dim=1)

    @staticmethod
    def _smooth(conv: nn.Conv2d, tokens: torch.Tensor, grid) -> torch.Tensor:
        """tokens + depthwise conv of the patch grid (extra tokens untouched)."""
        extra, rows, cols = grid
        b, _, d = tokens.shape
        patches = tokens[:, extra:]
        image = patches.reshape(b, rows, cols, d).permute(0, 3, 1, 2)
        smoothed = patches + conv(image).permute(0, 2, 3, 1).reshape(b, rows * cols, d).to(patches.dtype)
        return torch.cat([tokens[:, :extra], smoothed], dim=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); timesteps: (B,) on the 0..999 scale; class_labels: (B,) ints (null = num_classes).
        Returns the predicted noise, shaped like x."""
        b, c, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} is not divisible by the patch size {p}")
        grid_h, grid_w = height // p, width // p
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)

        # 1. tokens: [time, class, patches] + positions
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)                  # (B, HW, D)
        t_emb = self.time_embed(timesteps)                                        # (B, D)
        extra = [t_emb[:, None]]
        cond = t_emb
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((b,), self.config.num_classes, device=x.device, dtype=torch.long)
            y_emb = self.class_embed(class_labels)
            extra.append(y_emb[:, None])
            cond = cond + y_emb
        tokens = torch.cat(extra + [patches.to(t_emb.dtype)], dim=1) + self._position_embedding(grid_h, grid_w)

        # 2. W-Net: encoder 1 -> bottleneck 1 -> decoder 1 -> encoder 2 -> bottleneck 2 -> decoder 2
        modulation = self.block_modulation(cond).view(b, 3, -1) if self.is_mamba else None
        grid = (self.num_extra_tokens, grid_h, grid_w)
        if self.smoothers is not None:
            tokens = self._smooth(self.smoothers[0], tokens, grid)
        for stage in self.w_net:
            tokens = stage(tokens, modulation, grid)
        if self.smoothers is not None:
            tokens = self._smooth(self.smoothers[1], tokens, grid)

        # 3. head: norm -> Linear -> unpatchify -> Conv2d
        patch_tokens = tokens[:, self.num_extra_tokens:]
        if self.head_modulation is not None:
            shift, scale = self.head_modulation(cond).chunk(2, dim=-1)
            h = norm_modulate(patch_tokens, self.norm_out, shift, scale)
        else:
            h = self.norm_out(patch_tokens)
        h = self.proj_out(h)                                                       # (B, HW, p*p*C)
        h = h.view(b, grid_h, grid_w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)
        return self.final_conv(h)
