"""PillarFeatureNet and its PFNLayer: pillar decoration without in-place column writes; BatchNorm folding."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..knowledge import register
from ..patches import ExportPatch, PatchContext, register_patch


def _make_pillar_feature_net_forward(context: PatchContext) -> Callable[..., torch.Tensor]:
    def forward(self: Any, features: torch.Tensor, num_points: torch.Tensor, coors: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        from mmdet3d.models.voxel_encoders.utils import get_paddings_indicator

        # Same arithmetic as mmdet3d, column writes replaced by one broadcast subtraction and a concat.
        xyz = features[:, :, :3]
        decorations = []
        if self._with_cluster_center:
            points_mean = xyz.sum(dim=1, keepdim=True) / num_points.type_as(features).view(-1, 1, 1)
            decorations.append(xyz - points_mean)
        if self._with_voxel_center:
            dtype = features.dtype
            center = torch.stack([coors[:, 3].to(dtype) * self.vx + self.x_offset,
                                  coors[:, 2].to(dtype) * self.vy + self.y_offset,
                                  coors[:, 1].to(dtype) * self.vz + self.z_offset], dim=-1)
            f_center = xyz - center.unsqueeze(1)
            if self.legacy:
                # Legacy mode wrote the centered xyz into the input itself, so the raw-feature block and the
                # distance below see the centered values.
                features = torch.cat([f_center, features[:, :, 3:]], dim=-1)
                xyz = f_center
            decorations.append(f_center)
        if self._with_distance:
            decorations.append(torch.norm(xyz, 2, 2, keepdim=True))
        features = torch.cat([features, *decorations], dim=-1)
        mask = get_paddings_indicator(num_points, features.shape[1], axis=0)
        features = features * torch.unsqueeze(mask, -1).type_as(features)
        for pfn in self.pfn_layers:
            features = pfn(features, num_points)
        return features.squeeze(1)

    return forward


register_patch(ExportPatch(
    target="PillarFeatureNet",
    method="forward",
    reason=("writes the pillar-center offsets column by column into its input (features[:, :, i] = ...), which "
            "exports as ScatterElements/ScatterND; IREE turns those into one stack-allocated scatter that does not "
            "compile. Replaced by the same arithmetic with a concat, which also leaves the input unmodified"),
    make=_make_pillar_feature_net_forward,
))


register("PFNLayer", batchnorm_pair=lambda m: ("linear", "norm"),
         keep_float_in_int8="reads raw point coordinates and offsets in metres (range tens of metres, centimetre "
                            "detail): one int8 scale for all of them loses the detail")
