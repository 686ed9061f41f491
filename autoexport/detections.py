"""The detections scope: one graph from the raw point cloud to boxes, the mechanism.

``--scope detections`` exports what mmdet3d's ``inference_detector`` computes after loading the file: the test
pipeline's point range filter, voxelization (op library), the network, and the head's own box decoding, score
threshold and NMS. Outputs have a static size K (the head's ``max_num``): ``boxes_3d (K, box_dim)``,
``scores_3d (K,)``, ``labels_3d (K,)`` (-1 in unused rows) and ``num_detections ()``, best score first.

What a head needs for this is its class's ``detection_head`` knowledge (autoexport/models/): a function from the
head and its raw outputs to ``GraphDetections``; ``multiclass_nms`` below is mmdet3d's ``box3d_multiclass_nms`` with
static shapes for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .boundaries import TensorBoundary
from .errors import UserInputError
from .knowledge import KNOWLEDGE
from .ops.nms import aligned_iou_matrix, rotated_iou_matrix
from .ops.voxelize import dynamic_voxelize, voxelization

OUTPUT_NAMES = ("boxes_3d", "scores_3d", "labels_3d", "num_detections")


@dataclass(frozen=True)
class NmsSettings:
    """The head's test_cfg, read once: mmdet3d's names and meanings."""

    score_thr: float
    nms_thr: float
    max_num: int
    rotate: bool  # nms_bev (rotated rectangles, mmcv nms_rotated) or nms_normal_bev (axis-aligned, mmcv nms)


def bev_boxes_for_nms(boxes: Tensor) -> Tensor:
    """(N, 5) x, y, dx, dy, yaw as mmdet3d's nms_bev sees them: through xywhr2xyxyr and back, same float steps."""
    x, y, dx, dy, yaw = boxes[:, 0], boxes[:, 1], boxes[:, 3], boxes[:, 4], boxes[:, 6]
    x1, y1, x2, y2 = x - dx / 2, y - dy / 2, x + dx / 2, y + dy / 2
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, yaw), -1)


def multiclass_nms(boxes: Tensor, class_scores: Tensor, nms: NmsSettings, present: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mmdet3d's box3d_multiclass_nms with static shapes: per class, candidates above score_thr, greedy NMS at
    nms_thr; then the max_num best over all classes. ``present`` (bool scalar) is False for an empty cloud.

    Returns indices into ``boxes`` (max_num,), their scores, labels (-1 past the count) and the count.
    """
    num, num_classes = class_scores.shape
    by_class = class_scores.t()  # (C, N)
    valid = (by_class > nms.score_thr) & present
    # Invalid candidates sort last; their rows never take part.
    order = torch.sort(torch.where(valid, by_class, torch.full_like(by_class, -1.0)), dim=-1, descending=True,
                       stable=True)[1]
    sorted_scores = torch.gather(by_class, 1, order)
    sorted_valid = torch.gather(valid, 1, order)
    bev = bev_boxes_for_nms(boxes)
    if nms.rotate:
        iou = rotated_iou_matrix(bev)
    else:
        iou = aligned_iou_matrix(torch.cat([bev[:, :2] - bev[:, 2:4] / 2, bev[:, :2] + bev[:, 2:4] / 2], 1))
    blockers = iou[order[:, :, None], order[:, None, :]] > nms.nms_thr
    keep = torch.ops.autoexport.greedy_nms_keep(blockers, sorted_valid)

    kept_scores = torch.where(keep, sorted_scores, torch.full_like(sorted_scores, -1.0)).reshape(-1)
    top = min(nms.max_num, kept_scores.shape[0])
    best_scores, best = kept_scores.topk(top)
    count = keep.sum().clamp(max=top)
    label = torch.div(best, num, rounding_mode="floor")
    index = torch.gather(order.reshape(-1), 0, best)
    filled = torch.arange(top, device=boxes.device) < count
    labels = torch.where(filled, label, torch.full_like(label, -1))
    scores = torch.where(filled, best_scores, torch.zeros_like(best_scores))
    if top < nms.max_num:  # fewer candidates than max_num: pad to the documented size
        pad = nms.max_num - top
        index = torch.cat([index, index.new_zeros(pad)])
        scores = torch.cat([scores, scores.new_zeros(pad)])
        labels = torch.cat([labels, labels.new_full((pad,), -1)])
    return index, scores, labels, count


@dataclass
class GraphDetections:
    boxes_3d: Tensor  # (K, box_dim), zero rows past num_detections
    scores_3d: Tensor  # (K,)
    labels_3d: Tensor  # (K,) int64, -1 past num_detections
    num_detections: Tensor  # () int64

    def as_outputs(self) -> dict[str, Tensor]:
        filled = self.labels_3d >= 0
        boxes = torch.where(filled[:, None], self.boxes_3d, torch.zeros_like(self.boxes_3d))
        return {"boxes_3d": boxes, "scores_3d": self.scores_3d, "labels_3d": self.labels_3d,
                "num_detections": self.num_detections}


# (head, raw head outputs for a batch of one, test_cfg, present) -> GraphDetections
DetectionHead = Callable[[Any, Any, Any, Tensor], GraphDetections]


# ---- the graph's input side: raw points to the voxels the network takes ----------------------------------------

def range_filter_of(cfg: Any) -> list[float] | None:
    """The test pipeline's PointsRangeFilter range, searched through wrappers such as MultiScaleFlipAug3D."""
    def search(transforms: Sequence[Any]) -> list[float] | None:
        for transform in transforms or ():
            if transform.get("type") == "PointsRangeFilter":
                return [float(v) for v in transform["point_cloud_range"]]
            found = search(transform.get("transforms", ()))
            if found:
                return found
        return None

    pipeline = cfg.get("test_pipeline") or cfg.get("test_dataloader", {}).get("dataset", {}).get("pipeline", [])
    return search(pipeline)


def points_in_range(points: Tensor, bounds: Sequence[float] | None) -> Tensor:
    """mmdet3d's PointsRangeFilter: strictly inside the range on x, y and z."""
    if bounds is None:
        return points
    low = torch.tensor(bounds[:3], dtype=points.dtype, device=points.device)
    high = torch.tensor(bounds[3:6], dtype=points.dtype, device=points.device)
    xyz = points[:, :3]
    return points[((xyz > low) & (xyz < high)).all(1)]


def voxelize(preprocessor: Any, points: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Det3DDataPreprocessor.voxelize for one sample with the op library's voxelization; and whether any voxel
    exists (an empty cloud must give no detections, not the head's bias-only guesses)."""
    layer = preprocessor.voxel_layer
    if preprocessor.voxel_type == "hard":
        max_voxels = layer.max_voxels[1] if isinstance(layer.max_voxels, (tuple, list)) else layer.max_voxels
        voxels, coors, num_points = voxelization(points, layer.voxel_size, layer.point_cloud_range,
                                                 layer.max_num_points, max_voxels)
        coors = torch.nn.functional.pad(coors, (1, 0), mode="constant", value=0)
        centers = ((coors[:, [3, 2, 1]] + 0.5) * voxels.new_tensor(layer.voxel_size)
                   + voxels.new_tensor(layer.point_cloud_range[0:3]))
        return {"voxels": voxels, "coors": coors, "num_points": num_points, "voxel_centers": centers}, \
            torch.tensor(coors.shape[0], device=points.device) > 0
    if preprocessor.voxel_type == "dynamic":
        coors = dynamic_voxelize(points, layer.voxel_size, layer.point_cloud_range)
        coors = torch.nn.functional.pad(coors, (1, 0), mode="constant", value=0)
        return {"voxels": points, "coors": coors}, (coors[:, 1] >= 0).any()
    raise UserInputError(f"--scope detections: voxel_type {preprocessor.voxel_type!r} has no in-graph "
                         "voxelization yet (hard and dynamic do); export with --scope network")


# ---- the boundary ------------------------------------------------------------------------------------------------

def detection_head_of(model: Any) -> tuple[Any, DetectionHead]:
    head = getattr(model, "bbox_head", None) or getattr(model, "pts_bbox_head", None)
    decode = KNOWLEDGE.value(head, "detection_head", None) if head is not None else None
    if decode is None:
        supported = ", ".join(name for name, _ in KNOWLEDGE.with_field("detection_head"))
        raise UserInputError(f"--scope detections: {type(head).__name__ if head is not None else type(model).__name__}"
                             f" has no in-graph box decoding in autoexport yet (supported heads: {supported}); "
                             "export with --scope network (raw head tensors, boxes decoded on the host)")
    return head, decode


def points_to_detections(model: Any, inputs: dict, data_samples: list,
                         point_range: Sequence[float] | None = None) -> dict[str, Tensor]:
    """The detections scope's forward for a batch of one: range filter, voxelization, network, decoding."""
    head, decode = detection_head_of(model)
    points = inputs["points"]
    points = points_in_range(points[0] if isinstance(points, (list, tuple)) else points, point_range)
    voxel_dict, present = voxelize(model.data_preprocessor, points)
    if hasattr(model, "extract_pts_feat"):  # MVX-style detectors (CenterPoint): the lidar branch alone
        features = model.extract_pts_feat(voxel_dict, points=[points], batch_input_metas=[s.metainfo
                                                                                          for s in data_samples])
    else:
        features = model.extract_feat({"voxels": voxel_dict, "points": [points]})
    return decode(head, head(features), head.test_cfg, present).as_outputs()


def detections_boundary(model: Any, cfg: Any) -> TensorBoundary:
    """Points in, boxes out, for voxel-based single-stage detectors whose head has ``detection_head`` knowledge."""
    detection_head_of(model)  # fails early, naming the supported heads
    if getattr(model, "with_img_backbone", False) or getattr(model.data_preprocessor, "voxel_layer", None) is None:
        raise UserInputError(f"--scope detections: {type(model).__name__} is not a voxel-based lidar detector; "
                             "export with --scope network")
    point_range = range_filter_of(cfg)

    def detections_forward(model: Any, inputs: dict, data_samples: list) -> dict[str, Tensor]:
        return points_to_detections(model, inputs, data_samples, point_range)

    return TensorBoundary(
        detections_forward, (), host_inputs=lambda model, inputs, data_samples, ordinal: {"points": inputs["points"][0]},
        host_side="none: the graph takes the point cloud as the dataset's loader yields it and returns the boxes",
        input_meanings=((r"^points$", "the raw point cloud (num_points, x y z + features), as the dataset's loader "
                         "yields it", "num_points"),),
        output_namer=lambda path: path[0] if path and path[0] in OUTPUT_NAMES else "_".join(map(str, path)),
        forward_options={"scope": "detections", "point_range": point_range},
        row_sets=(("boxes_3d", "scores_3d", "labels_3d"),))
