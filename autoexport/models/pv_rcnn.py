"""PointVoxelRCNN (PV-RCNN): its first stage with the keypoint set abstraction as the one graph, the split plan,
and the stacked set abstraction and RoI grid pooling without data-dependent counts."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..knowledge import register
from ..patches import ExportPatch, PatchContext, register_patch
from ..boundaries import TensorBoundary, nms_between_stages
from ..split import SplitPlan, StageContext, StageDef, Tensors, detections_of, hard_voxels, numbered, per_sample
from .part_a2_rpn_head import ANCHOR_RPN_PROPOSALS, anchor_rpn_levels, rois_up_to_nms_post


def pv_rcnn_first_stage(model: Any, voxels: dict, points: list[torch.Tensor], batch_size: int) -> dict:
    """PV-RCNN's first stage, as PointVoxelRCNN.predict runs it up to the proposals, and its keypoint features:
    voxel encoder, SparseEncoder (the BEV map and its multi-scale sparse features), BEV backbone and neck, the
    anchor RPN head's raw outputs, then VoxelSetAbstraction (furthest-point keypoints of each cloud, their features
    pooled from the raw points, each sparse level and the BEV map). The set abstraction never reads the proposals,
    so it belongs to this graph; only the RoI head waits for the host's NMS."""
    features = model.voxel_encoder(voxels["voxels"], voxels["num_points"], voxels["coors"])
    # PointVoxelRCNN.extract_feat reads the batch size with coors[-1, 0].item() + 1; it is static here.
    spatial, multi_scale = model.middle_encoder(features, voxels["coors"], batch_size)
    x = model.backbone(spatial)
    if getattr(model, "neck", None) is not None:
        x = model.neck(x)
    outputs = anchor_rpn_levels(model.rpn_head(x))
    keypoints = model.points_encoder({"points": points, "voxels": voxels},
                                     {"spatial_feats": spatial, "multi_scale_3d_feats": multi_scale}, None)
    return {**outputs, **keypoints}


def pv_rcnn_rpn_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """pv_rcnn_first_stage on the data preprocessor's hard voxels and the raw clouds."""
    return pv_rcnn_first_stage(model, inputs["voxels"], list(inputs["points"]), len(data_samples))


def _pv_rcnn_rpn(model: Any, t: Tensors, context: StageContext) -> Tensors:
    return {"head_outputs": pv_rcnn_first_stage(model, hard_voxels(t), numbered(t, "points_"), context.batch_size)}


def _pv_rcnn_roi(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """PVRCNNRoiHead.predict up to its bbox head: keypoint features weighted by the semantic head's foreground
    score, RoI grid pooling of them around each proposal, PVRCNNBBoxHead's raw class score and box residuals."""
    roi_head = model.roi_head
    seg_preds = roi_head.semantic_head(t["keypoint_features"])["seg_preds"]
    features = t["fusion_keypoint_features"] * seg_preds.sigmoid().max(dim=-1, keepdim=True).values
    outputs = roi_head._bbox_forward(features, t["keypoints"], t["rois"])
    return {"cls_score": outputs["bbox_scores"], "bbox_pred": outputs["bbox_reg"]}


def _pv_rcnn_detections(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """PVRCNNBBoxHead.get_results: residuals decoded on the proposals, NMS, as PVRCNNRoiHead.predict runs it."""
    roi_head = model.roi_head
    rois = t["rois"]
    results = roi_head.bbox_head.get_results(rois, t["cls_score"], t["bbox_pred"],
                                             per_sample(t, "roi_labels", rois, context.batch_size),
                                             list(context.metas), roi_head.test_cfg)
    return detections_of(results)


PV_RCNN_PLAN = SplitPlan((
    StageDef("rpn", _pv_rcnn_rpn, "voxel encoder, sparse encoder, BEV backbone and neck, anchor RPN head, and the "
             "voxel set abstraction of keypoints (the one-graph export)",
             ("voxel_encoder", "middle_encoder", "backbone", "neck", "rpn_head", "points_encoder"),
             ("voxels_voxels", "voxels_num_points", "voxels_coors", "points_*")),
    ANCHOR_RPN_PROPOSALS,
    StageDef("roi", _pv_rcnn_roi, "foreground-weighted keypoint features, RoI grid pooling around each proposal, "
             "the bbox head's MLPs on each RoI", ("roi_head",),
             ("keypoint_features", "fusion_keypoint_features", "keypoints", "rois"),
             dims=(("rois", 0, "num_rois"),), row_sets=(("cls_score", "bbox_pred"),),
             dim_bounds=rois_up_to_nms_post),
    StageDef("detections", _pv_rcnn_detections, "host: decode the refined boxes, NMS -> detections",
             (), ("rois", "roi_labels", "cls_score", "bbox_pred"), host=True,
             row_sets=(("bboxes_3d", "scores_3d", "labels_3d"),)),
), model_outputs_stage="rpn")


def _make_stack_query_and_group_forward(context: PatchContext) -> Callable[..., Any]:
    # Looked up when called: OP_FUNCTION_SUBSTITUTIONS rebinds the module's ball_query and grouping_operation.
    from mmdet3d.models.layers.pointnet_modules import stack_point_sa_module as ops

    def forward(self: Any, xyz: torch.Tensor, xyz_batch_cnt: torch.Tensor, new_xyz: torch.Tensor,
                new_xyz_batch_cnt: torch.Tensor, features: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        # mmdet3d's forward without its two asserts that the counts sum to the row counts: callers compute the
        # counts from those rows, and an assert on a tensor sum is a guard torch.export cannot decide.
        ball_query, grouping_operation = ops.ball_query, ops.grouping_operation
        idx = ball_query(0, self.radius, self.sample_nums, xyz, new_xyz, xyz_batch_cnt, new_xyz_batch_cnt)
        empty_ball = (idx[:, 0] == -1)
        idx = torch.where(empty_ball[:, None], torch.zeros_like(idx), idx)
        grouped_xyz = grouping_operation(xyz, idx, xyz_batch_cnt, new_xyz_batch_cnt) - new_xyz.unsqueeze(-1)
        grouped_xyz = torch.where(empty_ball[:, None, None], torch.zeros_like(grouped_xyz), grouped_xyz)
        if features is None:
            assert self.use_xyz, "Cannot have not features and not use xyz as a feature!"
            return grouped_xyz, idx
        grouped = grouping_operation(features, idx, xyz_batch_cnt, new_xyz_batch_cnt)
        grouped = torch.where(empty_ball[:, None, None], torch.zeros_like(grouped), grouped)
        return (torch.cat([grouped_xyz, grouped], dim=1) if self.use_xyz else grouped), idx

    return forward


register_patch(ExportPatch(
    target="StackQueryAndGroup",
    method="forward",
    reason=("asserts that the stacked clouds' per-sample counts sum to their row counts, a guard on tensor values "
            "torch.export cannot decide (the counts are computed from those rows); the same grouping without them"),
    make=_make_stack_query_and_group_forward,
))


def _row_count(rows: torch.Tensor) -> torch.Tensor:
    """A row count as a 0-d int64 tensor computed from the rows: len(rows) or new_tensor([len(rows)]) would bake
    the traced count into the graph as a constant, and torch.onnx cannot take a remainder by a symbolic int."""
    return torch.ones_like(rows[:, 0], dtype=torch.int64).sum()


def _sample_counts(batch_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Rows per sample (int32, as the stacked ops' *_batch_cnt) from each row's sample index, for a static batch
    size: mmdet3d fills these in Python loops of item writes, over a batch size read from the data."""
    samples = torch.arange(batch_size, device=batch_index.device)
    return (batch_index.int()[None, :] == samples[:, None]).sum(dim=1).int()


def _make_key_point_sampler(context: PatchContext) -> Callable[..., Any]:
    # Looked up when called: OP_FUNCTION_SUBSTITUTIONS rebinds the module's furthest_point_sample.
    from mmdet3d.models.middle_encoders import voxel_set_abstraction as ops

    def sample_key_points(self: Any, points: list[torch.Tensor], coors: torch.Tensor | None) -> torch.Tensor:
        if self.voxel_center_as_source:
            raise NotImplementedError("VoxelSetAbstraction with voxel_center_as_source=True takes keypoints from "
                                      "a data-dependent per-sample voxel selection, which autoexport cannot export "
                                      "yet; use voxel_center_as_source=False (as mmdet3d's PV-RCNN configs do) or "
                                      "register an export patch for VoxelSetAbstraction.sample_key_points")
        keypoints = []
        for cloud in points:
            xyz = cloud[:, :3]
            sampled = ops.furthest_point_sample(xyz.unsqueeze(0).contiguous(), self.num_keypoints).long()[0]
            # mmdet3d repeats the first num_points indices when a cloud has fewer points than keypoints
            # (`if num_points < num_keypoints`, a guard on the dynamic point count); taking them modulo
            # min(num_points, num_keypoints) is the same selection either way.
            kept = _row_count(xyz).clamp(max=self.num_keypoints)
            keypoints.append(xyz[sampled[torch.arange(self.num_keypoints, device=xyz.device) % kept]])
        return torch.stack(keypoints, dim=0)

    return sample_key_points


def _make_set_abstraction_forward(context: PatchContext) -> Callable[..., Any]:
    def forward(self: Any, batch_inputs_dict: dict, feats_dict: dict, rpn_results_list: Any) -> dict:
        # VoxelSetAbstraction.forward (mmdet3d 1.4) with the stacked clouds' per-sample counts computed as tensors.
        points = batch_inputs_dict["points"]
        voxel_encode_features = feats_dict["multi_scale_3d_feats"]
        coors = batch_inputs_dict["voxels"]["coors"] if self.voxel_center_as_source else None
        keypoints = self.sample_key_points(points, coors)
        batch_size, num_keypoints, _ = keypoints.shape
        point_features_list = []
        if self.bev_cfg is not None:
            point_features_list.append(self.interpolate_from_bev_features(
                keypoints, feats_dict["spatial_feats"], batch_size, self.bev_cfg.bev_scale_factor).contiguous())
        key_xyz = keypoints.view(-1, 3)
        key_xyz_batch_cnt = torch.full((batch_size,), num_keypoints, dtype=torch.int32, device=key_xyz.device)
        if self.rawpoints_sa_layer is not None:
            batch_points = torch.cat(points, dim=0)
            xyz_batch_cnt = torch.stack([_row_count(p) for p in points]).int()
            _, pooled = self.rawpoints_sa_layer(
                xyz=batch_points[:, :3].contiguous(), xyz_batch_cnt=xyz_batch_cnt, new_xyz=key_xyz.contiguous(),
                new_xyz_batch_cnt=key_xyz_batch_cnt, features=batch_points[:, 3:].contiguous())
            point_features_list.append(pooled.contiguous().view(batch_size, num_keypoints, -1))
        if self.voxel_sa_layers is not None:
            for k, voxel_sa_layer in enumerate(self.voxel_sa_layers):
                cur_coords = voxel_encode_features[k].indices
                xyz = self.get_voxel_centers(coors=cur_coords,
                                             scale_factor=self.voxel_sa_configs_list[k].scale_factor).contiguous()
                xyz_batch_cnt = _sample_counts(cur_coords[:, 0], batch_size)
                _, pooled = voxel_sa_layer(
                    xyz=xyz, xyz_batch_cnt=xyz_batch_cnt, new_xyz=key_xyz.contiguous(),
                    new_xyz_batch_cnt=key_xyz_batch_cnt, features=voxel_encode_features[k].features.contiguous())
                point_features_list.append(pooled.contiguous().view(batch_size, num_keypoints, -1))
        point_features = torch.cat(point_features_list, dim=-1).view(batch_size * num_keypoints, -1, 1)
        fusion_point_features = self.point_feature_fusion_layer(point_features.unsqueeze(dim=-1)).squeeze(dim=-1)
        batch_idxs = torch.arange(batch_size * num_keypoints, device=keypoints.device) // num_keypoints
        keypoints_bxyz = torch.cat((batch_idxs.to(key_xyz.dtype).unsqueeze(dim=-1), key_xyz), dim=-1)
        return dict(keypoint_features=point_features.squeeze(dim=-1),
                    fusion_keypoint_features=fusion_point_features.squeeze(dim=-1), keypoints=keypoints_bxyz)

    return forward


register_patch(ExportPatch(
    target="VoxelSetAbstraction",
    method="forward",
    reason=("builds the raw clouds' per-sample point counts with new_tensor([len(p) for p in points]), which "
            "bakes the traced point count into the graph, and the voxel levels' counts in a Python loop of item "
            "writes; the same counts computed as tensors"),
    make=_make_set_abstraction_forward,
))


register_patch(ExportPatch(
    target="VoxelSetAbstraction",
    method="sample_key_points",
    reason=("branches on whether a cloud has fewer points than keypoints, a guard on the dynamic point count; the "
            "same keypoints chosen without the branch"),
    make=_make_key_point_sampler,
))


def _make_roi_grid_extractor_forward(context: PatchContext) -> Callable[..., Any]:
    batch_size = context.batch_size

    def forward(self: Any, feats: torch.Tensor, coordinate: torch.Tensor, batch_inds: torch.Tensor,
                rois: torch.Tensor) -> torch.Tensor:
        xyz_batch_cnt = _sample_counts(batch_inds, batch_size)
        roi_grid = self.get_dense_grid_points(rois[:, 1:])  # (num_rois, grid_size ** 3, 3)
        new_xyz_batch_cnt = _sample_counts(rois[:, 0], batch_size) * roi_grid.shape[1]
        _, pooled = self.roi_grid_pool_layer(xyz=coordinate.contiguous(), xyz_batch_cnt=xyz_batch_cnt,
                                             new_xyz=roi_grid.reshape(-1, 3).contiguous(),
                                             new_xyz_batch_cnt=new_xyz_batch_cnt, features=feats.contiguous())
        return pooled.view(-1, self.grid_size, self.grid_size, self.grid_size, pooled.shape[-1])

    return forward


def _make_dense_grid_points(context: PatchContext) -> Callable[..., Any]:
    from mmdet3d.structures.bbox_3d import rotation_3d_in_axis

    def get_dense_grid_points(self: Any, rois: torch.Tensor) -> torch.Tensor:
        # mmdet3d takes the grid cells' indices as nonzero() of a grid of ones (a data-dependent row count to
        # torch.export); the same indices in the same (row-major) order from a meshgrid.
        axis = torch.arange(self.grid_size, device=rois.device)
        cells = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3)
        offsets = (cells.to(rois.dtype) + 0.5) / self.grid_size - 0.5
        centers = torch.cat([rois[:, :2], rois[:, 2:3] + rois[:, 5:6] / 2], dim=1)
        grid = rotation_3d_in_axis(offsets * rois[:, 3:6].view(-1, 1, 3), rois[:, 6], axis=2)
        return grid + centers.view(-1, 1, 3)

    return get_dense_grid_points


register_patch(ExportPatch(
    target="Batch3DRoIGridExtractor",
    method="forward",
    reason=("takes the batch size as int(batch_inds.max()) + 1 and fills per-sample counts in a Python loop, a "
            "data-dependent count; counted against the export's static batch size instead"),
    make=_make_roi_grid_extractor_forward,
))

register_patch(ExportPatch(
    target="Batch3DRoIGridExtractor",
    method="get_dense_grid_points",
    reason=("indexes the RoI grid's cells with nonzero() of a grid of ones, a data-dependent row count to "
            "torch.export; the same cells in the same order from a meshgrid"),
    make=_make_dense_grid_points,
))


register("PointVoxelRCNN", boundary=TensorBoundary(
    pv_rcnn_rpn_forward, ("rpn_head",),
    host_side="PartA2RPNHead.predict_by_feat decodes the anchors' boxes and runs its NMS (test_cfg.rpn): the "
              "proposals (stages.json: proposals) around which the RoI head graph (stages.json: roi) pools the "
              "keypoint features; PVRCNNBBoxHead.get_results decodes and NMSes its outputs",
    split_required=nms_between_stages("PV-RCNN")), split_plan=PV_RCNN_PLAN)
