"""PartA2: its first stage as the one graph, the split plan of both stages, and its RoI-aware extractor batched."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..knowledge import register
from ..patches import ExportPatch, PatchContext, register_patch
from ..boundaries import TensorBoundary, nms_between_stages
from ..split import SplitPlan, StageContext, StageDef, Tensors, detections_of, hard_voxels, per_sample
from .part_a2_rpn_head import ANCHOR_RPN_PROPOSALS, anchor_rpn_levels, rois_up_to_nms_post


def part_a2_first_stage(model: Any, voxels: dict, batch_size: int) -> dict:
    """PartA2's first stage, as PartA2.extract_feat and the RPN head's forward run it: voxel encoder, SparseUNet
    (the BEV map for the RPN and per-voxel features, seg_features, for the RoI head), BEV backbone and neck, the
    anchor RPN head's raw outputs. mmdet3d's tensor mode runs the RPN's NMS, which no graph can hold."""
    features = model.voxel_encoder(voxels["voxels"], voxels["num_points"], voxels["coors"])
    # PartA2.extract_feat reads the batch size with coors[-1, 0].item() + 1; it is static here.
    feats = model.middle_encoder(features, voxels["coors"], batch_size)
    x = model.backbone(feats["spatial_features"])
    if getattr(model, "neck", None) is not None:
        x = model.neck(x)
    outputs = anchor_rpn_levels(model.rpn_head(x))
    return {**outputs, "seg_features": feats["seg_features"]}


def part_a2_rpn_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """part_a2_first_stage on the data preprocessor's hard voxels."""
    return part_a2_first_stage(model, inputs["voxels"], len(data_samples))


def _part_a2_rpn(model: Any, t: Tensors, context: StageContext) -> Tensors:
    return {"head_outputs": part_a2_first_stage(model, hard_voxels(t), context.batch_size)}


def _part_a2_roi(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """PartAggregationROIHead.predict_bbox up to its bbox head: the semantic head's part features, RoI-aware
    pooling of them and of seg_features, PartA2BboxHead's raw class score and box residuals per RoI."""
    roi_head = model.roi_head
    feats = {"seg_features": t["seg_features"], **roi_head.semantic_head(t["seg_features"])}
    coors = t["voxels_coors"]
    # The data preprocessor's voxel centers (it computes them per sample from the same coordinates); they are
    # not a graph input because the first stage never reads them.
    layer = model.data_preprocessor.voxel_layer
    centers = ((coors[:, [3, 2, 1]] + 0.5) * coors.new_tensor(layer.voxel_size, dtype=torch.float32)
               + coors.new_tensor(layer.point_cloud_range[0:3], dtype=torch.float32))
    outputs = roi_head._bbox_forward(feats, {"voxel_centers": centers, "coors": coors}, t["rois"])
    return {"cls_score": outputs["cls_score"], "bbox_pred": outputs["bbox_pred"]}


def _part_a2_detections(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """PartA2BboxHead.get_results: residuals decoded on the proposals, per-class NMS, as predict_bbox runs it."""
    roi_head = model.roi_head
    rois = t["rois"]
    results = roi_head.bbox_head.get_results(
        rois, t["cls_score"], t["bbox_pred"], per_sample(t, "roi_labels", rois, context.batch_size),
        per_sample(t, "roi_class_scores", rois, context.batch_size), list(context.metas), roi_head.test_cfg)
    return detections_of(results)


PART_A2_PLAN = SplitPlan((
    StageDef("rpn", _part_a2_rpn, "voxel encoder, SparseUNet, BEV backbone and neck, anchor RPN head (the one-graph "
             "export)", ("voxel_encoder", "middle_encoder", "backbone", "neck", "rpn_head"),
             ("voxels_voxels", "voxels_num_points", "voxels_coors")),
    ANCHOR_RPN_PROPOSALS,
    StageDef("roi", _part_a2_roi, "semantic head, RoI-aware pooling of part and segmentation features, the sparse "
             "conv bbox head on each RoI", ("roi_head", "data_preprocessor"), ("seg_features", "voxels_coors", "rois"),
             dims=(("rois", 0, "num_rois"),), row_sets=(("cls_score", "bbox_pred"),),
             dim_bounds=rois_up_to_nms_post),
    StageDef("detections", _part_a2_detections, "host: decode the refined boxes, per-class NMS -> detections",
             (), ("rois", "roi_labels", "roi_class_scores", "cls_score", "bbox_pred"), host=True,
             row_sets=(("bboxes_3d", "scores_3d", "labels_3d"),)),
), model_outputs_stage="rpn")


def _make_batched_roiaware_extractor_forward(context: PatchContext) -> Callable[..., Any]:
    from ..ops.points_in_boxes import roiaware_pool3d

    def forward(self: Any, feats: torch.Tensor, coordinate: torch.Tensor, batch_inds: torch.Tensor,
                rois: torch.Tensor) -> torch.Tensor:
        layer = self.roi_layer
        # Row order: the original concatenates sample 0's RoIs, then sample 1's, ...; RoIs come grouped by sample
        # in that order (bbox3d2roi), so one call over all of them gives the same rows.
        return roiaware_pool3d(rois[:, 1:], coordinate, feats, layer.out_size, layer.max_pts_per_voxel, layer.mode,
                               roi_batch=rois[:, 0].int(), point_batch=batch_inds.int())

    return forward


register_patch(ExportPatch(
    target="Single3DRoIAwareExtractor",
    method="forward",
    reason=("loops over range(int(batch_inds.max()) + 1) samples, a data-dependent count, with boolean-mask "
            "selections of each sample's RoIs and points; replaced by one RoI-aware pooling over all RoIs in which "
            "a RoI sees only its own sample's points (autoexport.ops.points_in_boxes.roiaware_pool3d)"),
    make=_make_batched_roiaware_extractor_forward,
))


register("PartA2", boundary=TensorBoundary(
    part_a2_rpn_forward, ("rpn_head",),
    host_side="PartA2RPNHead.predict_by_feat decodes the anchors' boxes and runs its NMS (test_cfg.rpn): the "
              "proposals (stages.json: proposals) whose seg_features the RoI head graph (stages.json: roi) pools; "
              "PartA2BboxHead.get_results decodes and NMSes its outputs",
    split_required=nms_between_stages("PartA2")), split_plan=PART_A2_PLAN)
