"""Bird's-eye-view IoU and greedy NMS that export: mmcv's ``nms_rotated`` / ``nms`` semantics in plain PyTorch.

mmdet3d's ``nms_bev`` calls mmcv's ``nms_rotated`` (exact overlap of rotated rectangles) and ``nms_normal_bev`` calls
mmcv's ``nms`` on the axis-aligned footprints. Both are greedy: walk the boxes by descending score, keep a box unless
a kept box overlaps it by more than the threshold. Here the overlaps are one vectorized matrix and the greedy walk is
the custom op ``autoexport::greedy_nms_keep`` over a fixed number of candidates, so the graph has static shapes (a
keep mask, not a list). Its ONNX translation is one ONNX Loop over the candidates (unrolling CenterPoint's 6 x 500
candidates made a graph the ONNX optimizer took more than ten minutes over).
"""

from __future__ import annotations

import torch
from onnxscript import BOOL, INT64, script
from onnxscript import opset18 as op
from torch import Tensor

__all__ = ["rotated_iou_matrix", "aligned_iou_matrix", "greedy_nms_keep", "greedy_nms_keep_onnx"]


def _corners(boxes: Tensor) -> Tensor:
    """(N, 4, 2) corners of BEV boxes (x, y, dx, dy, yaw) as mmcv's nms_rotated / box_iou_rotated place them with
    their default clockwise=True, which is how mmdet3d's nms_bev calls them: the yaw turns the box clockwise."""
    cx, cy, dx, dy, yaw = boxes.unbind(-1)
    cos, sin = torch.cos(yaw) * 0.5, -torch.sin(yaw) * 0.5
    x0, y0 = cx + sin * dy + cos * dx, cy + cos * dy - sin * dx
    x1, y1 = cx - sin * dy + cos * dx, cy - cos * dy - sin * dx
    x2, y2 = 2 * cx - x0, 2 * cy - y0
    x3, y3 = 2 * cx - x1, 2 * cy - y1
    return torch.stack([torch.stack([x0, x1, x2, x3], -1), torch.stack([y0, y1, y2, y3], -1)], -1)


def _inside(points: Tensor, corners: Tensor, eps: float = 1e-6) -> Tensor:
    """(A, B, P) whether point p of row a lies in box b: mmcv's test, projections on the box's edges AB and AD.
    points (A, B, P, 2), corners (B, 4, 2) broadcast over A."""
    a = corners[None, :, None, 0]
    ab = corners[None, :, None, 1] - a
    ad = corners[None, :, None, 3] - a
    ap = points - a
    ap_ab, ab_ab = (ap * ab).sum(-1), (ab * ab).sum(-1)
    ap_ad, ad_ad = (ap * ad).sum(-1), (ad * ad).sum(-1)
    return (ap_ab >= -eps) & (ap_ab <= ab_ab + eps) & (ap_ad >= -eps) & (ap_ad <= ad_ad + eps)


def _edge_crossings(corners_a: Tensor, corners_b: Tensor) -> tuple[Tensor, Tensor]:
    """Crossing points (A, B, 16, 2) of every edge of a with every edge of b, and whether they exist."""
    p1 = corners_a[:, None, :, None, :]
    p2 = torch.roll(corners_a, -1, 1)[:, None, :, None, :]
    q1 = corners_b[None, :, None, :, :]
    q2 = torch.roll(corners_b, -1, 1)[None, :, None, :, :]
    r, s = p2 - p1, q2 - q1
    denom = r[..., 0] * s[..., 1] - r[..., 1] * s[..., 0]
    qp = q1 - p1
    parallel = denom.abs() < 1e-8
    safe = torch.where(parallel, torch.ones_like(denom), denom)
    t = (qp[..., 0] * s[..., 1] - qp[..., 1] * s[..., 0]) / safe
    u = (qp[..., 0] * r[..., 1] - qp[..., 1] * r[..., 0]) / safe
    exists = ~parallel & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    points = p1 + t[..., None] * r
    count_a, count_b = corners_a.shape[0], corners_b.shape[0]
    return points.reshape(count_a, count_b, 16, 2), exists.reshape(count_a, count_b, 16)


def _polygon_area(points: Tensor, valid: Tensor) -> Tensor:
    """Area of the convex polygon whose vertices are the valid points (in any order): sort by angle, shoelace."""
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    center = (points * valid[..., None]).sum(-2, keepdim=True) / count[..., None]
    rel = points - center
    angle = torch.atan2(rel[..., 1], rel[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 10.0))  # invalid points sort last
    order = angle.argsort(-1)
    rel = torch.gather(rel, -2, order[..., None].expand_as(rel))
    sorted_valid = torch.gather(valid, -1, order)
    # Invalid tail points become copies of the first vertex: zero-area segments in the shoelace sum.
    rel = torch.where(sorted_valid[..., None], rel, rel[..., :1, :].expand_as(rel))
    nxt = torch.roll(rel, -1, -2)
    cross = rel[..., 0] * nxt[..., 1] - rel[..., 1] * nxt[..., 0]
    area = cross.sum(-1).abs() / 2
    return torch.where(valid.sum(-1) >= 3, area, torch.zeros_like(area))


def rotated_iou_matrix(boxes: Tensor) -> Tensor:
    """(N, N) IoU of rotated BEV boxes (x, y, dx, dy, yaw), as mmcv's box_iou_rotated computes it (mode iou)."""
    # mmcv shifts each pair to a common center before intersecting, for precision far from the origin; shifting
    # every box by the mean center does the same for the whole matrix.
    center = boxes[:, :2].mean(0, keepdim=True)
    boxes = torch.cat([boxes[:, :2] - center, boxes[:, 2:]], 1)
    corners = _corners(boxes)
    count = boxes.shape[0]
    a_in_b = _inside(corners[:, None].expand(-1, count, -1, -1), corners)
    b_in_a = a_in_b.transpose(0, 1)  # corner of b inside a: the same test with the roles swapped
    crossings, crossing_exists = _edge_crossings(corners, corners)
    points = torch.cat([corners[:, None].expand(-1, count, -1, -1), corners[None].expand(count, -1, -1, -1),
                        crossings], 2)
    valid = torch.cat([a_in_b, b_in_a, crossing_exists], 2)
    intersection = _polygon_area(points, valid)
    area = boxes[:, 2] * boxes[:, 3]
    union = area[:, None] + area[None, :] - intersection
    return intersection / union.clamp(min=1e-6)


def aligned_iou_matrix(boxes: Tensor) -> Tensor:
    """(N, N) IoU of (x1, y1, x2, y2) boxes with mmcv's ``nms`` convention (offset 0)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    width = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None])).clamp(min=0)
    height = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None])).clamp(min=0)
    intersection = width * height
    area = (x2 - x1) * (y2 - y1)
    return intersection / (area[:, None] + area[None] - intersection).clamp(min=1e-6)


@torch.library.custom_op("autoexport::greedy_nms_keep", mutates_args=())
def greedy_nms_keep(blockers: Tensor, valid: Tensor) -> Tensor:
    """Greedy NMS over candidates sorted by descending score, for G independent groups (e.g. classes) at once.

    ``blockers`` (G, K, K) bool: candidate j would suppress candidate i (IoU above the threshold; only j < i is
    read); ``valid`` (G, K) bool: candidates that take part. Returns (G, K) bool: i is kept when it is valid and no
    kept candidate before it suppresses it, which is mmcv's nms / nms_rotated walk.
    """
    keep = torch.zeros_like(valid)
    for i in range(valid.shape[1]):
        keep[:, i] = valid[:, i] & ~(blockers[:, i, :i] & keep[:, :i]).any(1)
    return keep


@greedy_nms_keep.register_fake
def _greedy_nms_keep_fake(blockers: Tensor, valid: Tensor) -> Tensor:
    return torch.empty_like(valid)


@script()
def _greedy_walk(blockers: BOOL, valid: BOOL) -> BOOL:
    num = op.Gather(op.Shape(valid), op.Constant(value_int=1))
    positions = op.Range(op.Constant(value_int=0), num, op.Constant(value_int=1))
    keep = op.Equal(op.Cast(valid, to=INT64.dtype), op.Constant(value_int=2))  # all False, valid's shape
    for i in range(num):
        row = op.Gather(blockers, i, axis=1)
        blocked = op.Cast(op.ReduceMax(op.Cast(op.And(row, keep), to=INT64.dtype), op.Constant(value_ints=[1]),
                                       keepdims=1), to=BOOL.dtype)
        decided = op.And(op.Gather(valid, op.Unsqueeze(i, op.Constant(value_ints=[0])), axis=1), op.Not(blocked))
        keep = op.Or(keep, op.And(op.Unsqueeze(op.Equal(positions, i), op.Constant(value_ints=[0])), decided))
    return keep


def greedy_nms_keep_onnx(blockers, valid):
    """ONNX translation: the walk as one ONNX Loop over the candidates. Candidates not yet decided are False in the
    running keep mask, so a row of ``blockers`` only counts kept candidates before it."""
    return _greedy_walk(blockers, valid)
