"""ONNX translations autoexport supplies to torch.onnx (its custom_translation_table), keyed by ATen/library op.

torch.onnx's own translations are used for everything else; an entry here replaces one where the default graph is
correct but not in the form runtimes pattern-match (e.g. Q/DQ pairs for integer kernels).
"""

from __future__ import annotations

from typing import Any, Callable

from onnxscript import ir
from onnxscript.onnx_opset import opset18 as op


def _int8_quantize_per_channel(input: Any, scales: Any, zero_points: Any, axis: int, quant_min: int, quant_max: int,
                               dtype: int) -> Any:
    # onnxscript's default adds Clip(quant_min, quant_max) after QuantizeLinear. For the full int8 range the Clip
    # is a no-op, but it sits between Q and DQ where TensorRT and ONNX Runtime look for a plain Q -> DQ pair.
    if (quant_min, quant_max) != (-128, 127):
        quantized = op.QuantizeLinear(input, op.CastLike(scales, input), op.Cast(zero_points, to=ir.DataType.INT8),
                                      axis=axis)
        return op.Clip(quantized, op.Cast(quant_min, to=ir.DataType.INT8), op.Cast(quant_max, to=ir.DataType.INT8))
    return op.QuantizeLinear(input, op.CastLike(scales, input), op.Cast(zero_points, to=ir.DataType.INT8), axis=axis)


# Largest matrix the cofactor inverse below unrolls: camera/lidar transforms are 3x3 or 4x4.
MAX_INVERSE_SIZE = 4


def _small_determinant(e: list[list[Any]]) -> Any:
    """Determinant by Laplace expansion over element tensors (each of the batch shape)."""
    n = len(e)
    if n == 1:
        return e[0][0]
    if n == 2:
        return op.Sub(op.Mul(e[0][0], e[1][1]), op.Mul(e[0][1], e[1][0]))
    total = None
    for j in range(n):
        minor = [row[:j] + row[j + 1:] for row in e[1:]]
        term = op.Mul(e[0][j], _small_determinant(minor))
        total = term if total is None else (op.Sub(total, term) if j % 2 else op.Add(total, term))
    return total


def _small_inverse(A: Any, check_errors: bool = False) -> tuple[Any, Any]:
    # ONNX has no matrix inverse; mmdet3d inverts 3x3/4x4 transforms (e.g. reversing point-cloud augmentation in
    # point_sample). Adjugate over determinant, unrolled for the static size: exact algebra, well conditioned for
    # rigid and projective transforms. info is 1 where the matrix is singular, as linalg_inv_ex's is nonzero.
    n = A.shape[-1] if A.shape is not None else None
    if not isinstance(n, int) or n != A.shape[-2] or n > MAX_INVERSE_SIZE:
        raise NotImplementedError(f"aten::linalg_inv_ex: autoexport's ONNX translation handles static square matrices "
                                  f"up to {MAX_INVERSE_SIZE}x{MAX_INVERSE_SIZE}, got shape {A.shape}")
    e = [[op.Gather(op.Gather(A, op.Constant(value_int=i), axis=-2), op.Constant(value_int=j), axis=-1)
          for j in range(n)] for i in range(n)]
    one = op.CastLike(op.Constant(value_float=1.0), A)
    cofactors = []
    for i in range(n):
        row = []
        for j in range(n):
            minor = [r[:j] + r[j + 1:] for k, r in enumerate(e) if k != i]
            value = _small_determinant(minor) if minor else one
            row.append(op.Neg(value) if (i + j) % 2 else value)
        cofactors.append(row)
    det = None
    for j in range(n):  # expansion along the first row, from the cofactors already built
        term = op.Mul(e[0][j], cofactors[0][j])
        det = term if det is None else op.Add(det, term)
    # inverse[i][j] = cofactor[j][i] / det
    rows = [op.Unsqueeze(op.Concat(*[op.Unsqueeze(op.Div(cofactors[j][i], det), op.Constant(value_ints=[-1]))
                                     for j in range(n)], axis=-1), op.Constant(value_ints=[-2])) for i in range(n)]
    info = op.Cast(op.Equal(det, op.CastLike(op.Constant(value_float=0.0), det)), to=ir.DataType.INT32)
    return op.Concat(*rows, axis=-2), info


def _squeeze_dim(self: Any, dim: int) -> Any:
    # torch's squeeze(dim) leaves a dim whose size is not 1 alone; ONNX Squeeze rejects it. onnxscript's default
    # emits Squeeze unconditionally, which breaks models that squeeze a known non-1 dim (mmdet3d's PointFusion).
    shape = self.shape
    if shape is not None and (len(shape) == 0 or (isinstance(shape[dim], int) and shape[dim] != 1)):
        return op.Identity(self)
    return op.Squeeze(self, op.Constant(value_ints=[dim]))


def _blocked_mean(x: Any, axes: range) -> Any:
    """ReduceMean over `axes`, one axis at a time from the last: each sum then runs over one axis's length."""
    for axis in reversed(axes):
        x = op.ReduceMean(x, op.Constant(value_ints=[axis]), keepdims=1)
    return x


def _native_group_norm(input: Any, weight: Any = None, bias: Any = None, N: Any = None, C: Any = None,
                       HxW: Any = None, group: int = 1, eps: float = 1e-5) -> tuple[Any, Any, Any]:
    # onnxscript's default is one InstanceNormalization per group, whose fp32 statistics ONNX Runtime and IREE
    # accumulate in one long sum: on a GroupNorm(32, 256) over a 96 x 320 map (SMOKE's and PGD's heads) 3.3e-4
    # (ONNX Runtime) and 2.6e-3 (IREE) from float64, where PyTorch's kernel is 1.6e-6. The same statistics taken
    # one axis at a time (mean, then the mean of squared deviations, as PyTorch) stay at 1.9e-6 and 6.9e-6, with
    # no float64 in the graph. Only the ONNX changes: model.pt2 keeps PyTorch's kernel and stays exact.
    rank = len(input.shape)
    batch = op.Shape(input, start=0, end=1)
    grouped = op.Reshape(input, op.Concat(batch, op.Constant(value_ints=[group, -1]), op.Shape(input, start=2),
                                          axis=0))  # (N, group, C / group, *spatial)
    statistic_axes = range(2, rank + 1)
    mean = _blocked_mean(grouped, statistic_axes)
    centered = op.Sub(grouped, mean)
    variance = _blocked_mean(op.Mul(centered, centered), statistic_axes)
    rstd = op.Reciprocal(op.Sqrt(op.Add(variance, op.CastLike(op.Constant(value_float=eps), input))))
    result = op.Reshape(op.Mul(centered, rstd), op.Shape(input))
    per_channel = op.Constant(value_ints=[-1] + [1] * (rank - 2))
    if weight is not None:
        result = op.Mul(result, op.Reshape(op.CastLike(weight, result), per_channel))
    if bias is not None:
        result = op.Add(result, op.Reshape(op.CastLike(bias, result), per_channel))
    batch_by_group = op.Concat(batch, op.Constant(value_ints=[group]), axis=0)
    return result, op.Reshape(mean, batch_by_group), op.Reshape(rstd, batch_by_group)


def _group_norm(input: Any, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5,
                cudnn_enabled: bool = True) -> Any:
    # torch.export keeps aten.group_norm (onnxscript translates it, so it is not decomposed) as its graph op.
    return _native_group_norm(input, weight, bias, group=num_groups, eps=eps)[0]


def _stable_sort(self: Any, stable: bool | None = None, dim: int = -1, descending: bool = False) -> tuple[Any, Any]:
    # torch.onnx has no translation of aten.sort.stable. ONNX TopK over the whole axis is a stable sort: the spec
    # breaks ties by index, lower first, in both directions.
    rank = len(self.shape) if self.shape is not None else None
    axis = dim + rank if dim < 0 and rank is not None else dim
    size = op.Shape(self, start=axis, end=axis + 1) if axis >= 0 else op.Shape(self, start=dim)
    values, indices = op.TopK(self, size, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def translation_table() -> dict[Callable, Callable]:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed

    from .ops import onnx_translation_table

    return {torch.ops.quantized_decomposed.quantize_per_channel.default: _int8_quantize_per_channel,
            torch.ops.aten.linalg_inv_ex.default: _small_inverse,
            torch.ops.aten.squeeze.dim: _squeeze_dim,
            torch.ops.aten.sort.stable: _stable_sort,
            torch.ops.aten.group_norm.default: _group_norm,
            torch.ops.aten.native_group_norm.default: _native_group_norm,
            **onnx_translation_table()}  # the op library's custom ops (furthest point sampling, ...)
