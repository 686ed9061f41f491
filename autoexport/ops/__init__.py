"""Exportable replacements for the mmcv ops that mmdet3d models use, keyed by mmcv name in ``OP_LIBRARY``.

Each entry is plain PyTorch (traced by ``torch.export``, translated by torch.onnx's own op table) or a
``torch.library.custom_op`` in the ``autoexport`` namespace with a PyTorch kernel for every device, a fake kernel and
an ONNX translation; ``onnx_translation_table()`` is what ``torch.onnx.export(..., dynamo=True,
custom_translation_table=...)`` needs for the latter. No entry needs mmcv at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .deform_conv import (DeformConv2d, DeformConv2dPack, ModulatedDeformConv2d, ModulatedDeformConv2dPack,
                          deform_conv2d, modulated_deform_conv2d)
from .paconv import assign_score_withk
from .point_sample import (ball_query, furthest_point_sample, furthest_point_sample_onnx,
                           furthest_point_sample_with_dist, furthest_point_sample_with_dist_onnx, gather_points,
                           grouping_operation, knn, three_interpolate, three_nn)
from .points_in_boxes import (RoIAwarePool3d, RoIPointPool3d, points_in_boxes_all, points_in_boxes_cpu,
                              points_in_boxes_part)
from .roi_align import RoIAlign, roi_align_function, roi_align_onnx
from .scatter import DynamicScatter, dynamic_scatter
from .sparse_conv import (SparseConv3d, SparseConvTensor, SparseInverseConv3d, SparseMaxPool3d, SubMConv3d,
                          sparse_conv_forward)
from .nms import greedy_nms_keep_onnx
from .voxelize import Voxelization, hard_voxelize_onnx, voxelization

__all__ = ["OpEntry", "OP_LIBRARY", "onnx_translation_table", "SparseConvTensor", "sparse_conv_forward"]


@dataclass(frozen=True)
class OpEntry:
    mmcv_name: str
    kind: Literal["module", "function"]
    mmcv_target: str
    implementation: Callable
    method: Literal["pure-pytorch", "custom-op"]
    onnx_translation: Callable | None
    mmcv_cpu_kernel: bool  # whether mmcv 2.1.0 as built here runs this op on CPU (checked, not taken on trust)
    note: str


def _entry(mmcv_name: str, kind: Literal["module", "function"], implementation: Callable,
           method: Literal["pure-pytorch", "custom-op"], mmcv_cpu_kernel: bool, note: str,
           onnx_translation: Callable | None = None) -> OpEntry:
    return OpEntry(mmcv_name, kind, f"mmcv.ops.{mmcv_name}", implementation, method, onnx_translation,
                   mmcv_cpu_kernel, note)


_SPARSE_NOTE = ("rulebook by sort-based joins (sort + cumsum unique), one gather + one GEMM; mmcv 2.1.0 has no CPU "
                "get_indice_pairs/indice_conv, checked against a dense conv3d")

OP_LIBRARY: dict[str, OpEntry] = {entry.mmcv_name: entry for entry in [
    _entry("Voxelization", "module", Voxelization, "custom-op", True,
           "hard: autoexport::hard_voxelize (voxel count is data-dependent), mmcv's first-occurrence order; "
           "dynamic (max_num_points or max_voxels -1): plain PyTorch", hard_voxelize_onnx),
    _entry("voxelization", "function", voxelization, "custom-op", True,
           "function form of Voxelization", hard_voxelize_onnx),
    _entry("SubMConv3d", "module", SubMConv3d, "pure-pytorch", False, _SPARSE_NOTE),
    _entry("SparseConv3d", "module", SparseConv3d, "pure-pytorch", False,
           _SPARSE_NOTE + "; output sites sorted like mmcv's CUDA kernel"),
    _entry("SparseInverseConv3d", "module", SparseInverseConv3d, "pure-pytorch", False,
           "reads its paired conv's rulebook backwards (indice_key); " + _SPARSE_NOTE),
    _entry("SparseMaxPool3d", "module", SparseMaxPool3d, "pure-pytorch", False,
           "the conv rulebook of the pool's geometry, gather + max floored at 0 (mmcv's zero-initialised output)"),
    _entry("DeformConv2d", "module", DeformConv2d, "pure-pytorch", True,
           "bilinear gathers with mmcv's im2col arithmetic"),
    _entry("DeformConv2dPack", "module", DeformConv2dPack, "pure-pytorch", True, "'DCN': offsets from conv_offset"),
    _entry("ModulatedDeformConv2d", "module", ModulatedDeformConv2d, "pure-pytorch", True,
           "bilinear gathers with mmcv's im2col arithmetic, times the mask"),
    _entry("ModulatedDeformConv2dPack", "module", ModulatedDeformConv2dPack, "pure-pytorch", True,
           "'DCNv2': offsets and sigmoid mask from conv_offset"),
    _entry("deform_conv2d", "function", deform_conv2d, "pure-pytorch", True, "DCN v1 function, bias=False"),
    _entry("modulated_deform_conv2d", "function", modulated_deform_conv2d, "pure-pytorch", True,
           "DCN v2 function"),
    _entry("points_in_boxes_part", "function", points_in_boxes_part, "pure-pytorch", False,
           "first containing box (lowest index), -1 for none"),
    _entry("points_in_boxes_all", "function", points_in_boxes_all, "pure-pytorch", False,
           "(B, M, T) 0/1 flags; equals mmcv's points_in_boxes_cpu"),
    _entry("points_in_boxes_cpu", "function", points_in_boxes_cpu, "pure-pytorch", True,
           "the same flags as points_in_boxes_all"),
    _entry("furthest_point_sample", "function", furthest_point_sample, "custom-op", False,
           "autoexport::furthest_point_sample: sequential over samples, ONNX Loop translation",
           furthest_point_sample_onnx),
    _entry("furthest_point_sample_with_dist", "function", furthest_point_sample_with_dist, "custom-op", False,
           "autoexport::furthest_point_sample_with_dist over a (B, N, N) distance matrix, ONNX Loop translation",
           furthest_point_sample_with_dist_onnx),
    _entry("ball_query", "function", ball_query, "pure-pytorch", False,
           "(B, M, N) distance mask + top-k of hit positions; the stacked form (xyz_batch_cnt) masks pairs of "
           "different samples and numbers hits within each sample"),
    _entry("gather_points", "function", gather_points, "pure-pytorch", False, "torch.gather"),
    _entry("grouping_operation", "function", grouping_operation, "pure-pytorch", False,
           "torch.gather; the stacked form (features_batch_cnt) offsets each row's indices by its sample's start"),
    _entry("three_nn", "function", three_nn, "pure-pytorch", False, "three argmin passes, ties to the lower index"),
    _entry("three_interpolate", "function", three_interpolate, "pure-pytorch", False, "gather + weighted sum"),
    _entry("knn", "function", knn, "pure-pytorch", False, "(B, M, N) distances + top-k; tie order may differ"),
    _entry("dynamic_scatter", "function", dynamic_scatter, "pure-pytorch", False,
           "sorted unique (sort + cumsum) over linearised coordinates (unbacked voxel count) + scatter max/mean/sum"),
    _entry("DynamicScatter", "module", DynamicScatter, "pure-pytorch", False,
           "one lexicographic sort over (batch, z, y, x) instead of mmcv's per-sample loop"),
    _entry("RoIAwarePool3d", "module", RoIAwarePool3d, "pure-pytorch", False,
           "(R, P) in-box test, first max_pts_per_voxel-1 points per RoI voxel, scatter max/mean"),
    _entry("RoIPointPool3d", "module", RoIPointPool3d, "pure-pytorch", False,
           "(B, M, N) in-box test, cumsum ranks, scatter of the first S points per box, cyclic fill by remainder"),
    _entry("assign_score_withk", "function", assign_score_withk, "pure-pytorch", False,
           "PAConvCUDA's kernel assembly: gather neighbour and centre rows, one batched matmul over the weight bank"),
    _entry("RoIAlign", "module", RoIAlign, "custom-op", True,
           "autoexport::roi_align (per-RoI adaptive sampling grid), RoIs grouped by grid size, separable bilinear "
           "gathers; ONNX RoiAlign (opset 16+); avg only: ORT's max mode differs from mmcv's", roi_align_onnx),
    _entry("roi_align", "function", roi_align_function, "custom-op", True, "function form of RoIAlign",
           roi_align_onnx),
]}


def onnx_translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """``custom_translation_table`` for torch.onnx.export(dynamo=True) covering every autoexport custom op."""
    return {
        torch.ops.autoexport.hard_voxelize.default: hard_voxelize_onnx,
        torch.ops.autoexport.furthest_point_sample.default: furthest_point_sample_onnx,
        torch.ops.autoexport.furthest_point_sample_with_dist.default: furthest_point_sample_with_dist_onnx,
        torch.ops.autoexport.roi_align.default: roi_align_onnx,
        torch.ops.autoexport.greedy_nms_keep.default: greedy_nms_keep_onnx,
    }
