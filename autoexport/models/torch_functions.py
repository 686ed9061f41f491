"""torch functions replaced while tracing, for every caller (FUNCTION_SUBSTITUTIONS)."""

from __future__ import annotations

from typing import Any

import torch

from ..patches import FUNCTION_SUBSTITUTIONS, FunctionSubstitution


def _grid_sample_by_gather(*args: Any, **kwargs: Any) -> torch.Tensor:
    from ..ops.grid_sample import grid_sample_by_gather

    return grid_sample_by_gather(*args, **kwargs)


def _inverse_without_error_check(matrix: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.linalg.inv_ex(matrix)[0]


FUNCTION_SUBSTITUTIONS.extend([FunctionSubstitution(
    name="torch.inverse",
    functions=(torch.inverse, torch.linalg.inv, torch.Tensor.inverse),
    replacement=_inverse_without_error_check,
    reason=("torch.inverse/linalg.inv add a singular-matrix check that exports as a side-effect node ONNX cannot "
            "hold; linalg.inv_ex computes the same inverse without it (mmdet3d inverts 3x3/4x4 transforms, e.g. "
            "in point_sample; onnx_translations gives it an ONNX form)"),
), FunctionSubstitution(
    name="torch.nn.functional.grid_sample",
    functions=(torch.nn.functional.grid_sample,),
    replacement=_grid_sample_by_gather,
    reason=("IREE 3.13 lowers ONNX GridSample with zeros padding wrongly: sampling points outside the map read out of "
            "bounds (wrong values; a segfault at run time on ImVoxelNet's point_sample); autoexport.ops.grid_sample "
            "does the same sampling as index arithmetic and gathers"),
    variants=("iree",),
)])
