"""mmcv.ops.dynamic_scatter / DynamicScatter (CUDA-only in mmcv) in PyTorch.

mmcv's kernel (csrc/pytorch/cuda/scatter_points_cuda.cu) drops points with any negative coordinate, takes the
distinct coordinate rows sorted lexicographically (``unique_dim(..., sorted=True)``) and reduces the features of
each row's points by max, mean or sum. Rows are linearised with the per-column extents of the cloud, so sorting
the linear index is the lexicographic row sort (``ops.unique.sorted_unique``, which IREE can import); the voxel
count is data-dependent (an unbacked size under torch.export) but traces without a custom op.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from .unique import sorted_runs

__all__ = ["dynamic_scatter", "dynamic_scatter_3d", "DynamicScatter", "MAX_VOXELS", "MaxBy"]

MAX_VOXELS = 2**31 - 1
# How a voxel's max is taken: one reducing scatter (ONNX ScatterElements reduction=max, which ONNX Runtime runs)
# or a scan over the sorted points (gathers only: IREE 3.13 cannot import a reducing ScatterElements).
MaxBy = Literal["scatter", "scan"]
SCAN_STEPS = 31  # 2**31 rows: more than any voxel can hold


def dynamic_scatter(feats: Tensor, coors: Tensor, reduce_type: str = "max",
                    max_by: MaxBy = "scatter") -> tuple[Tensor, Tensor]:
    """Reduce point features per voxel: (voxel_feats (M, C), voxel_coors (M, D)) in lexicographic voxel order."""
    voxel_feats, voxel_coors, _ = _scatter_with_map(feats, coors, reduce_type, max_by)
    return voxel_feats, voxel_coors


def dynamic_scatter_3d(feats: Tensor, coors: Tensor, reduce_type: str = "max",
                       return_map: bool = False) -> tuple[Tensor, ...]:
    """mmdet3d's own ``dynamic_scatter_3d`` (models/data_preprocessors/voxelize.py, the same CUDA-only kernel):
    also returns point2voxel_map, each point's voxel row, -1 for points dropped for a negative coordinate (the
    kernel's unique-with-inverse, shifted past the dropped row)."""
    voxel_feats, voxel_coors, point2voxel_map = _scatter_with_map(feats, coors, reduce_type)
    return (voxel_feats, voxel_coors, point2voxel_map) if return_map else (voxel_feats, voxel_coors)


def _run_max_by_scan(sorted_feats: Tensor, run_of_sorted: Tensor, run_length: Tensor) -> Tensor:
    """Max of each run of consecutive rows: an inclusive scan (log-step gathers and maxima), then each run's last
    row. A source index clamped to row 0 only counts when row 0 is in the same run, and max is idempotent."""
    positions = torch.arange(sorted_feats.shape[0], device=sorted_feats.device)
    running = sorted_feats
    for step in range(SCAN_STEPS):
        source = (positions - (1 << step)).clamp(min=0)
        same_run = (run_of_sorted[source] == run_of_sorted)[:, None]
        running = torch.where(same_run, torch.maximum(running, running[source]), running)
    return running[torch.cumsum(run_length, dim=0) - 1]


def _run_lengths(run_of_sorted: Tensor, num_runs: int) -> Tensor:
    """Points per voxel (only the mean and the scan need it; sum and the scattered max do not)."""
    counts = torch.zeros(num_runs, dtype=torch.int64, device=run_of_sorted.device)
    return counts.index_add(0, run_of_sorted, torch.ones_like(run_of_sorted))


def _scatter_with_map(feats: Tensor, coors: Tensor, reduce_type: str,
                      max_by: MaxBy = "scatter") -> tuple[Tensor, Tensor, Tensor]:
    if reduce_type not in ("max", "mean", "sum"):
        raise ValueError(f"reduce_type must be 'max', 'mean' or 'sum', not {reduce_type!r}")
    kept = torch.nonzero((coors >= 0).all(dim=1)).squeeze(1)
    kept_coors = coors[kept].long()
    extents = coors.long().clamp(min=0).amax(dim=0) + 1
    linear = kept_coors[:, 0]
    for column in range(1, coors.shape[1]):
        linear = linear * extents[column] + kept_coors[:, column]
    unique_linear, voxel_of_point, order, run_of_sorted = sorted_runs(linear)
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

    # Reduced over the points in sorted order, indexed by run_of_sorted (a cumsum), not by voxel_of_point (the
    # sort's permutation scattered back): IREE 3.13 miscompiles a scatter-add indexed by another scatter's result
    # (wrong voxels, heap corruption). Only the order of a voxel's sum changes; mmcv's CUDA kernel adds with
    # atomics, in no fixed order either.
    sorted_feats = feats[kept][order]
    channels = feats.shape[1]
    if reduce_type == "max" and max_by == "scan":
        voxel_feats = _run_max_by_scan(sorted_feats, run_of_sorted, _run_lengths(run_of_sorted, num_voxels))
    elif reduce_type == "max":
        index = run_of_sorted[:, None].expand(-1, channels)
        voxel_feats = feats.new_zeros((num_voxels, channels))
        voxel_feats = voxel_feats.scatter_reduce(0, index, sorted_feats, reduce="amax", include_self=False)
    else:
        voxel_feats = feats.new_zeros((num_voxels, channels)).index_add(0, run_of_sorted, sorted_feats)
        if reduce_type == "mean":
            voxel_feats = voxel_feats / _run_lengths(run_of_sorted, num_voxels)[:, None].to(feats.dtype)
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

    def forward(self, points: Tensor, coors: Tensor, max_by: MaxBy = "scatter") -> tuple[Tensor, Tensor]:
        return dynamic_scatter(points, coors, "mean" if self.average_points else "max", max_by)
