"""MinkUNet: the voxel segmentor path of Cylinder3D, its host-side voxelization kept on the points' device, and
its spconv backbone with a static grid and batch size."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..knowledge import register
from ..patches import ExportPatch, PatchContext, register_patch
from ..boundaries import TensorBoundary
from .cylinder3d import point_to_voxel_map, voxel_segmentor_forward


register("MinkUNet", boundary=TensorBoundary(
    voxel_segmentor_forward, ("decode_head",), host_inputs=point_to_voxel_map,
    host_side="the data preprocessor's minkunet voxelization (rounding to the voxel grid, sparse_quantize) gives "
              "voxels, coors and point2voxel_map; argmax of seg_logits over classes is each point's label",
    input_meanings=(
        (r"voxels\.voxels$", "one point per occupied voxel (num_voxels, point_features), the first of its points "
                             "(the data preprocessor's sparse_quantize)", "num_voxels"),
        (r"voxels\.coors$", "integer voxel coordinates (batch_index, x, y, z) of each voxel, relative to the "
                            "cloud's minimum (minkunet voxelization, batch_first)", "num_voxels"))))


def _make_device_local_minkunet_voxelize(context: PatchContext) -> Callable[..., Any]:
    import numpy as np
    from mmdet3d.models.data_preprocessors.data_preprocessor import Det3DDataPreprocessor

    original = Det3DDataPreprocessor.voxelize  # other voxel types, and minkunet on CUDA, run mmdet3d's own

    @torch.no_grad()
    def voxelize(self: Any, points: list[torch.Tensor], data_samples: list) -> dict[str, torch.Tensor]:
        if self.voxel_type != "minkunet" or points[0].is_cuda:
            return original(self, points, data_samples)
        # mmdet3d's minkunet branch at test time, with its two `.cuda()` calls replaced by the points' device.
        voxels, coors = [], []
        voxel_size = points[0].new_tensor(self.voxel_layer.voxel_size)
        for i, (res, data_sample) in enumerate(zip(points, data_samples)):
            res_coors = torch.round(res[:, :3] / voxel_size).int()
            res_coors -= res_coors.min(0)[0]
            inds, point2voxel_map = self.sparse_quantize(res_coors.numpy(), return_index=True, return_inverse=True)
            inds = torch.from_numpy(np.asarray(inds)).to(res.device)
            if hasattr(data_sample.gt_pts_seg, "pts_semantic_mask"):
                data_sample.gt_pts_seg.voxel_semantic_mask = data_sample.gt_pts_seg.pts_semantic_mask[inds]
            batch_column = (1, 0) if self.batch_first else (0, 1)
            res_voxel_coors = torch.nn.functional.pad(res_coors[inds], batch_column, mode="constant", value=i)
            data_sample.batch_idx = res_voxel_coors[:, 0 if self.batch_first else -1]
            data_sample.point2voxel_map = torch.from_numpy(np.asarray(point2voxel_map)).to(res.device).long()
            voxels.append(res[inds])
            coors.append(res_voxel_coors)
        return {"voxels": torch.cat(voxels, dim=0), "coors": torch.cat(coors, dim=0)}

    return voxelize


register_patch(ExportPatch(
    target="Det3DDataPreprocessor",
    method="voxelize",
    reason=("host side, before the graph: the `minkunet` voxelization moves its voxel indices to CUDA with `.cuda()`, "
            "so MinkUNet cannot be preprocessed on a CPU; the replacement keeps them on the points' device (same "
            "arithmetic; other voxel types and CUDA inputs run mmdet3d's own method)"),
    make=_make_device_local_minkunet_voxelize,
    eager_devices=("cpu",),
    module="mmdet3d.models.data_preprocessors.data_preprocessor",
    applies_to=lambda preprocessor: getattr(preprocessor, "voxel_type", None) == "minkunet",
))


def _make_minkunet_spconv_forward(context: PatchContext) -> Callable[..., Any]:
    batch_size = context.batch_size

    def forward(self: Any, voxel_features: torch.Tensor, coors: torch.Tensor) -> torch.Tensor:
        if self.sparseconv_backend != "spconv":
            raise NotImplementedError(f"MinkUNetBackbone with sparseconv_backend={self.sparseconv_backend!r}: only "
                                      "the spconv backend runs on mmcv's sparse convolution")
        from mmdet3d.models.backbones.minkunet_backbone import SparseConvTensor  # mmcv's, without spconv 2
        from mmdet3d.models.layers.sparse_block import replace_feature
        # The grid is the data's extent (coors.max + 1, as mmdet3d computes it), kept as 0-d tensors: np.prod (mmcv's
        # SparseSequential) takes them, and the op library computes strided outputs' bounds from them in the graph.
        spatial_shape = tuple((coors.max(0)[0][1:] + 1).unbind(0))
        x = SparseConvTensor(voxel_features, coors, spatial_shape, batch_size)
        # MinkUNetBackbone.forward's spconv path from here on.
        x = self.conv_input(x)
        laterals = [x]
        for encoder_layer in self.encoder:
            x = encoder_layer(x)
            laterals.append(x)
        for decoder_layer, lateral in zip(self.decoder, laterals[:-1][::-1]):
            x = decoder_layer[0](x)
            x = replace_feature(x, torch.cat((x.features, lateral.features), dim=1))
            x = decoder_layer[1](x)
        return x.features

    return forward


register_patch(ExportPatch(
    target="MinkUNetBackbone",
    method="forward",
    reason=("its spconv path gives mmcv's SparseConvTensor the grid as one tensor (coors.max(0)[0][1:] + 1), on which "
            "mmcv's SparseSequential fails (np.prod of a tensor) on every device, and reads the batch size with "
            "int(coors[-1, 0]); the replacement passes the same grid as 0-d tensors and the static batch size"),
    make=_make_minkunet_spconv_forward,
    eager_devices=("cpu", "cuda"),  # mmdet3d's own forward cannot run with mmcv's spconv on any device
    module="mmdet3d.models.backbones.minkunet_backbone",
))
