"""Point-cloud sampling and grouping ops that mmcv only has for CUDA, in PyTorch.

Semantics come from mmcv's CUDA kernels (csrc/common/cuda/*_cuda_kernel.cuh):

- furthest_point_sample: starts at index 0; each step takes the point furthest (squared distance) from the chosen
  set, distances start at 1e10. Sequential by nature, so it is a custom op (``autoexport::furthest_point_sample``)
  with a PyTorch loop over samples (vectorised over batch and points), a static-shape fake kernel and an ONNX
  ``Loop`` translation; a Python loop traced by torch.export would unroll into thousands of nodes.
- ball_query: the first ``sample_num`` points (in point order) with ``d2 == 0 or min_r^2 <= d2 < max_r^2``; slots
  past the hits repeat the first hit; no hit gives index 0.
- knn: the k nearest by squared distance in ascending order, transposed to (B, k, npoint); missing neighbours
  (fewer than k points) are index 0, as the kernel's heap starts filled with (1e10, 0).
- three_nn: the 3 nearest, ties to the lower index (strict ``<`` updates), distances square-rooted.
- gather_points, grouping_operation, three_interpolate: gathers; three_interpolate sums w0*f0 + w1*f1 + w2*f2 in
  that order.

Squared distances are ``(dx*dx + dy*dy) + dz*dz`` in the kernels' order. Ties between equal distances are where the
CUDA kernels can disagree with these implementations: FPS reduces across threads, knn keeps a heap; both are
documented as such in docs/research/op_library.md.
"""

from __future__ import annotations

import numpy as np
import onnxscript
import torch
from onnxscript import FLOAT, INT32
from onnxscript import opset18 as op
from torch import Tensor

__all__ = ["furthest_point_sample", "furthest_point_sample_with_dist", "furthest_point_sample_onnx",
           "furthest_point_sample_with_dist_onnx", "ball_query", "knn", "three_nn", "three_interpolate",
           "gather_points", "grouping_operation"]

_FPS_INITIAL_DISTANCE = 1e10


def _square_distance(centers: Tensor, points: Tensor) -> Tensor:
    """(B, M, N) squared distances between centers (B, M, 3) and points (B, N, 3), summed in the kernels' order."""
    dx = centers[:, :, None, 0] - points[:, None, :, 0]
    dy = centers[:, :, None, 1] - points[:, None, :, 1]
    dz = centers[:, :, None, 2] - points[:, None, :, 2]
    return dx * dx + dy * dy + dz * dz


def _fps_from_rows(distance_row, batch: int, num_points_in: int, num_samples: int, like: Tensor) -> Tensor:
    """FPS driven by ``distance_row(last_index) -> (B, N)`` distances from the last pick to every point."""
    nearest = like.new_full((batch, num_points_in), _FPS_INITIAL_DISTANCE)
    last = torch.zeros(batch, dtype=torch.int64, device=like.device)
    picks = [last]
    for _ in range(num_samples - 1):
        nearest = torch.minimum(nearest, distance_row(last))
        last = torch.argmax(nearest, dim=1)  # first maximum on ties
        picks.append(last)
    return torch.stack(picks, dim=1).to(torch.int32)


@torch.library.custom_op("autoexport::furthest_point_sample", mutates_args=())
def furthest_point_sample(points_xyz: Tensor, num_points: int) -> Tensor:
    """(B, num_points) int32 indices of furthest point sampling over points_xyz (B, N, 3)."""
    batch, num_in, _ = points_xyz.shape
    if num_points <= 0:
        return torch.zeros((batch, 0), dtype=torch.int32, device=points_xyz.device)
    rows = torch.arange(batch, device=points_xyz.device)

    def distance_from(last: Tensor) -> Tensor:
        return _square_distance(points_xyz[rows, last][:, None], points_xyz)[:, 0]

    return _fps_from_rows(distance_from, batch, num_in, num_points, points_xyz)


@furthest_point_sample.register_fake
def _furthest_point_sample_fake(points_xyz: Tensor, num_points: int) -> Tensor:
    return points_xyz.new_empty((points_xyz.shape[0], max(num_points, 0)), dtype=torch.int32)


@torch.library.custom_op("autoexport::furthest_point_sample_with_dist", mutates_args=())
def furthest_point_sample_with_dist(points_dist: Tensor, num_points: int) -> Tensor:
    """(B, num_points) int32 indices of FPS over a precomputed (B, N, N) distance matrix."""
    batch, num_in, _ = points_dist.shape
    if num_points <= 0:
        return torch.zeros((batch, 0), dtype=torch.int32, device=points_dist.device)
    rows = torch.arange(batch, device=points_dist.device)
    return _fps_from_rows(lambda last: points_dist[rows, last], batch, num_in, num_points, points_dist)


@furthest_point_sample_with_dist.register_fake
def _furthest_point_sample_with_dist_fake(points_dist: Tensor, num_points: int) -> Tensor:
    return points_dist.new_empty((points_dist.shape[0], max(num_points, 0)), dtype=torch.int32)


@onnxscript.script()
def furthest_point_sample_onnx(points_xyz: FLOAT, num_points: int) -> INT32:
    """ONNX translation of ``autoexport::furthest_point_sample``: a Loop over samples (standard ops only)."""
    shape = op.Shape(points_xyz)
    batch = op.Slice(shape, [0], [1])
    batch_by_one = op.Concat(batch, [1], axis=0)
    nearest = op.Expand(op.Constant(value_float=1e10), op.Slice(shape, [0], [2]))
    last = op.Expand(op.Constant(value_ints=[0]), batch_by_one)
    picks = op.Expand(op.Constant(value_ints=[0]), op.Concat(batch, op.Reshape(num_points, [1]), axis=0))
    x = op.Gather(points_xyz, 0, axis=2)
    y = op.Gather(points_xyz, 1, axis=2)
    z = op.Gather(points_xyz, 2, axis=2)
    steps = num_points - 1
    for step in range(steps):
        dx = op.Sub(op.GatherElements(x, last, axis=1), x)
        dy = op.Sub(op.GatherElements(y, last, axis=1), y)
        dz = op.Sub(op.GatherElements(z, last, axis=1), z)
        distance = op.Add(op.Add(op.Mul(dx, dx), op.Mul(dy, dy)), op.Mul(dz, dz))
        nearest = op.Min(nearest, distance)
        last = op.ArgMax(nearest, axis=1, keepdims=1)
        column = op.Expand(op.Reshape(step + 1, [1, 1]), batch_by_one)
        picks = op.ScatterElements(picks, column, last, axis=1)
    return op.Cast(picks, to=INT32.dtype)


@onnxscript.script()
def furthest_point_sample_with_dist_onnx(points_dist: FLOAT, num_points: int) -> INT32:
    """ONNX translation of ``autoexport::furthest_point_sample_with_dist``."""
    shape = op.Shape(points_dist)
    batch = op.Slice(shape, [0], [1])
    batch_by_one = op.Concat(batch, [1], axis=0)
    nearest = op.Expand(op.Constant(value_float=1e10), op.Slice(shape, [0], [2]))
    last = op.Expand(op.Constant(value_ints=[0]), batch_by_one)
    picks = op.Expand(op.Constant(value_ints=[0]), op.Concat(batch, op.Reshape(num_points, [1]), axis=0))
    row_shape = op.Concat(batch, [1], op.Slice(shape, [2], [3]), axis=0)
    steps = num_points - 1
    for step in range(steps):
        rows = op.Expand(op.Unsqueeze(last, [2]), row_shape)
        distance = op.Squeeze(op.GatherElements(points_dist, rows, axis=1), [1])
        nearest = op.Min(nearest, distance)
        last = op.ArgMax(nearest, axis=1, keepdims=1)
        column = op.Expand(op.Reshape(step + 1, [1, 1]), batch_by_one)
        picks = op.ScatterElements(picks, column, last, axis=1)
    return op.Cast(picks, to=INT32.dtype)


def _float32_square(value: float) -> float:
    """``r * r`` as the kernel computes it: the radius is a C float, squared in float."""
    radius = np.float32(value)
    return float(radius * radius)


def _sample_of_rows(counts: Tensor, num_rows: int) -> Tensor:
    """Sample index of each row of a stacked tensor (rows of sample 0, then of sample 1, ...; ``counts`` per
    sample): the first sample whose cumulative count exceeds the row, as the stacked kernels search, capped at the
    last sample."""
    ends = torch.cumsum(counts.long(), dim=0)
    rows = torch.arange(num_rows, device=counts.device)
    return (rows[:, None] >= ends[None, :]).sum(dim=1).clamp(max=counts.shape[0] - 1)


def _first_rows(counts: Tensor) -> Tensor:
    """Row of each sample's first entry in a stacked tensor (exclusive cumulative count)."""
    return torch.cumsum(counts.long(), dim=0) - counts.long()


def ball_query(min_radius: float, max_radius: float, sample_num: int, xyz: Tensor, center_xyz: Tensor,
               xyz_batch_cnt: Tensor | None = None, center_xyz_batch_cnt: Tensor | None = None) -> Tensor:
    """mmcv.ops.ball_query: (B, npoint, sample_num) int32 indices into xyz (B, N, 3); with both batch counts, the
    stacked form (stack_ball_query)."""
    if xyz_batch_cnt is not None and center_xyz_batch_cnt is not None:
        return stack_ball_query(max_radius, sample_num, xyz, center_xyz, xyz_batch_cnt, center_xyz_batch_cnt)
    num_points = xyz.shape[1]
    d2 = _square_distance(center_xyz, xyz)
    hit = (d2 == 0) | ((d2 >= _float32_square(min_radius)) & (d2 < _float32_square(max_radius)))
    position = torch.arange(num_points, device=xyz.device)
    # Hits keep their index, misses sort last; the sample_num smallest are the first hits in point order. The
    # extra columns cover clouds with fewer points than sample_num.
    candidates = torch.where(hit, position, num_points)
    candidates = torch.cat([candidates, candidates.new_full((*candidates.shape[:2], sample_num), num_points)], dim=2)
    first_hits = torch.topk(candidates, sample_num, dim=2, largest=False, sorted=True).values
    first = first_hits[:, :, :1]
    filled = torch.where(first_hits < num_points, first_hits, first)
    return torch.where(first < num_points, filled, torch.zeros_like(filled)).to(torch.int32)


def stack_ball_query(max_radius: float, sample_num: int, xyz: Tensor, center_xyz: Tensor, xyz_batch_cnt: Tensor,
                     center_xyz_batch_cnt: Tensor) -> Tensor:
    """mmcv's stacked ball query: xyz (N1 + N2 + ..., 3) and centers (M1 + M2 + ..., 3) stacked per sample, counts
    (B,) each -> (M, sample_num) int32 indices local to the center's sample.

    As mmcv's kernel (stack_ball_query_cuda_kernel.cuh), unlike the batched form: a hit is ``d2 < r * r`` only (no
    min radius, no ``d2 == 0`` rule), the first sample_num hits in point order, empty slots repeat the first hit,
    and a center with no hit gives ``[-1, 0, ..., 0]``."""
    num_points = xyz.shape[0]
    center_sample = _sample_of_rows(center_xyz_batch_cnt, center_xyz.shape[0])
    point_sample = _sample_of_rows(xyz_batch_cnt, num_points)
    d2 = _square_distance(center_xyz[None], xyz[None])[0]
    hit = (d2 < _float32_square(max_radius)) & (point_sample[None, :] == center_sample[:, None])
    # Points are stacked sample by sample, so the first hits in a sample's point order are the smallest rows.
    candidates = torch.where(hit, torch.arange(num_points, device=xyz.device), num_points)
    candidates = torch.cat([candidates, candidates.new_full((candidates.shape[0], sample_num), num_points)], dim=1)
    first_hits = torch.topk(candidates, sample_num, dim=1, largest=False, sorted=True).values
    local = first_hits - _first_rows(xyz_batch_cnt)[center_sample][:, None]
    found = first_hits < num_points
    filled = torch.where(found, local, local[:, :1])
    no_hit = torch.zeros_like(filled)
    no_hit[:, 0] = -1
    return torch.where(found[:, :1], filled, no_hit).to(torch.int32)


def knn(k: int, xyz: Tensor, center_xyz: Tensor | None = None, transposed: bool = False) -> Tensor:
    """mmcv.ops.knn: (B, k, npoint) int32 indices of the k nearest points of xyz for each center."""
    if center_xyz is None:
        center_xyz = xyz
    if transposed:
        xyz = xyz.transpose(2, 1)
        center_xyz = center_xyz.transpose(2, 1)
    d2 = _square_distance(center_xyz, xyz)
    # The kernel's heap starts as k entries (1e10, index 0): pad with them so that short clouds match.
    padded = torch.cat([d2, d2.new_full((*d2.shape[:2], k), 1e10)], dim=2)
    nearest = torch.topk(padded, k, dim=2, largest=False, sorted=True).indices
    nearest = torch.where(nearest < xyz.shape[1], nearest, torch.zeros_like(nearest))
    return nearest.transpose(2, 1).contiguous().to(torch.int32)


def three_nn(target: Tensor, source: Tensor) -> tuple[Tensor, Tensor]:
    """mmcv.ops.three_nn: distances (B, N, 3) and int32 indices (B, N, 3) of the 3 nearest source points."""
    d2 = _square_distance(target, source)
    distances, indices = [], []
    for _ in range(3):
        # argmin keeps the first minimum: the kernel's strict-less update order.
        nearest = torch.argmin(d2, dim=2, keepdim=True)
        distances.append(torch.gather(d2, 2, nearest))
        indices.append(nearest)
        d2 = d2.scatter(2, nearest, torch.full_like(nearest, torch.inf, dtype=d2.dtype))
    # CPU torch.sqrt is not correctly rounded (1 ulp off); through float64 it is, like CUDA's sqrtf.
    distance = torch.sqrt(torch.cat(distances, dim=2).double()).to(d2.dtype)
    return distance, torch.cat(indices, dim=2).to(torch.int32)


def three_interpolate(features: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """mmcv.ops.three_interpolate: (B, C, N) weighted sum of 3 features (B, C, M) per target point."""
    batch, channels, _ = features.shape
    num_targets = indices.shape[1]
    index = indices.long().reshape(batch, 1, num_targets * 3).expand(batch, channels, num_targets * 3)
    neighbours = torch.gather(features, 2, index).reshape(batch, channels, num_targets, 3)
    weights = weight[:, None]
    return (weights[..., 0] * neighbours[..., 0] + weights[..., 1] * neighbours[..., 1]
            + weights[..., 2] * neighbours[..., 2])


def gather_points(features: Tensor, indices: Tensor) -> Tensor:
    """mmcv.ops.gather_points: features (B, C, N), indices (B, M) -> (B, C, M)."""
    batch, channels, _ = features.shape
    index = indices.long()[:, None, :].expand(batch, channels, indices.shape[1])
    return torch.gather(features, 2, index)


def grouping_operation(features: Tensor, indices: Tensor, features_batch_cnt: Tensor | None = None,
                       indices_batch_cnt: Tensor | None = None) -> Tensor:
    """mmcv.ops.grouping_operation: features (B, C, N), indices (B, npoint, nsample) -> (B, C, npoint, nsample);
    with both batch counts, the stacked form (stack_grouping_operation)."""
    if features_batch_cnt is not None and indices_batch_cnt is not None:
        return stack_grouping_operation(features, indices, features_batch_cnt, indices_batch_cnt)
    batch, channels, _ = features.shape
    _, num_centers, num_samples = indices.shape
    index = indices.long().reshape(batch, 1, num_centers * num_samples).expand(batch, channels, -1)
    return torch.gather(features, 2, index).reshape(batch, channels, num_centers, num_samples)


def stack_grouping_operation(features: Tensor, indices: Tensor, features_batch_cnt: Tensor,
                             indices_batch_cnt: Tensor) -> Tensor:
    """mmcv's stacked grouping: features (N1 + N2 + ..., C), indices (M1 + M2 + ..., nsample) local to each row's
    sample, counts (B,) each -> (M, C, nsample).

    As mmcv's kernel (stack_group_points_cuda_kernel.cuh): row m reads its sample's features at ``start + index``
    where ``index`` is below the sample's end row (the kernel compares the local index with the absolute end), and
    is zero otherwise. A -1 index (a ball query without hits; mmdet3d's StackQueryAndGroup replaces those before
    grouping) reads the row before the sample's, which the kernel does too, or zero for the first sample."""
    num_rows = features.shape[0]
    sample = _sample_of_rows(indices_batch_cnt, indices.shape[0])
    local = indices.long()
    ends = torch.cumsum(features_batch_cnt.long(), dim=0)[sample][:, None]
    rows = _first_rows(features_batch_cnt)[sample][:, None] + local
    valid = (local < ends) & (rows >= 0) & (rows < num_rows)
    grouped = torch.where(valid[..., None], features[rows.clamp(0, num_rows - 1)], 0.0)  # (M, nsample, C)
    return grouped.permute(0, 2, 1).contiguous()
