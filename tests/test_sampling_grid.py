"""sample_grid: the sample grid a person opens, enlarged nearest-neighbour to at least 256 px on its short side."""

import torch
from torchvision.utils import make_grid

from ddpm.sampling import sample_grid


def test_a_small_grid_is_enlarged_by_a_whole_factor_each_pixel_a_block():
    images = torch.rand(16, 3, 16, 16)
    grid = sample_grid(images)
    small = make_grid(images, nrow=4)  # 74 x 74
    assert small.shape == (3, 74, 74) and grid.shape == (3, 74 * 4, 74 * 4)  # 3 x 74 = 222 < 256 <= 296
    for dy in range(4):
        for dx in range(4):
            assert torch.equal(grid[:, dy::4, dx::4], small)


def test_the_short_side_sets_the_factor_and_a_large_grid_is_left_alone():
    grid = sample_grid(torch.rand(2, 1, 8, 8))  # 2 columns: 22 x 12, short side 12 -> factor 22
    assert grid.shape[1:] == (12 * 22, 22 * 22)
    large = torch.rand(4, 3, 128, 128)
    assert torch.equal(sample_grid(large), make_grid(large, nrow=2))
