"""PartA2RPNHead, the anchor RPN head of PartA2 and PV-RCNN: its levels as flat named outputs, and the host
step after it (anchor decoding and NMS into RoIs) in their split plans."""

from __future__ import annotations

from typing import Any

import torch

from ..boundaries import dict_key_name
from ..knowledge import register
from ..split import StageContext, StageDef, Tensors, numbered


def anchor_rpn_levels(head_outputs: tuple) -> dict:
    """An anchor RPN head's (cls_scores, bbox_preds, dir_cls_preds), one tensor per level, as flat named outputs."""
    outputs = {}
    for kind, levels in zip(("cls_score", "bbox_pred", "dir_cls_pred"), head_outputs):
        outputs.update({f"{kind}_{level}": t for level, t in enumerate(levels)})
    return outputs


def _anchor_rpn_proposals(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """PartA2RPNHead.predict_by_feat (anchor decoding, score threshold, NMS) as PartA2RPNHead.predict runs it
    (PartA2's RPN head, and PV-RCNN's)."""
    from mmdet3d.structures import bbox3d2roi

    head = model.rpn_head
    results = head.predict_by_feat(numbered(t, "cls_score_"), numbered(t, "bbox_pred_"),
                                   numbered(t, "dir_cls_pred_"),
                                   batch_input_metas=list(context.metas), cfg=head.test_cfg)
    return {"rois": bbox3d2roi([r.bboxes_3d.tensor for r in results]),
            "roi_labels": torch.cat([r.labels_3d for r in results]),
            "roi_class_scores": torch.cat([r.cls_preds for r in results])}


# The host step after PartA2RPNHead, PartA2's and PV-RCNN's RPN head.
ANCHOR_RPN_PROPOSALS = StageDef(
    "proposals", _anchor_rpn_proposals, "host: decode the anchors' boxes, score threshold, NMS -> RoIs",
    (), ("cls_score_*", "bbox_pred_*", "dir_cls_pred_*"), host=True,
    row_sets=(("rois", "roi_labels", "roi_class_scores"),))


def rois_up_to_nms_post(model: Any, context: StageContext) -> dict[str, int]:
    """The RoI count's bound: the RPN's NMS keeps at most test_cfg.nms_post boxes per sample."""
    return {"num_rois": model.rpn_head.test_cfg.nms_post * context.batch_size}


# The first stage of PartA2 and PV-RCNN returns a dict of named tensors: the keys are the output names.
register("PartA2RPNHead", output_namer=dict_key_name)
