"""ImVoteNet: its image branch's first stage (and stage-2 configs' PointNet++ seeds) as the one graph, and the
split plan through the image RoI head, the image votes and the joint vote head."""

from __future__ import annotations

from typing import Any

import torch

from ..boundaries import TensorBoundary, dict_key_name, nms_between_stages
from ..knowledge import register
from ..split import SplitPlan, StageContext, StageDef, StageForward, Tensors, detections_of, numbered, per_sample


def imvotenet_first_stage(model: Any, imgs: torch.Tensor, points: list[torch.Tensor] | None) -> dict:
    """ImVoteNet's first stage, as ImVoteNet.predict runs it up to the image RPN's proposals: the image backbone and
    FPN (their levels feed the RoI head too) and the RPN head's raw outputs; with a point branch (stage-2 configs),
    also the PointNet++ backbone's seeds, which never wait for the 2D detections. mmdet3d gives ImVoteNet no
    tensor forward (`_forward` is a stub)."""
    x = model.img_backbone(imgs)
    if getattr(model, "img_neck", None) is not None:
        x = model.img_neck(x)
    cls_scores, bbox_preds = model.img_rpn_head(x)
    outputs = {f"img_feature_{i}": f for i, f in enumerate(x)}
    outputs.update({f"rpn_cls_score_{i}": t for i, t in enumerate(cls_scores)})
    outputs.update({f"rpn_bbox_pred_{i}": t for i, t in enumerate(bbox_preds)})
    if points is not None and getattr(model, "pts_backbone", None) is not None:
        # ImVoteNet.extract_pts_feat's steps on the detector's parts (the split's stage module holds parts only).
        features = model.pts_backbone(torch.stack(points))
        if getattr(model, "pts_neck", None) is not None:
            features = model.pts_neck(features)
        outputs.update(seeds_3d=features["fp_xyz"][-1], seed_3d_features=features["fp_features"][-1],
                       seed_indices_3d=features["fp_indices"][-1])
    return outputs


def imvotenet_first_stage_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """imvotenet_first_stage on the data preprocessor's images and, where the pipeline loads them, clouds."""
    points = inputs.get("points")
    return imvotenet_first_stage(model, inputs["imgs"], list(points) if points is not None else None)


def _imvotenet_backbones(model: Any, t: Tensors, context: StageContext) -> Tensors:
    return {"head_outputs": imvotenet_first_stage(model, t["imgs"], numbered(t, "points_") or None)}


def _image_proposals(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """RPNHead.predict_by_feat (anchor decoding, NMS) as ImVoteNet.predict_img_only runs it (no rescale)."""
    from mmdet.structures.bbox import bbox2roi

    head = model.img_rpn_head
    results = head.predict_by_feat(numbered(t, "rpn_cls_score_"), numbered(t, "rpn_bbox_pred_"),
                                   batch_img_metas=list(context.metas), cfg=head.test_cfg, rescale=False)
    return {"image_rois": bbox2roi([r.bboxes for r in results])}


def _image_roi(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """StandardRoIHead._bbox_forward: RoIAlign of each proposal from its FPN level, the shared-FC bbox head."""
    outputs = model.img_roi_head._bbox_forward(numbered(t, "img_feature_"), t["image_rois"])
    return {"image_cls_score": outputs["cls_score"], "image_bbox_pred": outputs["bbox_pred"]}


def _image_detections(rescale: bool) -> StageForward:
    def forward(model: Any, t: Tensors, context: StageContext) -> Tensors:
        """BBoxHead.predict_by_feat (box decoding, per-class NMS) as StandardRoIHead.predict_bbox runs it."""
        roi_head = model.img_roi_head

        def per_image(name: str) -> list[torch.Tensor]:
            return per_sample(t, name, t["image_rois"], context.batch_size)

        results = roi_head.bbox_head.predict_by_feat(per_image("image_rois"), per_image("image_cls_score"),
                                                     per_image("image_bbox_pred"), list(context.metas),
                                                     rcnn_test_cfg=roi_head.test_cfg, rescale=rescale)
        return {"bboxes_2d": torch.cat([r.bboxes for r in results]),
                "scores_2d": torch.cat([r.scores for r in results]),
                "labels_2d": torch.cat([r.labels for r in results]),
                "image_index_2d": torch.cat([torch.full_like(r.labels, i) for i, r in enumerate(results)])}

    return forward


# The seed sampler draws with torch.randperm; the host step draws from a fixed seed so that a deployment, the
# eager chain and the exported chain pick the same seeds (mmdet3d's predict draws from the global generator).
IMVOTE_SAMPLING_SEED = 0


def _imvotes(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """ImVoteNet.predict between its image and point branches: each image's 2D detections sorted by score,
    VoteFusion's geometric, semantic and texture cues for every seed and box (no weights; it branches on the box
    count), and sample_valid_seeds' choice of num_sampled_seed image votes."""
    from mmdet3d.models.detectors.imvotenet import sample_valid_seeds

    boxes_with_labels = []
    for image in range(context.batch_size):
        rows = t["image_index_2d"] == image
        rows_of_image = torch.cat([t["bboxes_2d"][rows], t["scores_2d"][rows, None],
                                   t["labels_2d"][rows, None].to(t["bboxes_2d"].dtype)], dim=-1)
        boxes_with_labels.append(rows_of_image[torch.argsort(rows_of_image[:, 4], descending=True)])
    features, masks = model.fusion_layer(t["imgs"], boxes_with_labels, t["seeds_3d"], list(context.metas))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(IMVOTE_SAMPLING_SEED)
        chosen = sample_valid_seeds(masks, model.num_sampled_seed)
    return {"imvote_features": features, "imvote_indices": chosen}


# What VoteHead.predict_by_feat reads of the head's outputs (its bbox coder's decode and the two scores).
_VOTE_DECODE_KEYS = ("center", "dir_class", "dir_res", "size_class", "size_res", "obj_scores", "sem_scores")


def _imvotenet_joint_head(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """ImVoteNet.predict after the seed sampling: the chosen image votes and their seeds gathered, img_mlp, the
    fused features into the joint VoteHead."""
    chosen = t["imvote_indices"]
    batch, image_channels = t["imvote_features"].shape[:2]
    features = t["imvote_features"].gather(-1, chosen.view(batch, 1, -1).expand(-1, image_channels, -1))
    # VoteFusion lays the votes out rank-major (every seed's first vote, then every second one ...): modulo the
    # seed count (num_sampled_seed here, as mmdet3d writes it) is the vote's seed.
    seeds = chosen % chosen.shape[1]
    seed_points = t["seeds_3d"].gather(1, seeds.view(batch, -1, 1).expand(-1, -1, 3))
    point_channels = t["seed_3d_features"].shape[1]
    seed_features = t["seed_3d_features"].gather(-1, seeds.view(batch, 1, -1).expand(-1, point_channels, -1))
    fused = torch.cat([seed_features, model.img_mlp(features)], dim=1)
    outputs = model.pts_bbox_head_joint({"seed_points": seed_points, "seed_features": fused,
                                         "seed_indices": t["seed_indices_3d"].gather(1, seeds)})
    return {key: outputs[key] for key in _VOTE_DECODE_KEYS if key in outputs}


def _imvotenet_detections(model: Any, t: Tensors, context: StageContext) -> Tensors:
    """VoteHead.predict_by_feat: box decoding and per-class 3D NMS, as the joint head's predict runs it."""
    results = model.pts_bbox_head_joint.predict_by_feat(numbered(t, "points_"), t, list(context.metas))
    return detections_of(results)


def _image_rois_up_to_max_per_img(model: Any, context: StageContext) -> dict[str, int]:
    return {"num_image_rois": model.img_rpn_head.test_cfg.max_per_img * context.batch_size}


_IMAGE_DETECTIONS = ("bboxes_2d", "scores_2d", "labels_2d", "image_index_2d")


def imvotenet_plan(model: Any) -> SplitPlan:
    """ImVoteNet's stages: its image branch (a Faster R-CNN), and for stage-2 configs (with a point branch) the
    image votes and the joint vote head. Stage-1 configs (image branch only) end with 2D detections in the
    original image's pixels, as ImVoteNet.predict returns them."""
    with_points = getattr(model, "pts_backbone", None) is not None
    image_stages = (
        StageDef("backbones", _imvotenet_backbones,
                 "image backbone, FPN and RPN head" + (", PointNet++ seeds" if with_points else "")
                 + " (the one-graph export)",
                 ("img_backbone", "img_neck", "img_rpn_head") + (("pts_backbone", "pts_neck") if with_points else ()),
                 ("imgs", "points_*")),
        StageDef("image_proposals", _image_proposals, "host: decode the anchors' boxes, NMS -> 2D RoIs", (),
                 ("rpn_cls_score_*", "rpn_bbox_pred_*"), host=True, row_sets=(("image_rois",),)),
        StageDef("image_roi", _image_roi, "RoIAlign of each proposal from its FPN level, the shared-FC bbox head",
                 ("img_roi_head",), ("img_feature_*", "image_rois"), dims=(("image_rois", 0, "num_image_rois"),),
                 dim_bounds=_image_rois_up_to_max_per_img, row_sets=(("image_cls_score", "image_bbox_pred"),)),
        StageDef("image_detections", _image_detections(rescale=not with_points),
                 "host: decode the refined 2D boxes, per-class NMS -> 2D detections", (),
                 ("image_rois", "image_cls_score", "image_bbox_pred"), host=True, row_sets=(_IMAGE_DETECTIONS,)),
    )
    if not with_points:
        return SplitPlan(image_stages, covers_camera=True, model_outputs_stage="backbones")
    return SplitPlan(image_stages + (
        StageDef("imvotes", _imvotes, "host: VoteFusion's cues per seed and 2D box, seeded sampling of "
                 "num_sampled_seed image votes", (), ("imgs", "seeds_3d") + _IMAGE_DETECTIONS, host=True),
        StageDef("joint_head", _imvotenet_joint_head, "the chosen votes' seeds and image cues, img_mlp, the joint "
                 "VoteHead", ("img_mlp", "pts_bbox_head_joint"),
                 ("seeds_3d", "seed_3d_features", "seed_indices_3d", "imvote_features", "imvote_indices")),
        StageDef("detections", _imvotenet_detections, "host: decode the vote head's boxes, 3D NMS -> detections",
                 (), ("points_*",) + _VOTE_DECODE_KEYS, host=True, row_sets=(("bboxes_3d", "scores_3d", "labels_3d"),)),
    ), covers_camera=True, model_outputs_stage="backbones")


register("ImVoteNet", boundary=TensorBoundary(
    imvotenet_first_stage_forward, ("img_rpn_head",),
    host_side="RPNHead.predict_by_feat decodes the anchors and runs its NMS (test_cfg.img_rpn): the proposals "
              "(stages.json: image_proposals) the RoI head graph (stages.json: image_roi) pools; Shared2FCBBoxHead."
              "predict_by_feat decodes and NMSes its outputs into 2D detections; stage-2 configs then run VoteFusion "
              "and the seed sampling on the host (stages.json: imvotes) before the joint vote head graph "
              "(stages.json: joint_head) and VoteHead.predict_by_feat",
    split_required=nms_between_stages("ImVoteNet")),
    split_plan=imvotenet_plan)  # a function: its stages depend on whether it has a point branch
register("RPNHead", output_namer=dict_key_name)  # mmdet's, ImVoteNet's image RPN
