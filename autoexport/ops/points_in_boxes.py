"""Point-in-rotated-box tests (mmcv.ops.points_in_boxes_part / _all / _cpu) and RoIAwarePool3d, in PyTorch.

Geometry follows mmcv's ``check_pt_in_box3d`` (csrc/pytorch/cpu/points_in_boxes.cpp and the CUDA kernels): boxes are
(x, y, z_bottom, x_size, y_size, z_size, yaw); a point is inside when ``|z - z_center| <= z_size / 2`` and its
rotated local x, y lie strictly within half the sizes. cos/sin are taken in float64 and rounded to float32, which is
what the C library gives mmcv's CPU kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["points_in_boxes_part", "points_in_boxes_all", "points_in_boxes_cpu", "RoIAwarePool3d", "roiaware_pool3d",
           "RoIPointPool3d", "roipoint_pool3d"]


def _local_coords(points: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In-box flags and local x, y of every (point, box) pair: points (..., M, 3), boxes (..., T, 7) -> (..., M, T)."""
    x, y, z = (points[..., :, None, axis] for axis in range(3))
    cx, cy, cz, x_size, y_size, z_size, yaw = (boxes[..., None, :, axis] for axis in range(7))
    z_center = cz + z_size / 2
    shift_x = x - cx
    shift_y = y - cy
    cos_a = torch.cos(-yaw.double()).to(points.dtype)
    sin_a = torch.sin(-yaw.double()).to(points.dtype)
    local_x = shift_x * cos_a + shift_y * (-sin_a)
    local_y = shift_x * sin_a + shift_y * cos_a
    half_x = x_size / 2
    half_y = y_size / 2
    inside = ((z - z_center).abs() <= z_size / 2) & (local_x > -half_x) & (local_x < half_x) \
        & (local_y > -half_y) & (local_y < half_y)
    return inside, local_x, local_y


def points_in_boxes_all(points: Tensor, boxes: Tensor) -> Tensor:
    """(B, M, T) int32: 1 where point m is inside box t (mmcv's points_in_boxes_all; CUDA-only in mmcv)."""
    inside, _, _ = _local_coords(points, boxes)
    return inside.to(torch.int32)


def points_in_boxes_cpu(points: Tensor, boxes: Tensor) -> Tensor:
    """mmcv's points_in_boxes_cpu: the same (B, M, T) flags as points_in_boxes_all."""
    return points_in_boxes_all(points, boxes)


_EAGER_PAIRS_PER_CHUNK = 1 << 24  # (point, box) pairs per eager chunk: 64 MB per float intermediate


def points_in_boxes_part(points: Tensor, boxes: Tensor) -> Tensor:
    """(B, M) int32: index of the first box containing each point, -1 for none (mmcv's CUDA kernel breaks at the
    first hit, so the lowest box index wins)."""
    if boxes.shape[1] == 0:
        return torch.full(points.shape[:2], -1, dtype=torch.int32, device=points.device)
    if not torch.compiler.is_compiling() and points.shape[1] * boxes.shape[1] > _EAGER_PAIRS_PER_CHUNK:
        # Host-side calls test every point against every box (PointRPNHead's NMS: 16384 x 16384 pairs, 1 GB per
        # float intermediate); in eager the boxes go in chunks, earlier chunks' hits kept (lowest index wins).
        found = torch.full(points.shape[:2], -1, dtype=torch.int32, device=points.device)
        step = max(1, _EAGER_PAIRS_PER_CHUNK // points.shape[1])
        for start in range(0, boxes.shape[1], step):
            hit = points_in_boxes_part(points, boxes[:, start:start + step])
            found = torch.where((found < 0) & (hit >= 0), hit + start, found)
        return found
    inside, _, _ = _local_coords(points, boxes)
    first = torch.argmax(inside.to(torch.int32), dim=2)  # argmax returns the first maximum
    return torch.where(inside.any(dim=2), first, torch.full_like(first, -1)).to(torch.int32)


_POOL_MODES = {0: "max", 1: "avg"}  # mmcv's RoIAwarePool3d stores its mode as these integers


def roiaware_pool3d(rois: Tensor, pts: Tensor, pts_feature: Tensor, out_size: int | tuple[int, int, int],
                    max_pts_per_voxel: int = 128, mode: str | int = "max", roi_batch: Tensor | None = None,
                    point_batch: Tensor | None = None) -> Tensor:
    """mmcv's RoIAwarePool3d forward: (R, out_x, out_y, out_z, C) max or mean of point features per RoI voxel.

    As in mmcv's kernel, each RoI voxel keeps its first ``max_pts_per_voxel - 1`` points in point order, voxel
    indices truncate toward zero and are clamped to the grid, and empty voxels are 0. ``mode`` is "max"/"avg" or
    mmcv's 0/1, so the drop-in's forward also runs on mmcv's module.

    With ``roi_batch`` (R,) and ``point_batch`` (P,), a RoI pools only the points of its own sample: the same as
    one call per sample on that sample's RoIs and points, without a loop over a data-dependent sample count.
    """
    mode = _POOL_MODES.get(mode, mode)
    out_x, out_y, out_z = (out_size,) * 3 if isinstance(out_size, int) else tuple(out_size)
    num_rois = rois.shape[0]
    num_cells = out_x * out_y * out_z
    inside, local_x, local_y = _local_coords(pts, rois)  # (P, R)
    inside, local_x, local_y = inside.T, local_x.T, local_y.T  # (R, P): mmcv walks points per RoI
    if roi_batch is not None and point_batch is not None:
        inside = inside & (roi_batch[:, None] == point_batch[None, :])
    x_size, y_size, z_size = (rois[:, axis, None] for axis in (3, 4, 5))
    local_z = pts[None, :, 2] - rois[:, 2, None]
    # float -> int conversion truncates toward zero, like the kernel's int(); inside points are >= 0 anyway.
    x_idx = torch.trunc((local_x + x_size / 2) / (x_size / out_x)).clamp(0, out_x - 1)
    y_idx = torch.trunc((local_y + y_size / 2) / (y_size / out_y)).clamp(0, out_y - 1)
    z_idx = torch.trunc(local_z / (z_size / out_z)).clamp(0, out_z - 1)
    cell = ((x_idx * out_y + y_idx) * out_z + z_idx).to(torch.int64)
    roi_index = torch.arange(num_rois, device=pts.device)[:, None]
    # One key per (RoI, cell); points outside every RoI get a spare key past the end.
    key = torch.where(inside, roi_index * num_cells + cell, torch.full_like(cell, num_rois * num_cells)).reshape(-1)

    # Rank of each point among the points of its (RoI, cell) in point order. Sorting (key, pair index) rather than
    # relying on a stable sort keeps the ONNX TopK translation exact.
    num_pairs = key.shape[0]
    pair_index = torch.arange(num_pairs, device=pts.device)
    order = torch.argsort(key * num_pairs + pair_index)
    counts = torch.zeros(num_rois * num_cells + 1, dtype=torch.int64, device=pts.device)
    counts = counts.index_add(0, key, torch.ones_like(key))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(key)
    rank[order] = pair_index - starts[key[order]]
    pooled_pairs = torch.nonzero((key < num_rois * num_cells) & (rank < max_pts_per_voxel - 1)).squeeze(1)
    target = key[pooled_pairs]
    # The pair's point, by lookup rather than `pair % num_points` (a symbolic-int remainder torch.onnx cannot take).
    point_of_pair = torch.arange(pts.shape[0], device=pts.device).expand(num_rois, -1).reshape(-1)
    features = pts_feature[point_of_pair[pooled_pairs]]

    channels = pts_feature.shape[1]
    index = target[:, None].expand(-1, channels)
    pooled = pts_feature.new_zeros((num_rois * num_cells, channels))
    if mode == "max":
        pooled = pooled.scatter_reduce(0, index, features, reduce="amax", include_self=False)
    elif mode == "avg":
        pooled = pooled.index_add(0, target, features)
        pooled = pooled / counts[:-1].clamp(min=1, max=max_pts_per_voxel - 1)[:, None].to(pooled.dtype)
    else:
        raise ValueError(f"mode must be 'max' or 'avg', not {mode!r}")
    return pooled.reshape(num_rois, out_x, out_y, out_z, channels)


class RoIAwarePool3d(nn.Module):
    """Drop-in for mmcv.ops.RoIAwarePool3d (forward only; CUDA-only in mmcv). Its forward reads the attributes mmcv's
    module has (out_size, max_pts_per_voxel, mode), so the export substitutes it on mmcv's modules."""

    def __init__(self, out_size: int | tuple[int, int, int], max_pts_per_voxel: int = 128, mode: str = "max") -> None:
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"mode must be 'max' or 'avg', not {mode!r}")
        self.out_size = out_size
        self.max_pts_per_voxel = max_pts_per_voxel
        self.mode = mode

    def forward(self, rois: Tensor, pts: Tensor, pts_feature: Tensor) -> Tensor:
        return roiaware_pool3d(rois, pts, pts_feature, self.out_size, self.max_pts_per_voxel, self.mode)


def roipoint_pool3d(points: Tensor, point_features: Tensor, boxes3d: Tensor,
                    num_sampled_points: int = 512) -> tuple[Tensor, Tensor]:
    """mmcv's RoIPointPool3d forward: for each box the first ``num_sampled_points`` points inside it (in point order),
    repeated cyclically when fewer are inside, as (xyz, features) rows; and a flag per box with no point inside.

    points (B, N, 3), point_features (B, N, C), boxes3d (B, M, 7) -> (B, M, S, 3 + C) and (B, M) int32. Rows of an
    empty box are 0, as mmcv leaves them. Fixed shapes throughout (no nonzero), so the box count can be dynamic.
    """
    num_points = points.shape[1]
    inside = _local_coords(points, boxes3d)[0].transpose(1, 2)  # (B, M, N), mmcv walks points per box
    rank = torch.cumsum(inside.to(torch.int64), dim=2) - 1  # each inside point's rank among its box's points
    count = inside.sum(dim=2).clamp(max=num_sampled_points)  # (B, M)
    # Slot r of a box receives the point of rank r; points past the last slot and outside points go to a spare slot.
    slot = torch.where(inside & (rank < num_sampled_points), rank, torch.full_like(rank, num_sampled_points))
    point_index = torch.arange(num_points, device=points.device).expand_as(slot)
    first_points = torch.zeros((*slot.shape[:2], num_sampled_points + 1), dtype=torch.int64, device=points.device)
    first_points = first_points.scatter(2, slot, point_index)[..., :num_sampled_points]
    # Fewer inside than slots: slot k repeats the point of rank k mod count, as the kernel duplicates them.
    wanted = torch.arange(num_sampled_points, device=points.device).expand_as(first_points)
    wanted = torch.remainder(wanted, count.clamp(min=1)[..., None])
    source = torch.gather(first_points, 2, wanted)  # (B, M, S) point indices
    rows = torch.cat([points, point_features], dim=2)  # (B, N, 3 + C)
    flat = source.reshape(source.shape[0], -1, 1).expand(-1, -1, rows.shape[2])
    pooled = torch.gather(rows, 1, flat).reshape(*source.shape, rows.shape[2])
    empty = count == 0
    pooled = torch.where(empty[..., None, None], torch.zeros_like(pooled), pooled)
    return pooled, empty.to(torch.int32)


class RoIPointPool3d(nn.Module):
    """Drop-in for mmcv.ops.RoIPointPool3d (forward only; CUDA-only in mmcv); reads mmcv's num_sampled_points."""

    def __init__(self, num_sampled_points: int = 512) -> None:
        super().__init__()
        self.num_sampled_points = num_sampled_points

    def forward(self, points: Tensor, point_features: Tensor, boxes3d: Tensor) -> tuple[Tensor, Tensor]:
        return roipoint_pool3d(points, point_features, boxes3d, self.num_sampled_points)
