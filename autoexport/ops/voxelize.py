"""Hard and dynamic voxelization with mmcv's semantics (mmcv/ops/voxelize.py, csrc/pytorch/cpu/voxelization.cpp).

Dynamic voxelization maps every point to its voxel coordinate, so its output has the input's size and it is plain
PyTorch. Hard voxelization returns as many voxels as the cloud occupies (at most ``max_voxels``): the custom op
``autoexport::hard_voxelize`` carries that data-dependent count (a fake kernel with an unbacked size), runs a
vectorized PyTorch kernel on any device and translates to standard ONNX ops (Unique with ``sorted=0`` yields voxels
in first-occurrence order, which is mmcv's order).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from onnxscript import INT32, INT64
from onnxscript import opset18 as op
from torch import Tensor, nn

__all__ = ["Voxelization", "voxelization", "dynamic_voxelize", "hard_voxelize", "hard_voxelize_onnx"]


def grid_size_of(voxel_size: Sequence[float], coors_range: Sequence[float]) -> list[int]:
    """Grid size (x, y, z) exactly as mmcv's kernel computes it: float32 arithmetic, C ``round`` (half away)."""
    low = np.asarray(coors_range[:3], dtype=np.float32)
    high = np.asarray(coors_range[3:6], dtype=np.float32)
    extent = (high - low) / np.asarray(voxel_size, dtype=np.float32)
    return [int(math.floor(float(e) + 0.5)) for e in extent]


def _cells_xyz(points: Tensor, voxel_size: Sequence[float], coors_range: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Per-point integer cell (x, y, z) and whether it lies inside the grid.

    mmcv passes voxel_size and coors_range through float32 tensors and divides (no reciprocal multiply), so the
    same float32 subtract-then-divide is needed for bit-identical floors on points near voxel borders.
    """
    low = torch.tensor(coors_range[:3], dtype=torch.float32, device=points.device).to(points.dtype)
    size = torch.tensor(voxel_size, dtype=torch.float32, device=points.device).to(points.dtype)
    grid = torch.tensor(grid_size_of(voxel_size, coors_range), dtype=torch.int64, device=points.device)
    cells = torch.floor((points[:, :3] - low) / size).to(torch.int64)
    inside = ((cells >= 0) & (cells < grid)).all(dim=1)
    return cells, inside


def dynamic_voxelize(points: Tensor, voxel_size: Sequence[float], coors_range: Sequence[float]) -> Tensor:
    """mmcv dynamic voxelization: (N, 3) int32 voxel coordinates (z, y, x) per point, -1 rows for points outside."""
    cells, inside = _cells_xyz(points, voxel_size, coors_range)
    coors_zyx = cells.flip(1)
    return torch.where(inside[:, None], coors_zyx, torch.full_like(coors_zyx, -1)).to(torch.int32)


@torch.library.custom_op("autoexport::hard_voxelize", mutates_args=())
def hard_voxelize(points: Tensor, voxel_size: Sequence[float], coors_range: Sequence[float], max_points: int,
                  max_voxels: int) -> tuple[Tensor, Tensor, Tensor]:
    """mmcv hard voxelization (deterministic): voxels (M, max_points, C), coors (M, 3) int32 zyx, num_points (M,) int32.

    Voxels are numbered in order of their first point, points fill a voxel in input order, voxels past
    ``max_voxels`` and points past ``max_points`` are dropped, as in mmcv's CPU kernel.
    """
    cells, inside = _cells_xyz(points, voxel_size, coors_range)
    grid_x, grid_y, _ = grid_size_of(voxel_size, coors_range)
    point_ids = torch.nonzero(inside).squeeze(1)
    cells = cells[point_ids]
    linear = (cells[:, 2] * grid_y + cells[:, 1]) * grid_x + cells[:, 0]

    _, sorted_voxel_of_point, counts_sorted = torch.unique(linear, return_inverse=True, return_counts=True)
    num_unique = counts_sorted.shape[0]
    position = torch.arange(point_ids.shape[0], device=points.device)
    first_point = torch.full((num_unique,), point_ids.shape[0], dtype=torch.int64, device=points.device)
    first_point = first_point.scatter_reduce(0, sorted_voxel_of_point, position, reduce="amin")
    # Rank voxels by their first point: that is mmcv's voxel numbering.
    voxel_order = torch.argsort(first_point)
    rank_of_sorted = torch.empty_like(voxel_order)
    rank_of_sorted[voxel_order] = torch.arange(num_unique, device=points.device)
    voxel_of_point = rank_of_sorted[sorted_voxel_of_point]
    counts = counts_sorted[voxel_order]

    # Slot of each point inside its voxel: its rank among the voxel's points in input order.
    by_voxel = torch.argsort(voxel_of_point * max(point_ids.shape[0], 1) + position)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(position)
    slot[by_voxel] = position - starts[voxel_of_point[by_voxel]]

    num_voxels = min(num_unique, max_voxels)
    kept = torch.nonzero((voxel_of_point < max_voxels) & (slot < max_points)).squeeze(1)
    voxels = points.new_zeros((num_voxels, max_points, points.shape[1]))
    voxels[voxel_of_point[kept], slot[kept]] = points[point_ids[kept]]
    coors = cells[first_point[voxel_order[:num_voxels]]].flip(1).to(torch.int32)
    num_points = counts[:num_voxels].clamp(max=max_points).to(torch.int32)
    return voxels, coors, num_points


@hard_voxelize.register_fake
def _hard_voxelize_fake(points: Tensor, voxel_size: Sequence[float], coors_range: Sequence[float], max_points: int,
                        max_voxels: int) -> tuple[Tensor, Tensor, Tensor]:
    num_voxels = torch.library.get_ctx().new_dynamic_size(min=0, max=max_voxels)
    return (points.new_empty((num_voxels, max_points, points.shape[1])),
            points.new_empty((num_voxels, 3), dtype=torch.int32),
            points.new_empty((num_voxels,), dtype=torch.int32))


def _int64(values: Sequence[int]):
    return op.Constant(value_ints=list(values))


def hard_voxelize_onnx(points, voxel_size: Sequence[float], coors_range: Sequence[float], max_points: int,
                       max_voxels: int):
    """ONNX translation of ``autoexport::hard_voxelize`` from standard opset-18 ops (no custom domain)."""
    grid_x, grid_y, grid_z = grid_size_of(voxel_size, coors_range)
    low = op.CastLike(op.Constant(value_floats=[float(np.float32(v)) for v in coors_range[:3]]), points)
    size = op.CastLike(op.Constant(value_floats=[float(np.float32(v)) for v in voxel_size]), points)
    xyz = op.Slice(points, _int64([0]), _int64([3]), _int64([1]))
    cells = op.Cast(op.Floor(op.Div(op.Sub(xyz, low), size)), to=INT64.dtype)
    inside_axes = op.And(op.GreaterOrEqual(cells, _int64([0])), op.Less(cells, _int64([grid_x, grid_y, grid_z])))
    inside = op.Equal(op.ReduceMin(op.Cast(inside_axes, to=INT64.dtype), _int64([1]), keepdims=0),
                      op.Constant(value_int=1))
    point_ids = op.Reshape(op.NonZero(inside), _int64([-1]))
    cells = op.Gather(cells, point_ids, axis=0)
    cell_x = op.Gather(cells, op.Constant(value_int=0), axis=1)
    cell_y = op.Gather(cells, op.Constant(value_int=1), axis=1)
    cell_z = op.Gather(cells, op.Constant(value_int=2), axis=1)
    linear = op.Add(op.Mul(op.Add(op.Mul(cell_z, op.Constant(value_int=grid_y)), cell_y),
                           op.Constant(value_int=grid_x)), cell_x)
    # sorted=0: unique values in order of first occurrence, i.e. mmcv's voxel order.
    _, first_point, voxel_of_point, counts = op.Unique(linear, sorted=0)

    num_valid = op.Shape(point_ids)
    position = op.Range(op.Constant(value_int=0), op.Squeeze(num_valid), op.Constant(value_int=1))
    key = op.Add(op.Mul(voxel_of_point, op.Max(num_valid, _int64([1]))), position)
    _, by_voxel = op.TopK(key, num_valid, largest=0, sorted=1)
    starts = op.CumSum(counts, op.Constant(value_int=0), exclusive=1)
    slot_sorted = op.Sub(position, op.Gather(starts, op.Gather(voxel_of_point, by_voxel)))
    slot = op.ScatterElements(position, by_voxel, slot_sorted)

    num_voxels = op.Min(op.Shape(counts), _int64([max_voxels]))
    kept = op.Reshape(op.NonZero(op.And(op.Less(voxel_of_point, op.Constant(value_int=max_voxels)),
                                        op.Less(slot, op.Constant(value_int=max_points)))), _int64([-1]))
    targets = op.Concat(op.Unsqueeze(op.Gather(voxel_of_point, kept), _int64([1])),
                        op.Unsqueeze(op.Gather(slot, kept), _int64([1])), axis=1)
    values = op.Gather(points, op.Gather(point_ids, kept), axis=0)
    voxels_shape = op.Concat(num_voxels, _int64([max_points]), op.Slice(op.Shape(points), _int64([1]), _int64([2])),
                             axis=0)
    voxels = op.ScatterND(op.Expand(op.CastLike(op.Constant(value_float=0.0), points), voxels_shape), targets, values)

    first_kept = op.Slice(first_point, _int64([0]), num_voxels)
    coors = op.Cast(op.Gather(op.Concat(op.Unsqueeze(cell_z, _int64([1])), op.Unsqueeze(cell_y, _int64([1])),
                                        op.Unsqueeze(cell_x, _int64([1])), axis=1), first_kept, axis=0),
                    to=INT32.dtype)
    num_points = op.Cast(op.Min(op.Slice(counts, _int64([0]), num_voxels), op.Constant(value_int=max_points)),
                         to=INT32.dtype)
    return voxels, coors, num_points


def voxelization(points: Tensor, voxel_size: Sequence[float], coors_range: Sequence[float], max_points: int = 35,
                 max_voxels: int = 20000, deterministic: bool = True) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Drop-in for ``mmcv.ops.voxelization``: dynamic when max_points or max_voxels is -1, else hard.

    ``deterministic`` is accepted for signature compatibility; the result is always mmcv's deterministic order.
    """
    del deterministic
    if max_points == -1 or max_voxels == -1:
        return dynamic_voxelize(points, voxel_size, coors_range)
    return torch.ops.autoexport.hard_voxelize(points, list(map(float, voxel_size)), list(map(float, coors_range)),
                                              max_points, max_voxels)


class Voxelization(nn.Module):
    """Drop-in for ``mmcv.ops.Voxelization`` (same constructor, same outputs)."""

    def __init__(self, voxel_size: Sequence[float], point_cloud_range: Sequence[float], max_num_points: int,
                 max_voxels: int | tuple[int, int] = 20000, deterministic: bool = True) -> None:
        super().__init__()
        self.voxel_size = list(voxel_size)
        self.point_cloud_range = list(point_cloud_range)
        self.max_num_points = max_num_points
        self.max_voxels = tuple(max_voxels) if isinstance(max_voxels, (tuple, list)) else (max_voxels, max_voxels)
        self.deterministic = deterministic
        grid = grid_size_of(self.voxel_size, self.point_cloud_range)
        self.grid_size = torch.tensor(grid, dtype=torch.int64)
        self.pcd_shape = [*grid[:2], 1][::-1]

    def forward(self, points: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        max_voxels = self.max_voxels[0] if self.training else self.max_voxels[1]
        return voxelization(points, self.voxel_size, self.point_cloud_range, self.max_num_points, max_voxels,
                            self.deterministic)
