import math

import pytest
import torch

from arpg_hf.rotary_2d import CLASS_POSITION, ARPGRotaryEmbedding2D, apply_rotary_2d


def reference_table(head_dim, grid, theta=10000.0):
    """The published table, written out as the parity README states it: row 0 = class slot, row p+1 = position p."""
    quarter = head_dim // 4
    table = torch.zeros(1 + grid * grid, head_dim // 2, 2, dtype=torch.float64)
    for p in range(grid * grid):
        row, col = divmod(p, grid)
        for k in range(head_dim // 2):
            frequency = 1.0 / theta ** (2 * (k % quarter) / (head_dim / 2))
            angle = (row if k < quarter else col) * frequency
            table[p + 1, k] = torch.tensor([math.cos(angle), math.sin(angle)])
    return table


def test_rotations_match_the_published_table():
    rotary = ARPGRotaryEmbedding2D(head_dim=16, grid_size=(8, 8))
    positions = torch.cat([torch.tensor([CLASS_POSITION]), torch.arange(64)])[None]
    cos, sin = rotary(positions)
    table = reference_table(16, 8)
    torch.testing.assert_close(cos[0].double(), table[..., 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0].double(), table[..., 1], atol=1e-6, rtol=0)
    assert cos.dtype == torch.float32
    assert torch.count_nonzero(cos[0, 0]) == torch.count_nonzero(sin[0, 0]) == 0  # class slot


def test_interleaved_pairs_rotate_like_complex_numbers():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=generator)
    angles = torch.randn(2, 5, 4, generator=generator)
    rotated = apply_rotary_2d(x, angles.cos(), angles.sin())
    expected = torch.view_as_real(
        torch.view_as_complex(x.reshape(2, 3, 5, 4, 2)) * torch.polar(torch.ones_like(angles), angles)[:, None]
    )
    torch.testing.assert_close(rotated, expected.flatten(-2), atol=1e-6, rtol=0)
    assert apply_rotary_2d(x.bfloat16(), angles.cos(), angles.sin()).dtype == torch.bfloat16


def test_class_slot_vanishes():
    rotary = ARPGRotaryEmbedding2D(head_dim=8, grid_size=(4, 4))
    cos, sin = rotary(torch.tensor([[CLASS_POSITION, 5]]))
    rotated = apply_rotary_2d(torch.ones(1, 1, 2, 8), cos, sin)
    assert torch.count_nonzero(rotated[0, 0, 0]) == 0 and torch.count_nonzero(rotated[0, 0, 1]) > 0


def test_other_grids_extrapolate_or_interpolate():
    rotary = ARPGRotaryEmbedding2D(head_dim=8, grid_size=(4, 4))
    # Position 21 on a 8x8 grid is row 2, col 5 (beyond the trained 4 columns).
    extrapolated, _ = rotary(torch.tensor([[21]]), grid_size=(8, 8))
    on_trained_grid = reference_table(8, 8)[22, :, 0].float()
    torch.testing.assert_close(extrapolated[0, 0], on_trained_grid, atol=1e-6, rtol=0)
    # Interpolation scales (row, col) = (2, 5) on 8x8 into the trained 4x4 range: (1, 2.5).
    interpolated, _ = rotary(torch.tensor([[21]]), grid_size=(8, 8), position_mode="interpolate")
    frequencies = 1.0 / 10000.0 ** (torch.arange(2) * 2 / 4)
    expected = torch.cat([(1.0 * frequencies).cos(), (2.5 * frequencies).cos()])
    torch.testing.assert_close(interpolated[0, 0], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="extrapolate"):
        rotary(torch.tensor([[0]]), position_mode="stretch")
