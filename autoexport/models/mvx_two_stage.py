"""MVXTwoStageDetector (CenterPoint, MVX-Net) and DynamicMVXFasterRCNN: their tensor path (mmdet3d leaves
`_forward` unimplemented), the static batch size of the point branch, the lidar split plan, FP16 sections."""

from __future__ import annotations

from typing import Any, Callable


from ..knowledge import register
from ..patches import ExportPatch, PatchContext, register_patch
from ..boundaries import TensorBoundary
from ..knowledge import NO_SPLIT_PLAN
from ..split import voxel_bev_plan


def mvx_two_stage_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """MVXTwoStageDetector (CenterPoint, MVX-Net) leaves `_forward` unimplemented; this is its tensor path."""
    metas = [sample.metainfo for sample in data_samples]
    img_feats, pts_feats = model.extract_feat(inputs, metas)
    outputs: dict[str, Any] = {}
    if pts_feats is not None and model.with_pts_bbox:
        outputs["pts"] = model.pts_bbox_head(pts_feats)
    if img_feats is not None and getattr(model, "with_img_bbox", False):
        outputs["img"] = model.img_bbox_head(img_feats)
    # A single branch is returned bare so output names stay short.
    return outputs["pts"] if list(outputs) == ["pts"] else outputs


def _make_mvx_extract_pts_feat(context: PatchContext, dynamic_voxels: bool) -> Callable[..., Any]:
    batch_size = context.batch_size

    def extract_pts_feat(self: Any, voxel_dict: dict, points: Any = None, img_feats: Any = None,
                         batch_input_metas: Any = None) -> Any:
        if not self.with_pts_bbox:
            return None
        if dynamic_voxels:  # DynamicMVXFasterRCNN: the encoder returns the voxel coordinates it made
            voxel_features, coors = self.pts_voxel_encoder(voxel_dict["voxels"], voxel_dict["coors"], points,
                                                           img_feats, batch_input_metas)
        else:
            voxel_features = self.pts_voxel_encoder(voxel_dict["voxels"], voxel_dict["num_points"],
                                                    voxel_dict["coors"], img_feats, batch_input_metas)
            coors = voxel_dict["coors"]
        # The original takes the batch size from coors[-1, 0] + 1, a data-dependent tensor; it is static here.
        x = self.pts_middle_encoder(voxel_features, coors, batch_size)
        x = self.pts_backbone(x)
        if self.with_pts_neck:
            x = self.pts_neck(x)
        return x

    return extract_pts_feat


for _target, _dynamic in (("MVXTwoStageDetector", False), ("DynamicMVXFasterRCNN", True)):
    register_patch(ExportPatch(
        target=_target,
        method="extract_pts_feat",
        reason=("computes the batch size as coors[-1, 0] + 1, a data-dependent tensor that sparse/scatter encoders "
                "use as a size; the export's batch size is static"),
        make=lambda context, _dynamic=_dynamic: _make_mvx_extract_pts_feat(context, _dynamic),
    ))


register("MVXTwoStageDetector", boundary=TensorBoundary(mvx_two_stage_forward, ("pts_bbox_head", "img_bbox_head")),
         split_plan=voxel_bev_plan("pts_", "pts_bbox_head", extra_args=True),
         fp16_sections=("img_backbone", "img_neck", "pts_backbone", "pts_neck", "pts_bbox_head"))
# Dynamic voxels do not fit the hard-voxel plan above, which it would otherwise inherit.
register("DynamicMVXFasterRCNN", split_plan=NO_SPLIT_PLAN)
