"""ONNX translations autoexport supplies to torch.onnx (its custom_translation_table), keyed by ATen/library op.

torch.onnx's own translations are used for everything else; an entry here replaces one where the default graph is
correct but not in the form runtimes pattern-match (e.g. Q/DQ pairs for integer kernels).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
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


def translation_table() -> dict[Callable, Callable]:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed

    return {torch.ops.quantized_decomposed.quantize_per_channel.default: _int8_quantize_per_channel}
