"""A small camera + lidar BEV fusion detector, defined outside mmdet3d and registered into its MODELS registry.

It stands in for models users bring through `custom_imports` (BEVFusion and the like) and is built from registry
components except for the camera-to-BEV lift below: pillars -> BEV canvas for the lidar branch; a ResNet feature
map sampled at the image projection of every BEV cell (through `lidar2img` from the sample's metainfo) for the
camera branch; concat -> SECOND backbone -> SECONDFPN -> Anchor3DHead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmdet3d.models.detectors import Base3DDetector
from mmdet3d.registry import MODELS


@MODELS.register_module()
class CameraBEVLift(nn.Module):
    """Image features onto the lidar BEV grid: project each cell center (at a fixed height) with lidar2img,
    sample the feature map bilinearly, zero where the cell is behind the camera or outside the image."""

    def __init__(self, in_channels: int, out_channels: int, point_cloud_range: list[float], grid_size: list[int],
                 height: float = -1.0, feature_stride: int = 8) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, out_channels, 1)
        x_min, y_min, _, x_max, y_max, _ = point_cloud_range
        nx, ny = grid_size
        xs = x_min + (torch.arange(nx) + 0.5) * (x_max - x_min) / nx
        ys = y_min + (torch.arange(ny) + 0.5) * (y_max - y_min) / ny
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # BEV canvas layout (ny, nx), as PointPillarsScatter
        centers = torch.stack([grid_x, grid_y, torch.full_like(grid_x, height), torch.ones_like(grid_x)], -1)
        self.register_buffer("centers", centers.reshape(-1, 4), persistent=False)
        self.canvas = (ny, nx)
        self.feature_stride = feature_stride

    def forward(self, features: Tensor, img_metas: list[dict]) -> Tensor:
        lifted = []
        for feature, meta in zip(self.reduce(features), img_metas):
            lidar2img = feature.new_tensor(meta["lidar2img"])  # a named model input once exported
            scale_w, scale_h = meta.get("scale_factor", (1.0, 1.0))[:2]
            projected = self.centers @ lidar2img.T
            depth = projected[:, 2]
            in_front = depth > 0.1
            safe_depth = torch.where(in_front, depth, torch.ones_like(depth))
            u = projected[:, 0] / safe_depth * scale_w / self.feature_stride - 0.5
            v = projected[:, 1] / safe_depth * scale_h / self.feature_stride - 0.5
            lifted.append(self._bilinear(feature, u, v, in_front).reshape(-1, *self.canvas))
        return torch.stack(lifted)

    @staticmethod
    def _bilinear(feature: Tensor, u: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        # Four gathers instead of grid_sample: plain Gather/Mul in ONNX, which every backend here compiles.
        channels, height, width = feature.shape
        flat = feature.reshape(channels, height * width)
        u0, v0 = torch.floor(u), torch.floor(v)
        result = feature.new_zeros(channels, u.shape[0])
        for du in (0.0, 1.0):
            for dv in (0.0, 1.0):
                cu, cv = u0 + du, v0 + dv
                weight = (1.0 - (u - cu).abs()) * (1.0 - (v - cv).abs())
                inside = valid & (cu >= 0) & (cu <= width - 1) & (cv >= 0) & (cv <= height - 1)
                index = (cv.clamp(0, height - 1) * width + cu.clamp(0, width - 1)).long()
                result = result + flat[:, index] * (weight * inside.to(weight.dtype))
        return result


@MODELS.register_module()
class TinyFusionDetector(Base3DDetector):
    def __init__(self, img_backbone: dict, camera_lift: dict, pts_voxel_encoder: dict, pts_middle_encoder: dict,
                 pts_backbone: dict, pts_neck: dict, pts_bbox_head: dict, train_cfg: dict | None = None,
                 test_cfg: dict | None = None, data_preprocessor: dict | None = None, init_cfg: Any = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.img_backbone = MODELS.build(img_backbone)
        self.camera_lift = MODELS.build(camera_lift)
        self.pts_voxel_encoder = MODELS.build(pts_voxel_encoder)
        self.pts_middle_encoder = MODELS.build(pts_middle_encoder)
        self.pts_backbone = MODELS.build(pts_backbone)
        self.pts_neck = MODELS.build(pts_neck)
        pts_bbox_head.update(train_cfg=train_cfg, test_cfg=test_cfg)
        self.bbox_head = MODELS.build(pts_bbox_head)  # named as single-stage heads are

    def extract_feat(self, batch_inputs_dict: dict, batch_input_metas: list[dict]) -> tuple[Tensor, ...]:
        voxels = batch_inputs_dict["voxels"]
        pillars = self.pts_voxel_encoder(voxels["voxels"], voxels["num_points"], voxels["coors"])
        lidar_bev = self.pts_middle_encoder(pillars, voxels["coors"], len(batch_input_metas))
        image_features = self.img_backbone(batch_inputs_dict["imgs"])[-1]
        camera_bev = self.camera_lift(image_features, batch_input_metas)
        fused = torch.cat([lidar_bev, camera_bev], dim=1)
        return self.pts_neck(self.pts_backbone(fused))

    def _forward(self, batch_inputs_dict: dict, batch_data_samples: list | None = None) -> Any:
        metas = [sample.metainfo for sample in batch_data_samples]
        return self.bbox_head(self.extract_feat(batch_inputs_dict, metas))

    def predict(self, batch_inputs_dict: dict, batch_data_samples: list, **kwargs: Any) -> list:
        metas = [sample.metainfo for sample in batch_data_samples]
        results = self.bbox_head.predict(self.extract_feat(batch_inputs_dict, metas), batch_data_samples)
        return self.add_pred_to_datasample(batch_data_samples, results)

    def loss(self, batch_inputs_dict: dict, batch_data_samples: list, **kwargs: Any) -> dict:
        metas = [sample.metainfo for sample in batch_data_samples]
        return self.bbox_head.loss(self.extract_feat(batch_inputs_dict, metas), batch_data_samples)


def _camera_to_bev(model: Any, tensors: dict[str, Tensor], context: Any) -> dict[str, Tensor]:
    """autoexport's camera.vtransform stage: the last image feature level lifted onto the BEV grid."""
    # img_features_0, _1, ... arrive in level order (StageDef.input_names orders them).
    last_level = [t for n, t in tensors.items() if n.startswith("img_features_")][-1]
    metas = [dict(meta) for meta in context.metas]
    metas[0]["lidar2img"] = tensors["lidar2img"]  # one sample per batch: the export's lidar2img input
    return {"camera_bev": model.camera_lift(last_level, metas)}


try:  # This project's deployment split for `autoexport --split`, registered by the project as BEVFusion's would be.
    from autoexport.knowledge import register
    from autoexport.split import camera_lidar_fusion_plan
except ImportError:  # autoexport is not installed: training and testing with mmdet3d do not need it
    pass
else:
    register("TinyFusionDetector", split_plan=camera_lidar_fusion_plan(_camera_to_bev, ("camera_lift",)))
