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


def _rows_data_dependent(input: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
    """A data-dependent row count that may be zero: aten::batch_norm's emptiness check cannot be decided for it.
    Where the trace already knows the input is not empty (e.g. the sparse encoders' sites), the original runs."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, statically_known_true

    rows = input.shape[0]
    return (isinstance(rows, torch.SymInt) and bool(free_unbacked_symbols(rows))
            and not statically_known_true(input.numel() != 0))


def _batch_norm_inference(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                          weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                          momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    if training or running_mean is None or running_var is None:
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    shape = [1, -1] + [1] * (input.dim() - 2)
    out = (input - running_mean.view(shape)) * torch.rsqrt(running_var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape)
    return out + bias.view(shape) if bias is not None else out


FUNCTION_SUBSTITUTIONS.extend([FunctionSubstitution(
    name="torch.nn.functional.batch_norm",
    functions=(torch.nn.functional.batch_norm,),
    replacement=_batch_norm_inference,
    reason=("aten::batch_norm asks whether the input is empty, which torch.export cannot decide when the row count "
            "is data-dependent (the voxels of in-graph voxelization, --scope detections); in eval mode it is the "
            "same affine map written out"),
    when=_rows_data_dependent,
), FunctionSubstitution(
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
