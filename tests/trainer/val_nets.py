"""Stand-in networks for validation tests, importable by the torchrun workers too (imports
nothing from the tests)."""

from __future__ import annotations

import torch
from torch import nn


class LocalMean(nn.Module):
    """Classes by the mean of band 0 over the 7x7 window around each pixel, within the input:
    like any network's, its output near a tile's edge depends on what lies beyond the edge.
    Each pixel's output is its own tile's alone: the same in any batch, on any rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dataio.fixtures import ALIGNED_LEVELS, ALIGNED_P98

        m = nn.functional.avg_pool2d(x[:, :1], 7, stride=1, padding=3, count_include_pad=False)
        levels = torch.tensor(ALIGNED_LEVELS, dtype=x.dtype) / ALIGNED_P98[0]
        return -((m - levels.view(1, 3, 1, 1)) * 20) ** 2
