"""BEVFusion's BEV pooling (mmdet3d projects/BEVFusion, bevfusion/ops/bev_pool) in plain PyTorch.

The project's kernel (src/bev_pool_cuda.cu, `bev_pool_kernel`) is CUDA-only: after the camera frustum points are
sorted by their BEV cell, one thread per (interval of equal cells, channel) sums the interval's features in order
and *assigns* the sum to out[b, z, x, y, c] of a (B, D, H, W, C) map, where a point's coordinates are
geom_feats = (x, y, z, b). Cells no point falls in stay zero.

Two entry points:
- `bev_pool_forward` has the compiled extension's signature (`bev_pool_ext.bev_pool_forward`), so the project's
  `bev_pool` imports and runs on a machine without CUDA. Per interval it sums in the same order as the kernel.
- `bev_pool` replaces the project's `bev_pool` function in the export: a sum into each point's cell needs neither
  the sort nor the data-dependent interval boundaries (`torch.where` of a mask), so it traces with a dynamic point
  count and exports to ONNX as one ScatterND with add reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bev_pool", "bev_pool_forward", "bev_pool_backward", "bev_cell_index"]


def bev_cell_index(coords: Tensor, D: int, H: int, W: int) -> Tensor:
    """Row of each point's cell in the flattened (B, D, H, W) map; coords columns are (x, y, z, b)."""
    coords = coords.long()
    return ((coords[:, 3] * D + coords[:, 2]) * H + coords[:, 0]) * W + coords[:, 1]


def bev_pool(feats: Tensor, coords: Tensor, B: int, D: int, H: int, W: int) -> Tensor:
    """The project's `bev_pool(feats, coords, B, D, H, W)`: (N, C) features summed per cell -> (B, C, D, H, W)."""
    channels = feats.shape[1]
    out = feats.new_zeros(B * D * H * W, channels).index_add(0, bev_cell_index(coords, D, H, W), feats)
    return out.view(B, D, H, W, channels).permute(0, 4, 1, 2, 3).contiguous()


def _interval_of_point(interval_starts: Tensor, interval_lengths: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Interval id of every point, and whether the point lies inside an interval (the kernel reads no others)."""
    starts = interval_starts.long()
    position = torch.arange(n, device=starts.device)
    interval = torch.searchsorted(starts, position, right=True) - 1
    clamped = interval.clamp(min=0)
    inside = (interval >= 0) & (position < starts[clamped] + interval_lengths.long()[clamped])
    return clamped, inside


def bev_pool_forward(x: Tensor, geom_feats: Tensor, interval_lengths: Tensor, interval_starts: Tensor,
                     B: int, D: int, H: int, W: int) -> Tensor:
    """`bev_pool_ext.bev_pool_forward`: (B, D, H, W, C) map; each interval's features summed in order, assigned to
    the cell of the interval's first point."""
    n, channels = x.shape
    interval, inside = _interval_of_point(interval_starts, interval_lengths, n)
    sums = x.new_zeros(len(interval_starts), channels).index_add(0, interval[inside], x[inside])
    out = x.new_zeros(B * D * H * W, channels)
    out[bev_cell_index(geom_feats[interval_starts.long()], D, H, W)] = sums
    return out.view(B, D, H, W, channels)


def bev_pool_backward(out_grad: Tensor, geom_feats: Tensor, interval_lengths: Tensor, interval_starts: Tensor,
                      B: int, D: int, H: int, W: int) -> Tensor:
    """`bev_pool_ext.bev_pool_backward`: every point of an interval gets the gradient of the interval's cell."""
    n = geom_feats.shape[0]
    channels = out_grad.shape[-1]
    interval, inside = _interval_of_point(interval_starts, interval_lengths, n)
    cells = bev_cell_index(geom_feats[interval_starts.long()], D, H, W)
    grad = out_grad.reshape(-1, channels)[cells][interval]
    return torch.where(inside[:, None], grad, torch.zeros_like(grad))
