"""Anchor3DHead and its variants (PointPillars, SECOND, RegNet, free-anchor, shape-aware heads): output names
per level, the head's own decoding for fidelity reports, its score threshold key, and its decoding in the graph for
the detections scope."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..boundaries import level_suffixed
from ..detections import GraphDetections, NmsSettings, multiclass_nms
from ..knowledge import register

_ANCHOR_OUTPUTS = ("cls_score", "bbox_pred", "dir_cls_pred")


register("Anchor3DHead", output_namer=level_suffixed(_ANCHOR_OUTPUTS),
         decoder=lambda head, outs, metas: head.predict_by_feat(*outs, batch_input_metas=metas),
         score_threshold_key="score_thr")
register("FreeAnchor3DHead", output_namer=level_suffixed(_ANCHOR_OUTPUTS))
register("ShapeAwareHead", output_namer=level_suffixed(_ANCHOR_OUTPUTS))


def anchor3d_detections(head: Any, outs: Any, test_cfg: Any, present: torch.Tensor) -> GraphDetections:
    """Anchor3DHead.predict_by_feat for a batch of one, in the graph: per level the top nms_pre anchors by best
    class score, the bbox coder's decoding, box3d_multiclass_nms, then the direction classifier's yaw fix."""
    cls_scores, bbox_preds, dir_cls_preds = outs
    priors = head.prior_generator.grid_anchors([c.shape[-2:] for c in cls_scores], device=cls_scores[0].device)
    boxes, scores, directions = [], [], []
    for cls_score, bbox_pred, dir_cls_pred, anchors in zip(cls_scores, bbox_preds, dir_cls_preds, priors):
        anchors = anchors.reshape(-1, head.box_code_size)
        direction = dir_cls_pred[0].permute(1, 2, 0).reshape(-1, 2).max(dim=-1)[1]
        level_scores = cls_score[0].permute(1, 2, 0).reshape(-1, head.num_classes)
        level_scores = level_scores.sigmoid() if head.use_sigmoid_cls else level_scores.softmax(-1)
        deltas = bbox_pred[0].permute(1, 2, 0).reshape(-1, head.box_code_size)
        nms_pre = test_cfg.get("nms_pre", -1)
        if 0 < nms_pre < level_scores.shape[0]:
            best = level_scores.max(dim=1)[0] if head.use_sigmoid_cls else level_scores[:, :-1].max(dim=1)[0]
            top = best.topk(nms_pre)[1]
            anchors, deltas, level_scores, direction = anchors[top], deltas[top], level_scores[top], direction[top]
        boxes.append(head.bbox_coder.decode(anchors, deltas))
        scores.append(level_scores)
        directions.append(direction)
    boxes, scores, directions = torch.cat(boxes), torch.cat(scores), torch.cat(directions)
    # Softmax heads carry the background as their last class; sigmoid heads have none.
    class_scores = scores if head.use_sigmoid_cls else scores[:, :-1]
    nms = NmsSettings(float(test_cfg.get("score_thr", 0)), float(test_cfg.nms_thr), int(test_cfg.max_num),
                      bool(test_cfg.use_rotate_nms))
    index, kept_scores, labels, count = multiclass_nms(boxes, class_scores, nms, present)
    kept = boxes[index]
    from mmdet3d.structures import limit_period  # models/ modules import mmdet3d only when a model runs

    yaw = limit_period(kept[:, 6] - head.dir_offset, head.dir_limit_offset, np.pi)
    kept = torch.cat([kept[:, :6], (yaw + head.dir_offset + np.pi * directions[index].to(kept.dtype))[:, None],
                      kept[:, 7:]], 1)
    return GraphDetections(kept, kept_scores, labels, count)


register("Anchor3DHead", detection_head=anchor3d_detections)
