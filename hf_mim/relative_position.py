"""BEiT's learned relative position bias: MaskDistill's students, and any backbone built with
`backbone_relative_position_bias` (so every method's backbone imports it).

Model-zone file: copied next to checkpoints; imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relative_position_index(grid_height: int, grid_width: int) -> torch.Tensor:
    """(1 + H*W, 1 + H*W) int64 index into a BEiT relative position table, cls at index 0.

    Exactly BEiT's construction: patch pairs index ((dy + H - 1) * (2W - 1) + dx + W - 1); the last three
    rows of the table are cls-to-token (row 0 of the index), token-to-cls (column 0) and cls-to-cls.
    """
    coords = torch.stack(
        torch.meshgrid(torch.arange(grid_height), torch.arange(grid_width), indexing="ij")
    ).flatten(1)  # (2, H*W)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += grid_height - 1
    relative[:, :, 1] += grid_width - 1
    relative[:, :, 0] *= 2 * grid_width - 1
    num_distances = (2 * grid_height - 1) * (2 * grid_width - 1)
    index = torch.zeros(grid_height * grid_width + 1, grid_height * grid_width + 1, dtype=torch.int64)
    index[1:, 1:] = relative.sum(-1)
    index[0, 0:] = num_distances
    index[0:, 0] = num_distances + 1
    index[0, 0] = num_distances + 2
    return index


class RelativePositionBias(nn.Module):
    """BEiT's learned relative position bias: a ((2H-1)(2W-1) + 3, heads) table -> (1, heads, L, L) bias.

    One instance can be shared by every block (BEiT v2 / MaskDistill pretraining) or owned per block
    (BEiT fine-tuning); pass its output to `Block(..., attention_bias=...)`. The index is computed, not
    stored (no buffer to restore after meta-device loading), and cached per grid and device. Another
    patch grid gets a bilinearly resized table. The table is zero-initialised (as BEiT); initialise it
    from the model's `_init_weights` (this module owns it).
    """

    def __init__(self, grid_size: int | tuple[int, int], num_heads: int):
        super().__init__()
        self.grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.num_heads = num_heads
        num_distances = (2 * self.grid_size[0] - 1) * (2 * self.grid_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_distances + 3, num_heads))
        self._index_cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def index(self, device: torch.device, grid: tuple[int, int] | None = None) -> torch.Tensor:
        grid = tuple(grid) if grid is not None else self.grid_size
        key = (*grid, str(device))
        if key not in self._index_cache:
            with torch.device("cpu"):
                self._index_cache[key] = relative_position_index(*grid).to(device)
        return self._index_cache[key]

    def table_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The table for another patch grid: the (2H-1) x (2W-1) distance part resized bilinearly per
        head (as transformers' BEiT does for `interpolate_pos_encoding`), the three cls rows kept."""
        table = self.relative_position_bias_table
        if tuple(grid) == self.grid_size:
            return table
        height, width = self.grid_size
        num_distances = (2 * height - 1) * (2 * width - 1)
        distances = table[:num_distances].reshape(1, 2 * height - 1, 2 * width - 1, self.num_heads).permute(0, 3, 1, 2)
        resized = F.interpolate(
            distances.float(), size=(2 * grid[0] - 1, 2 * grid[1] - 1), mode="bilinear", align_corners=False
        ).to(table.dtype)
        resized = resized.permute(0, 2, 3, 1).reshape(-1, self.num_heads)
        return torch.cat([resized, table[num_distances:]], dim=0)

    def forward(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(1, heads, 1 + h*w, 1 + h*w) bias for the built grid, or for `grid` with the table resized
        (fine-tuning or inference at another resolution with `interpolate_pos_encoding=True`)."""
        grid = tuple(grid) if grid is not None else self.grid_size
        table = self.table_for(grid)
        length = grid[0] * grid[1] + 1
        bias = table[self.index(table.device, grid).reshape(-1)].reshape(length, length, self.num_heads)
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, num_heads={self.num_heads}"
