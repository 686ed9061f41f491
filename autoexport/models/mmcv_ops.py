"""mmcv's C++/CUDA ops, replaced by the op library (autoexport.ops): module classes by export patch, op functions
wherever a module imported them (OP_FUNCTION_SUBSTITUTIONS)."""

from __future__ import annotations

import importlib

from typing import Any, Callable

import torch

from ..patches import ExportPatch, PatchContext, register_patch
from ..patches import OP_FUNCTION_SUBSTITUTIONS, OpFunctionSubstitution, library_forward


# How each export finds active sites: IREE's sort is quadratic, so its export indexes them in dense grid tables.
_SITE_INDEX_BY_VARIANT = {"iree": "dense"}


def _site_indexed_forward(function_name: str) -> Callable[[PatchContext], Callable[..., Any]]:
    """A forward calling autoexport.ops.sparse_conv's `function_name` with the export variant's site index."""

    def make(context: PatchContext) -> Callable[..., Any]:
        function = getattr(importlib.import_module("autoexport.ops.sparse_conv"), function_name)
        site_index = _SITE_INDEX_BY_VARIANT.get(context.variant, "sort")

        def forward(self: Any, input: Any) -> Any:
            return function(self, input, site_index)

        return forward

    return make


def _make_sparse_sequential_forward(context: PatchContext) -> Callable[..., Any]:
    from ..ops.sparse_conv import sparse_sequential_forward

    def forward(self: Any, input: Any) -> Any:
        return sparse_sequential_forward(self, input)

    return forward


register_patch(ExportPatch(
    target="SparseConvolution",
    method="forward",
    reason=("mmcv's sparse convolution calls C++/CUDA ops (get_indice_pairs, indice_conv) that torch.export cannot "
            "trace and that have no CPU kernel in mmcv 2.1.0; replaced by autoexport.ops' rulebook + gather-GEMM "
            "in plain PyTorch (same output sites and order, checked against a dense conv3d in tests/test_ops.py)"),
    make=_site_indexed_forward("sparse_conv_forward"),
    substitutes="mmcv.ops.SparseConvolution (SubMConv3d, SparseConv3d, SparseInverseConv3d)",
    eager_devices=("cpu",),
    module="mmcv.ops.sparse_conv",
))

register_patch(ExportPatch(
    target="SparseMaxPool",
    method="forward",
    reason=("mmcv's sparse max pooling calls C++/CUDA ops (get_indice_pairs, indice_maxpool) that torch.export "
            "cannot trace and that have no CPU kernel in mmcv 2.1.0 (PartA2's RoI head pools with it); replaced by "
            "autoexport.ops' conv rulebook + gather + max in plain PyTorch (checked against a dense max_pool3d in "
            "tests/test_ops.py and against mmcv's CUDA kernel on an H200)"),
    make=_site_indexed_forward("sparse_maxpool_forward"),
    substitutes="mmcv.ops.SparseMaxPool (SparseMaxPool3d)",
    eager_devices=("cpu",),
    module="mmcv.ops.sparse_pool",
))

register_patch(ExportPatch(
    target="SparseSequential",
    method="forward",
    reason=("skips layers with `if input.indices.shape[0] != 0`, a data-dependent branch after every strided "
            "sparse conv; the replacement asserts at least one active site instead"),
    make=_make_sparse_sequential_forward,
    substitutes="mmcv.ops.SparseSequential",
))


for _class_name, _op in (("DeformConv2d", "deform_conv2d"), ("DeformConv2dPack", "deform_conv2d"),
                         ("ModulatedDeformConv2d", "modulated_deform_conv2d"),
                         ("ModulatedDeformConv2dPack", "modulated_deform_conv2d")):
    register_patch(ExportPatch(
        target=_class_name,
        method="forward",
        reason=(f"mmcv's {_op} is a C++/CUDA op torch.export cannot trace; replaced by autoexport.ops' bilinear "
                "sampling + grouped matmul in plain PyTorch (checked against mmcv's CPU kernel in tests/test_ops.py)"),
        make=library_forward("deform_conv", _class_name),
        substitutes=f"mmcv.ops.{_class_name} ({_op})",
    ))


OP_FUNCTION_SUBSTITUTIONS.extend([
    OpFunctionSubstitution(f"mmcv.ops.{name}", name)
    for name in ("furthest_point_sample", "furthest_point_sample_with_dist", "ball_query", "knn", "three_nn",
                 "three_interpolate", "gather_points", "grouping_operation")] + [
    # mmdet3d's own binding of mmcv's CUDA-only scatter kernel, called by the data preprocessor of voxel
    # segmentors (Cylinder3D, MinkUNet) for each point's voxel (point2voxel_map): host-side, before the graph.
    OpFunctionSubstitution("mmdet3d.models.data_preprocessors.voxelize.dynamic_scatter_3d", "dynamic_scatter_3d",
                           library_module="scatter",
                           reason="mmdet3d's dynamic_scatter_3d binds mmcv's CUDA-only dynamic_point_to_voxel kernel; "
                                  "autoexport.ops.scatter has it in PyTorch (point2voxel_map included)")] + [
    # Host-side in two-stage heads (PointRPNHead's NMS drops boxes holding no point) and box structures.
    OpFunctionSubstitution(f"mmcv.ops.{name}", name, library_module="points_in_boxes",
                           reason=f"mmcv's {name} has a CUDA kernel only; autoexport.ops.points_in_boxes has it in "
                                  "PyTorch, checked against mmcv's CUDA kernel on an H200")
    for name in ("points_in_boxes_part", "points_in_boxes_all")] + [
    # PAConvCUDA assembles its kernels with it (mmdet3d binds it as assign_score_cuda).
    OpFunctionSubstitution("mmcv.ops.assign_score_withk", "assign_score_withk", library_module="paconv",
                           reason="mmcv's assign_score_withk has a CUDA kernel only; autoexport.ops.paconv has it in "
                                  "PyTorch (a gather and one batched matmul), checked against a port of the CUDA "
                                  "kernel in tests/test_ops.py and against mmcv's CUDA kernel on an H200")])


_SCATTER_MAX_BY_VARIANT = {"iree": "scan"}  # IREE cannot import a reducing ScatterElements (max or min)


def _make_dynamic_scatter_forward(context: PatchContext) -> Callable[..., Any]:
    from ..ops.scatter import DynamicScatter

    max_by = _SCATTER_MAX_BY_VARIANT.get(context.variant, "scatter")

    def forward(self: Any, points: torch.Tensor, coors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return DynamicScatter.forward(self, points, coors, max_by)

    return forward


register_patch(ExportPatch(
    target="DynamicScatter",
    method="forward",
    reason=("mmcv's dynamic_point_to_voxel is a CUDA-only C++ op torch.export cannot trace, and its batch loop runs "
            "to a data-dependent count; replaced by autoexport.ops' unique + scatter-reduce over (batch, z, y, x) "
            "in plain PyTorch (checked against a numpy port of mmcv's kernel in tests/test_ops.py); in the IREE "
            "export a voxel's max is a scan over its sorted points"),
    make=_make_dynamic_scatter_forward,
    substitutes="mmcv.ops.DynamicScatter (dynamic_point_to_voxel)",
    eager_devices=("cpu",),
    module="mmcv.ops.scatter_points",
))


# ---- RoI-aware pooling (mmcv.ops, CUDA-only), substituted by autoexport.ops -----------------------

register_patch(ExportPatch(
    target="RoIAwarePool3d",
    method="forward",
    reason=("mmcv's roiaware_pool3d is a CUDA-only C++ op torch.export cannot trace (PartA2's RoI head pools part and "
            "segmentation features with it); replaced by autoexport.ops' point-in-RoI voxel max/avg pooling in plain "
            "PyTorch (checked against a port of mmcv's CUDA kernels in tests/test_ops.py and against mmcv's CUDA "
            "kernel on an H200, scripts/gpu_mmcv_reference.sh)"),
    make=library_forward("points_in_boxes", "RoIAwarePool3d"),
    substitutes="mmcv.ops.RoIAwarePool3d (roiaware_pool3d)",
    eager_devices=("cpu",),
    module="mmcv.ops.roiaware_pool3d",
))


register_patch(ExportPatch(
    target="RoIPointPool3d",
    method="forward",
    reason=("mmcv's roipoint_pool3d is a CUDA-only C++ op torch.export cannot trace (PointRCNN's RoI head samples "
            "each proposal's points with it); replaced by autoexport.ops' in-box test + rank scatter in plain "
            "PyTorch (checked against a port of mmcv's CUDA kernel in tests/test_ops.py)"),
    make=library_forward("points_in_boxes", "RoIPointPool3d"),
    substitutes="mmcv.ops.RoIPointPool3d (roipoint_pool3d)",
    eager_devices=("cpu",),
    module="mmcv.ops.roipoint_pool3d",
))


register_patch(ExportPatch(
    target="RoIAlign",
    method="forward",
    reason=("mmcv's roi_align is a C++/CUDA op torch.export cannot trace; replaced by autoexport::roi_align, a custom "
            "op with a PyTorch kernel and an ONNX RoiAlign translation (checked against mmcv's CPU kernel in "
            "tests/test_roi_align.py)"),
    make=library_forward("roi_align", "RoIAlign"),
    substitutes="mmcv.ops.RoIAlign (roi_align)",
))
