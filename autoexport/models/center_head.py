"""CenterHead (CenterPoint): output names per task, the head's own decoding, its score threshold key, and its
decoding in the graph for the detections scope."""

from __future__ import annotations

from typing import Any

import torch

from ..boundaries import default_output_name
from ..detections import GraphDetections, bev_boxes_for_nms
from ..knowledge import register
from ..ops.nms import rotated_iou_matrix


def center_head_output_name(path: tuple) -> str:
    # CenterHead.forward -> multi_apply over levels of per-task dict lists: path (task, level, key).
    if len(path) == 3 and isinstance(path[2], str):
        task, level, key = path
        return f"{key}_task{task}" + (f"_level{level}" if level else "")
    return default_output_name(path)


register("CenterHead", output_namer=center_head_output_name,
         decoder=lambda head, outs, metas: head.predict_by_feat(outs, metas), score_threshold_key="score_threshold")


def _task_candidates(head: Any, preds: dict, task: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CenterPointBBoxCoder.decode for a batch of one without its masks: the top max_num heatmap peaks of the task as
    (K, code_size) gravity-centre boxes, their scores and their labels within the task."""
    coder = head.bbox_coder
    heat = preds["heatmap"].sigmoid()
    dim = torch.exp(preds["dim"]) if head.norm_bbox else preds["dim"]
    scores, inds, classes, ys, xs = coder._topk(heat, K=coder.max_num)
    reg = coder._transpose_and_gather_feat(preds["reg"], inds).view(1, coder.max_num, 2)
    xs = xs.view(1, coder.max_num, 1) + reg[:, :, 0:1]
    ys = ys.view(1, coder.max_num, 1) + reg[:, :, 1:2]
    rot = torch.atan2(coder._transpose_and_gather_feat(preds["rot"][:, 0:1], inds).view(1, coder.max_num, 1),
                      coder._transpose_and_gather_feat(preds["rot"][:, 1:2], inds).view(1, coder.max_num, 1))
    hei = coder._transpose_and_gather_feat(preds["height"], inds).view(1, coder.max_num, 1)
    dim = coder._transpose_and_gather_feat(dim, inds).view(1, coder.max_num, 3)
    xs = xs * coder.out_size_factor * coder.voxel_size[0] + coder.pc_range[0]
    ys = ys * coder.out_size_factor * coder.voxel_size[1] + coder.pc_range[1]
    parts = [xs, ys, hei, dim, rot]
    if "vel" in preds:
        parts.append(coder._transpose_and_gather_feat(preds["vel"], inds).view(1, coder.max_num, 2))
    return torch.cat(parts, dim=2)[0], scores.view(-1), classes.view(-1).long()


def center_head_detections(head: Any, outs: Any, test_cfg: Any, present: torch.Tensor) -> GraphDetections:
    """CenterHead.predict_by_feat for a batch of one, in the graph: per task the heatmap's top peaks, the coder's
    score threshold and centre range, then a class-agnostic NMS per task (rotated BEV at nms_thr, or circle NMS at
    the task's min_radius) up to post_max_size; tasks concatenated, boxes moved to the bottom centre."""
    coder, results = head.bbox_coder, []
    for task, preds in enumerate(outs):
        boxes, scores, labels = _task_candidates(head, preds[0], task)
        low = torch.tensor(coder.post_center_range[:3], dtype=boxes.dtype, device=boxes.device)
        high = torch.tensor(coder.post_center_range[3:], dtype=boxes.dtype, device=boxes.device)
        valid = ((boxes[:, :3] >= low) & (boxes[:, :3] <= high)).all(1) & present
        if coder.score_threshold:
            valid &= scores > coder.score_threshold
        if test_cfg["nms_type"] == "circle":
            distance = ((boxes[:, None, :2] - boxes[None, :, :2]) ** 2).sum(-1)
            blockers = distance <= test_cfg["min_radius"][task]
        else:
            valid &= scores >= test_cfg["score_threshold"]
            blockers = rotated_iou_matrix(bev_boxes_for_nms(boxes)) > test_cfg["nms_thr"]
        # The coder's top-k already orders candidates by descending score, as both NMS variants walk them.
        keep = torch.ops.autoexport.greedy_nms_keep(blockers[None], valid[None])[0]
        results.append((boxes, scores, labels + sum(head.num_classes[:task]), keep))
    return _first_kept(results, int(test_cfg["post_max_size"]))


def _first_kept(results: list, post_max_size: int) -> GraphDetections:
    """Per task its first post_max_size kept candidates (in score order), tasks one after another, as mmdet3d
    concatenates them; unused rows at the end."""
    rows, counts = [], []
    for boxes, scores, labels, keep in results:
        rank = torch.cumsum(keep.long(), 0) - 1
        chosen = keep & (rank < post_max_size)
        # Kept candidates first (stable: in score order), then the rest; the first post_max_size rows are the task's.
        order = torch.sort((~chosen).long(), stable=True)[1][:post_max_size]
        filled = chosen[order]
        bottom = torch.cat([boxes[:, :2], boxes[:, 2:3] - boxes[:, 5:6] * 0.5, boxes[:, 3:]], 1)
        rows.append((bottom[order], torch.where(filled, scores[order], torch.zeros_like(scores[order])),
                     torch.where(filled, labels[order], torch.full_like(labels[order], -1)), filled))
        counts.append(chosen.sum())
    boxes, scores, labels, filled = (torch.cat(column) for column in zip(*rows))
    # Pack the filled rows of every task to the front, task order kept.
    order = torch.sort((~filled).long(), stable=True)[1]
    return GraphDetections(boxes[order], scores[order], labels[order], torch.stack(counts).sum())


register("CenterHead", detection_head=center_head_detections)
