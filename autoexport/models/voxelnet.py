"""VoxelNet and DynamicVoxelNet (PointPillars, SECOND, ...): the static batch size, the lidar split plan."""

from __future__ import annotations

from typing import Any, Callable


from ..knowledge import register
from ..patches import ExportPatch, PatchContext, register_patch
from ..split import voxel_bev_plan


def _make_voxelnet_extract_feat(context: PatchContext, dynamic_voxels: bool = False) -> Callable[..., Any]:
    batch_size = context.batch_size

    def extract_feat(self: Any, batch_inputs_dict: dict) -> Any:
        voxel_dict = batch_inputs_dict["voxels"]
        if dynamic_voxels:  # DynamicVoxelNet: the encoder returns the voxel coordinates it made
            voxel_features, coors = self.voxel_encoder(voxel_dict["voxels"], voxel_dict["coors"])
        else:
            voxel_features = self.voxel_encoder(voxel_dict["voxels"], voxel_dict["num_points"], voxel_dict["coors"])
            coors = voxel_dict["coors"]
        # The original reads the batch size with coors[-1, 0].item() + 1; it is static here.
        x = self.middle_encoder(voxel_features, coors, batch_size)
        x = self.backbone(x)
        if self.with_neck:
            x = self.neck(x)
        return x

    return extract_feat


for _target, _dynamic in (("VoxelNet", False), ("DynamicVoxelNet", True)):
    register_patch(ExportPatch(
        target=_target,
        method="extract_feat",
        reason=("computes the batch size with coors[-1, 0].item() + 1, a data-dependent scalar; the export's batch "
                "size is static"),
        make=lambda context, _dynamic=_dynamic: _make_voxelnet_extract_feat(context, _dynamic),
    ))


register("VoxelNet", split_plan=voxel_bev_plan("", "bbox_head", extra_args=False))
