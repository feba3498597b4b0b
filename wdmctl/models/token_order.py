"""Where each token of a Mamba block's sequence comes from: the scan order over the patch grid.

A block's tokens are stored as [extra tokens (time, class), patches of a rows x cols grid row by row].
A scan visits the extra tokens first and then the grid line by line, where a line is a row (row orders)
or a column (column orders). Two options change what the scan sees at the end of each line:

- zigzag (ZigMa's continuous scan): every second line is visited backwards, so consecutive tokens are
  always spatial neighbours; in a raster scan a line's last patch is followed by the next line's first
  patch, from the other side of the image.
- pad tokens (DiM): `pads` learned tokens after every line, so the conv and the scan see a separator
  there instead of a jump across the image.

`ScanLayout.to_scan` builds the scan-order sequence (one copy), `from_scan` restores memory order and
drops the pads. Both are plain reshapes, transposes, flips and concatenations: they have cheap
backwards and export to ONNX as standard ops. The raster orders without pads need neither (the scan
backends read them in place), which is why the model only builds a layout for the other cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScanLayout:
    """The scan order of a (batch, extra + rows * cols, channels) token tensor.

    column: scan the grid column by column (else row by row).
    zigzag: visit every second line backwards (a continuous, snake-like path).
    pads: learned separator tokens after every line (0 = none).
    """

    extra: int
    rows: int
    cols: int
    column: bool = False
    zigzag: bool = False
    pads: int = 0

    @property
    def lines(self) -> int:
        return self.cols if self.column else self.rows

    @property
    def line_length(self) -> int:
        return self.rows if self.column else self.cols

    @property
    def scan_length(self) -> int:
        return self.extra + self.lines * (self.line_length + self.pads)

    def _snake(self, grid: torch.Tensor) -> torch.Tensor:
        """(batch, lines, line_length, c) with every odd line reversed; its own inverse."""
        odd = torch.arange(self.lines, device=grid.device) % 2 == 1
        return torch.where(odd[None, :, None, None], grid.flip(2), grid)

    def to_scan(self, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, L, c) in memory order -> (batch, scan_length, c) in scan order; `pad` is (pads, c)."""
        b, _, c = tokens.shape
        grid = tokens[:, self.extra:].reshape(b, self.rows, self.cols, c)
        if self.column:
            grid = grid.transpose(1, 2)
        if self.zigzag:
            grid = self._snake(grid)
        if self.pads:
            if pad is None or pad.shape != (self.pads, c):
                raise ValueError(f"this layout needs a ({self.pads}, {c}) pad tensor")
            grid = torch.cat([grid, pad.to(grid.dtype)[None, None].expand(b, self.lines, self.pads, c)], dim=2)
        return torch.cat([tokens[:, :self.extra], grid.reshape(b, -1, c)], dim=1)

    def from_scan(self, sequence: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_scan`: (batch, scan_length, c) -> (batch, L, c) in memory order, pads dropped."""
        b, _, c = sequence.shape
        grid = sequence[:, self.extra:].reshape(b, self.lines, self.line_length + self.pads, c)
        grid = grid[:, :, :self.line_length]
        if self.zigzag:
            grid = self._snake(grid)
        if self.column:
            grid = grid.transpose(1, 2)
        return torch.cat([sequence[:, :self.extra], grid.reshape(b, self.rows * self.cols, c)], dim=1)
