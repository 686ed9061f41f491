"""BEVFusion (mmdet3d projects/BEVFusion): what autoexport knows about it.

The project ships two compiled extensions, built by its setup.py with CUDA:
- `bevfusion.ops.bev_pool.bev_pool_ext` (camera BEV pooling, CUDA only): `autoexport.ops.bev_pool`.
- `bevfusion.ops.voxel.voxel_layer` (hard/dynamic voxelization, point scatter): the op library's voxelization.
Where they are not built, substitutes with the extensions' signatures stand in while the project imports
(`configs.extension_substitutes`), so the configs load on a CPU machine.
"""

from __future__ import annotations

import types
from typing import Any, Sequence

import torch
from torch import Tensor

from .. import configs
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

