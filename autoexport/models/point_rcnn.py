"""PointRCNN: its first stage (backbone, FP neck, point RPN head) as the one graph, and the split plan of both
stages with the host NMS between them."""

from __future__ import annotations

from typing import Any

import torch

from ..boundaries import TensorBoundary, dict_key_name, nms_between_stages
from ..knowledge import register
from ..split import SplitPlan, StageContext, StageDef, Tensors, boundary_stage, detections_of, numbered, per_sample


def point_rcnn_rpn_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """PointRCNN's first stage, as TwoStage3DDetector.predict runs it up to the proposals: the PointNet++ backbone
    and FP neck, then PointRPNHead's per-point box and class predictions. mmdet3d's own tensor mode cannot run it
    (`_forward` reads a 'neck_feats' key extract_feat never returns)."""
    # PointRCNN.extract_feat's steps on the detector's parts, so the split's stage module (parts only) runs it too.
    features = model.backbone(torch.stack(inputs["points"]))
    if getattr(model, "neck", None) is not None:
        features = model.neck(features)
    feats = {"fp_features": features["fp_features"], "fp_points": features["fp_xyz"]}
    bbox_preds, cls_preds = model.rpn_head(feats)
    return {**feats, "bbox_preds": bbox_preds, "cls_preds": cls_preds}


def _point_rcnn_proposals(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """PointRPNHead.predict_by_feat (box decoding, class-agnostic NMS) on the raw points, as in its predict."""
    from mmdet3d.structures import bbox3d2roi

    points = torch.stack(numbered(t, "points_"))
    results = model.rpn_head.predict_by_feat(points, t["bbox_preds"], t["cls_preds"], list(context.metas),
                                             cfg=model.rpn_head.test_cfg)
    return {"rois": bbox3d2roi([r.bboxes_3d.tensor for r in results]),
            "roi_labels": torch.cat([r.labels_3d for r in results])}


def _point_rcnn_roi(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """PointRCNNRoIHead.predict up to its bbox head: point scores and depths joined to the features, RoI point
    pooling, the bbox head's raw class score and box residuals per RoI."""
    roi_head = model.roi_head
    point_scores = t["cls_preds"].sigmoid().max(-1)[0]
    depths = t["fp_points"].norm(dim=2) / roi_head.depth_normalizer - 0.5
    features = torch.cat([point_scores.unsqueeze(2), depths.unsqueeze(2), t["fp_features"].transpose(1, 2)], dim=2)
    outputs = roi_head._bbox_forward(features, t["fp_points"], context.batch_size, t["rois"])
    return {"cls_score": outputs["cls_score"], "bbox_pred": outputs["bbox_pred"]}


def _point_rcnn_detections(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """PointRCNNBboxHead.get_results: residuals decoded on the proposals, per-class NMS, as predict returns them."""
    roi_head = model.roi_head
    labels = per_sample(t, "roi_labels", t["rois"], context.batch_size)
    results = roi_head.bbox_head.get_results(t["rois"], t["cls_score"].sigmoid(), t["bbox_pred"], labels,
                                             list(context.metas), cfg=roi_head.test_cfg)
    return detections_of(results)


POINT_RCNN_PLAN = SplitPlan((
    StageDef("rpn", boundary_stage(point_rcnn_rpn_forward, "points"), "PointNet++ backbone, FP neck and point RPN head (the one-graph export)",
             ("backbone", "neck", "rpn_head"), ("points_*",)),
    StageDef("proposals", _point_rcnn_proposals, "host: decode each point's box, class-agnostic NMS -> RoIs",
             (), ("points_*", "bbox_preds", "cls_preds"), host=True, row_sets=(("rois", "roi_labels"),)),
    StageDef("roi", _point_rcnn_roi, "RoI point pooling and the PointNet++ bbox head on each RoI", ("roi_head",),
             ("fp_features", "fp_points", "cls_preds", "rois"), dims=(("rois", 0, "num_rois"),),
             row_sets=(("cls_score", "bbox_pred"),)),
    StageDef("detections", _point_rcnn_detections, "host: decode the refined boxes, per-class NMS -> detections",
             (), ("rois", "roi_labels", "cls_score", "bbox_pred"), host=True,
             row_sets=(("bboxes_3d", "scores_3d", "labels_3d"),)),
), model_outputs_stage="rpn")


register("PointRCNN", boundary=TensorBoundary(
    point_rcnn_rpn_forward, ("rpn_head",),
    host_side="PointRPNHead.predict_by_feat decodes each point's box and runs class-agnostic NMS (test_cfg.nms_cfg): "
              "the proposals (stages.json: proposals) that the RoI head graph (stages.json: roi) refines; "
              "PointRCNNBboxHead.get_results decodes and NMSes its outputs",
    split_required=nms_between_stages("PointRCNN")), split_plan=POINT_RCNN_PLAN)
register("PointRPNHead", output_namer=dict_key_name)
