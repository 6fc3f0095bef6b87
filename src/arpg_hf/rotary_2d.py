"""2-D rotary position embedding of ARPG, computed from (row, col) positions.

Each attention head's ``head_dim / 2`` rotation pairs are interleaved, ``(x[2k], x[2k+1])``. Pair ``k < head_dim / 4``
turns by ``row * w_k`` and pair ``k >= head_dim / 4`` by ``col * w_(k - head_dim / 4)``, with
``w_m = rope_theta ** (-2m / (head_dim / 2))``. The class slot (position id -1) gets cos = sin = 0, so its query and key
vanish, exactly as the published models were trained.

Rotations are computed on the fly from positions, in float32, so any canvas size works without a table rebuild.
"""

from __future__ import annotations

import torch
from torch import nn

CLASS_POSITION = -1
POSITION_MODES = ("extrapolate", "interpolate")


class ARPGRotaryEmbedding2D(nn.Module):
    """Produces the cos / sin of the 2-D rotation for raster position ids on a token grid.

    Args:
        head_dim (`int`): per-head width, divisible by 4.
        grid_size (`tuple[int, int]`): the trained (height, width) in tokens.
        theta (`float`, *optional*, defaults to 10000.0): rotary base.
    """

    def __init__(self, head_dim: int, grid_size: tuple[int, int], theta: float = 10000.0):
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}.")
        self.head_dim = head_dim
        self.grid_size = tuple(grid_size)
        self.theta = theta
        self._tables = {}  # (height, width, position_mode, device) -> (cos, sin); see `table`

    def inverse_frequencies(self, device=None) -> torch.Tensor:
        """`w_m = 1 / theta ** (2m / (head_dim / 2))` for m < head_dim / 4, float32 of shape (head_dim / 4,).

        Computed on use rather than kept as a buffer, so that loading on the meta device leaves nothing to restore.
        """
        half = self.head_dim // 2
        exponents = torch.arange(0, half, 2, dtype=torch.float32, device=device)[: self.head_dim // 4] / half
        return 1.0 / (self.theta**exponents)

    def forward(
        self,
        position_ids: torch.LongTensor,
        grid_size: tuple[int, int] | None = None,
        position_mode: str = "extrapolate",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            position_ids (`torch.LongTensor` of shape `(batch, seq)`): raster positions `row * width + col` on the
                grid `grid_size`, or -1 for the class slot.
            grid_size (`tuple[int, int]`, *optional*): the (height, width) the positions refer to; defaults to the
                trained grid.
            position_mode (`str`, *optional*, defaults to `"extrapolate"`): for grids other than the trained one,
                "extrapolate" uses integer rows/cols as they are (beyond the trained range), "interpolate" scales them
                into the trained range.

        Returns:
            `(cos, sin)`, each float32 of shape `(batch, seq, head_dim / 2)`.
        """
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}.")
        height, width = self.grid_size if grid_size is None else tuple(grid_size)
        cos_table, sin_table = self.table((height, width), position_mode, position_ids.device)
        rows = torch.where(position_ids == CLASS_POSITION, height * width, position_ids)  # the class row is last
        return cos_table[rows], sin_table[rows]  # (B, N, Dh/2) each

    def table(self, grid_size: tuple[int, int], position_mode: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin of every raster position of `grid_size`, plus a last all-zero row for the class slot: float32
        `(height * width + 1, head_dim / 2)` each. Computed once per (grid, mode, device), so every position's
        rotation is computed once however many steps use it."""
        key = (*grid_size, position_mode, str(device))
        if key not in self._tables:
            with torch.inference_mode(False):  # a table made while sampling must serve training too
                self._tables[key] = self._compute_table(grid_size, position_mode, device)
        return self._tables[key]

    def _compute_table(self, grid_size, position_mode, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation of every raster position from its (row, col), as the class docstring states."""
        height, width = grid_size
        positions = torch.arange(height * width, device=device)
        rows = torch.div(positions, width, rounding_mode="floor").float()  # (L,)
        cols = (positions % width).float()  # (L,)
        if position_mode == "interpolate":
            rows = rows * (self.grid_size[0] / height)
            cols = cols * (self.grid_size[1] / width)
        inv_freq = self.inverse_frequencies(device)
        angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)  # (L, Dh/2)
        class_row = angles.new_zeros(1, angles.shape[1])
        return torch.cat([torch.cos(angles), class_row]), torch.cat([torch.sin(angles), class_row])


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs of `x` (batch, heads, seq, head_dim) by `cos` / `sin` (batch, seq, head_dim / 2).

    Computed in float32 and cast back to `x.dtype`.
    """
    batch, heads, seq, head_dim = x.shape
    pairs = x.float().reshape(batch, heads, seq, head_dim // 2, 2)  # (B, H, N, Dh/2, 2)
    x0, x1 = pairs.unbind(-1)  # each (B, H, N, Dh/2)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, N, Dh/2)
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)  # (B, H, N, Dh/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # (B, H, N, Dh)


def absolute_position_embedding(
    table: nn.Embedding,
    position_ids: torch.LongTensor,
    trained: tuple[int, int],
    grid_size: tuple[int, int] | None = None,
    position_mode: str = "extrapolate",
) -> torch.Tensor:
    """The learned absolute embedding (`table`, one row per position of the `trained` grid; see
    `ARPGConfig.absolute_position_embeddings`) of raster positions on `grid_size`, zero for the class slot (-1):
    `(batch, seq, hidden_size)`. Rows are read by calling `table`, so that offload hooks see every use.

    On the trained grid every position takes its own row of the table. On another canvas the table is read as an
    image over the trained (row, col) range: "interpolate" scales (row, col) into that range as the rotary
    embedding does and samples bilinearly; "extrapolate" keeps integer (row, col) and clamps them into it, so
    cells beyond the trained grid take the embedding of the nearest edge cell.
    """
    height, width = trained if grid_size is None else tuple(grid_size)
    positions = position_ids.clamp(min=0)  # the class slot is zeroed below
    if (height, width) == trained:
        embedding = table(positions)  # (B, N, D)
    else:
        coordinates = torch.stack([torch.div(positions, width, rounding_mode="floor"), positions % width]).float()
        if position_mode == "interpolate":
            scale = torch.tensor([trained[0] / height, trained[1] / width], device=positions.device)
            coordinates = coordinates * scale[:, None, None]
        limits = torch.tensor([trained[0] - 1, trained[1] - 1], device=positions.device)[:, None, None]
        coordinates = torch.minimum(coordinates, limits)  # (2, B, N): (row, col) in the trained range
        low = coordinates.floor().long()  # (2, B, N)
        high = torch.minimum(low + 1, limits)
        fraction = (coordinates - low).to(table.weight.dtype)[..., None]  # (2, B, N, 1)
        row_low, row_high = low[0] * trained[1], high[0] * trained[1]
        top = table(row_low + low[1]) * (1 - fraction[1]) + table(row_low + high[1]) * fraction[1]
        bottom = table(row_high + low[1]) * (1 - fraction[1]) + table(row_high + high[1]) * fraction[1]
        embedding = top * (1 - fraction[0]) + bottom * fraction[0]  # (B, N, D)
    return embedding.masked_fill((position_ids == CLASS_POSITION)[..., None], 0.0)
