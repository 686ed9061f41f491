"""BEVFusion (mmdet3d projects/BEVFusion): what autoexport knows about it.

The project ships two compiled extensions, built by its setup.py with CUDA:
- `bevfusion.ops.bev_pool.bev_pool_ext` (camera BEV pooling, CUDA only): `autoexport.ops.bev_pool`.
- `bevfusion.ops.voxel.voxel_layer` (hard/dynamic voxelization, point scatter): the op library's voxelization.
Where they are not built, substitutes with the extensions' signatures stand in while the project imports
(`configs.extension_substitutes`), so the configs load on a CPU machine.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import configs, patches, samples
from ..boundaries import TensorBoundary, default_output_name
from ..knowledge import register
from ..ops import bev_pool as bev_pool_ops
from ..ops import voxelize as voxelize_ops


# ---- voxel_layer: the C++ signatures of the project's voxelization.cpp over the op library -------------------

def hard_voxelize(points: Tensor, voxels: Tensor, coors: Tensor, num_points_per_voxel: Tensor,
                  voxel_size: Sequence[float], coors_range: Sequence[float], max_points: int, max_voxels: int,
                  NDim: int = 3, deterministic: bool = True) -> int:
    """voxel_layer.hard_voxelize: fills the caller's buffers, returns the voxel count. The project's CPU kernel
    (voxelization_cpu.cpp) and its deterministic CUDA kernel number voxels by first point, as the library does,
    but write coordinates as (x, y, z) where mmcv's (and the library's) are (z, y, x): BEVFusionSparseEncoder's
    sparse_shape is (x, y, z)."""
    found_voxels, found_coors, found_counts = voxelize_ops.hard_voxelize(
        points, [float(v) for v in voxel_size], [float(v) for v in coors_range], int(max_points), int(max_voxels))
    count = found_voxels.shape[0]
    voxels[:count] = found_voxels
    coors[:count] = found_coors.flip(1)
    num_points_per_voxel[:count] = found_counts
    return count


def dynamic_voxelize(points: Tensor, coors: Tensor, voxel_size: Sequence[float], coors_range: Sequence[float],
                     NDim: int = 3) -> None:
    """voxel_layer.dynamic_voxelize: each point's (x, y, z) voxel, -1 outside the range, into `coors`."""
    coors.copy_(voxelize_ops.dynamic_voxelize(points, voxel_size, coors_range).flip(1))


def _not_substituted(name: str) -> Any:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"voxel_layer.{name} is not built here and autoexport has no substitute for it "
                                  "(BEVFusion's configs do not call it); build the project's extensions")
    missing.__name__ = name
    return missing


def make_voxel_layer(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "autoexport's stand-in for BEVFusion's voxel_layer extension")
    module.hard_voxelize = hard_voxelize
    module.dynamic_voxelize = dynamic_voxelize
    # The project's DynamicScatter binds these at import; no BEVFusion config builds it.
    module.dynamic_point_to_voxel_forward = _not_substituted("dynamic_point_to_voxel_forward")
    module.dynamic_point_to_voxel_backward = _not_substituted("dynamic_point_to_voxel_backward")
    return module


def make_bev_pool_ext(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "autoexport's stand-in for BEVFusion's bev_pool_ext extension")
    module.bev_pool_forward = bev_pool_ops.bev_pool_forward
    module.bev_pool_backward = bev_pool_ops.bev_pool_backward
    return module


configs.COMPILED_EXTENSION_SUBSTITUTES.extend([
    configs.ExtensionSubstitute("bevfusion.ops.bev_pool.bev_pool_ext", make_bev_pool_ext,
                                "autoexport.ops.bev_pool (PyTorch, the CUDA kernel's per-interval sums)"),
    configs.ExtensionSubstitute("bevfusion.ops.voxel.voxel_layer", make_voxel_layer,
                                "autoexport.ops.voxelize (hard and dynamic voxelization)"),
])


# ---- tensor path --------------------------------------------------------------------------------------------

def bevfusion_voxels(model: Any, inputs: dict, data_samples: list, ordinal: int) -> dict:
    """Host side, before the graph: the project's own `BEVFusion.voxelize` (hard voxelization, each voxel's
    points averaged), as CUDA-BEVFusion voxelizes before its lidar backbone. Camera inputs pass through."""
    feats, coords, _ = model.voxelize([points.float() for points in inputs["points"]])
    graph_inputs = {"voxels": {"feats": feats, "coords": coords}}
    if inputs.get("imgs") is not None:
        graph_inputs["imgs"] = inputs["imgs"]
        graph_inputs["points"] = inputs["points"]  # DepthLSSTransform projects the cloud into each image
    return graph_inputs


def bevfusion_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """BEVFusion leaves `_forward` empty; this is `extract_feat` after voxelization, and TransFusionHead.forward
    (heatmap, top proposals, decoder): what `predict` runs before `bbox_head.predict_by_feat`, with exact ties
    among the proposal scores in index order (index_ordered_ties)."""
    metas = [sample.metainfo for sample in data_samples]
    voxels = inputs["voxels"]
    features = []
    if inputs.get("imgs") is not None:
        features.append(_camera_features(model, inputs, metas))
    # extract_pts_feat reads the batch size from coords[-1, 0] + 1 (a tensor); the export's batch is static.
    features.append(model.pts_middle_encoder(voxels["feats"], voxels["coords"], len(data_samples)))
    x = model.fusion_layer(features) if model.fusion_layer is not None else features[0]
    x = model.pts_neck(model.pts_backbone(x))
    with index_ordered_ties():
        return model.bbox_head(x, metas)


def _camera_features(model: Any, inputs: dict, metas: list[dict]) -> Tensor:
    """BEVFusion.extract_feat's camera branch: the metas' camera matrices as tensors, then extract_img_feat."""
    imgs = inputs["imgs"].contiguous()

    def stacked(key: str) -> Tensor:
        return imgs.new_tensor(np.asarray([meta.get(key, np.eye(4)) for meta in metas]))

    return model.extract_img_feat(imgs, [p.clone() for p in inputs["points"]], stacked("lidar2img"),
                                  stacked("cam2img"), stacked("cam2lidar"), stacked("img_aug_matrix"),
                                  stacked("lidar_aug_matrix"), metas)


def transfusion_output_name(path: tuple) -> str:
    """TransFusionHead returns ([{name: tensor}],) for its one BEV level: the dict keys are the names."""
    return str(path[-1]) if path and isinstance(path[-1], str) else default_output_name(path)


register("BEVFusion", boundary=TensorBoundary(
    bevfusion_forward, ("bbox_head",), host_inputs=bevfusion_voxels,
    host_side=("the project's BEVFusion.voxelize before the graph (hard voxelization, voxel means); "
               "TransFusionHead.predict_by_feat after it (box decoding)")))
register("TransFusionHead", output_namer=transfusion_output_name)


# DepthLSSTransform pools the camera frustum with the project's bev_pool: a sort, intervals found with
# `torch.where` (a data-dependent count) and the extension kernel. The export runs the library's cell sum instead;
# the eager reference keeps the project's function (on the stand-in kernel), so parity checks the substitution.
patches.OP_FUNCTION_SUBSTITUTIONS.append(patches.OpFunctionSubstitution(
    "projects.BEVFusion.bevfusion.ops.bev_pool.bev_pool.bev_pool", "bev_pool", eager_devices=(),
    library_module="bev_pool",
    reason=("BEVFusion's bev_pool sorts the frustum points and finds equal-cell intervals with torch.where "
            "(data-dependent) before its CUDA kernel; autoexport.ops.bev_pool sums each point into its cell "
            "(index_add), checked against a port of bev_pool_cuda.cu in tests/test_bevfusion.py")))



# ---- TransFusionHead's proposals: exact ties in a fixed order ---------------------------------------------

def _stable_argsort(self: Tensor, dim: int = -1, descending: bool = False, stable: bool = False) -> Tensor:
    return torch.sort(self, dim=dim, descending=descending, stable=True).indices


@contextlib.contextmanager
def index_ordered_ties() -> Iterator[None]:
    """TransFusionHead picks its proposals with `heatmap.argsort(descending=True)`, an unstable sort: scores that
    are exactly equal (sigmoid saturates to 1.0 in float32) come out in an order the sort implementation picks
    (PyTorch's CPU sort does not keep index order, ONNX TopK does), so eager and runtime would list the same
    proposals in different orders. Around the head, in the tensor path that eager reference and export share,
    argsort is stable: ties in index order, ONNX TopK's rule."""
    argsort = torch.Tensor.argsort
    torch.Tensor.argsort = _stable_argsort
    try:
        yield
    finally:
        torch.Tensor.argsort = argsort


# The project's own multi-view image loader (BEVLoadMultiViewImageFromFiles) makes its samples camera samples.
samples._IMAGE_LOADERS.add("BEVLoadMultiViewImageFromFiles")
