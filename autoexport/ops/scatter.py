"""mmcv.ops.dynamic_scatter / DynamicScatter (CUDA-only in mmcv) in PyTorch.

mmcv's kernel (csrc/pytorch/cuda/scatter_points_cuda.cu) drops points with any negative coordinate, takes the
distinct coordinate rows sorted lexicographically (``unique_dim(..., sorted=True)``) and reduces the features of
each row's points by max, mean or sum. Rows are linearised with the per-column extents of the cloud, so sorting
the linear index is the lexicographic row sort (``ops.unique.sorted_unique``, which IREE can import); the voxel
count is data-dependent (an unbacked size under torch.export) but traces without a custom op.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .unique import sorted_unique

__all__ = ["dynamic_scatter", "dynamic_scatter_3d", "DynamicScatter", "MAX_VOXELS"]

MAX_VOXELS = 2**31 - 1


def dynamic_scatter(feats: Tensor, coors: Tensor, reduce_type: str = "max") -> tuple[Tensor, Tensor]:
    """Reduce point features per voxel: (voxel_feats (M, C), voxel_coors (M, D)) in lexicographic voxel order."""
    voxel_feats, voxel_coors, _ = _scatter_with_map(feats, coors, reduce_type)
    return voxel_feats, voxel_coors


def dynamic_scatter_3d(feats: Tensor, coors: Tensor, reduce_type: str = "max",
                       return_map: bool = False) -> tuple[Tensor, ...]:
    """mmdet3d's own ``dynamic_scatter_3d`` (models/data_preprocessors/voxelize.py, the same CUDA-only kernel):
    also returns point2voxel_map, each point's voxel row, -1 for points dropped for a negative coordinate (the
    kernel's unique-with-inverse, shifted past the dropped row)."""
    voxel_feats, voxel_coors, point2voxel_map = _scatter_with_map(feats, coors, reduce_type)
    return (voxel_feats, voxel_coors, point2voxel_map) if return_map else (voxel_feats, voxel_coors)


def _scatter_with_map(feats: Tensor, coors: Tensor, reduce_type: str) -> tuple[Tensor, Tensor, Tensor]:
    if reduce_type not in ("max", "mean", "sum"):
        raise ValueError(f"reduce_type must be 'max', 'mean' or 'sum', not {reduce_type!r}")
    kept = torch.nonzero((coors >= 0).all(dim=1)).squeeze(1)
    kept_coors = coors[kept].long()
    extents = coors.long().clamp(min=0).amax(dim=0) + 1
    linear = kept_coors[:, 0]
    for column in range(1, coors.shape[1]):
        linear = linear * extents[column] + kept_coors[:, column]
    unique_linear, voxel_of_point = sorted_unique(linear)
    num_voxels = unique_linear.shape[0]
    # A voxel count is an int32-indexable row count. Without a constant bound torch.export bounds it by the int64
    # maximum, a sparse conv after it multiplies that by its kernel volume, and torch.onnx cannot write the
    # overflowing bound into its runtime assertion.
    torch._check(num_voxels <= MAX_VOXELS)
    # And at least one: layers after it (BatchNorm1d in Cylinder3D's sparse blocks) guard on an empty input, which
    # torch.export cannot decide for an unbacked count. A cloud with no point in range has nothing to export.
    torch._check(num_voxels >= 1)

    columns = []
    remainder = unique_linear
    for column in range(coors.shape[1] - 1, 0, -1):
        columns.append(remainder % extents[column])
        remainder = remainder // extents[column]
    columns.append(remainder)
    voxel_coors = torch.stack(columns[::-1], dim=1).to(coors.dtype)

    kept_feats = feats[kept]
    channels = feats.shape[1]
    voxel_feats = feats.new_zeros((num_voxels, channels))
    if reduce_type == "max":
        index = voxel_of_point[:, None].expand(-1, channels)
        voxel_feats = voxel_feats.scatter_reduce(0, index, kept_feats, reduce="amax", include_self=False)
    else:
        voxel_feats = voxel_feats.index_add(0, voxel_of_point, kept_feats)
        if reduce_type == "mean":
            counts = torch.zeros(num_voxels, dtype=feats.dtype, device=feats.device)
            counts = counts.index_add(0, voxel_of_point, torch.ones_like(voxel_of_point, dtype=feats.dtype))
            voxel_feats = voxel_feats / counts[:, None]
    point2voxel_map = torch.full((coors.shape[0],), -1, dtype=torch.int64, device=coors.device)
    point2voxel_map = point2voxel_map.index_put((kept,), voxel_of_point.long())
    return voxel_feats, voxel_coors, point2voxel_map


class DynamicScatter(nn.Module):
    """Drop-in for mmcv.ops.DynamicScatter: coors of 3 columns (zyx) or 4 (batch, zyx).

    mmcv loops over the batch and concatenates; one lexicographic sort over (batch, z, y, x) gives the same order.
    """

    def __init__(self, voxel_size: Sequence[float], point_cloud_range: Sequence[float], average_points: bool) -> None:
        super().__init__()
        self.voxel_size = voxel_size
        self.point_cloud_range = point_cloud_range
        self.average_points = average_points

    def forward(self, points: Tensor, coors: Tensor) -> tuple[Tensor, Tensor]:
        return dynamic_scatter(points, coors, "mean" if self.average_points else "max")
