"""pytorch-quantization's TensorQuantizer: frozen scales, exported as quantize/dequantize ops."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..patches import ExportPatch, PatchContext, register_patch


def make_quantize_dequantize(context: PatchContext) -> Callable[..., torch.Tensor]:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed

    ops = torch.ops.quantized_decomposed

    def forward(self: Any, inputs: torch.Tensor) -> torch.Tensor:
        if self._disabled:
            return inputs
        scale = getattr(self, "_export_scale", None)
        if scale is None:
            raise RuntimeError("TensorQuantizer without a frozen scale: run quantize.freeze_for_export() first")
        # Symmetric int8 with the full [-128, 127] range, as pytorch-quantization's own fake quantization.
        if self._export_axis is None:
            q = ops.quantize_per_tensor(inputs, scale, 0, -128, 127, torch.int8)
            return ops.dequantize_per_tensor(q, scale, 0, -128, 127, torch.int8)
        scales = torch.tensor(scale, dtype=torch.float32, device=inputs.device)
        zero_points = torch.zeros(len(scale), dtype=torch.int64, device=inputs.device)
        q = ops.quantize_per_channel(inputs, scales, zero_points, self._export_axis, -128, 127, torch.int8)
        return ops.dequantize_per_channel(q, scales, zero_points, self._export_axis, -128, 127, torch.int8)

    return forward


register_patch(ExportPatch(
    target="TensorQuantizer",
    method="forward",
    reason=("pytorch-quantization's fake quantization reads amax with .item() (data-dependent for torch.export); "
            "the calibrated scales are frozen to constants and the quantizer becomes quantize/dequantize ops "
            "(QuantizeLinear/DequantizeLinear in ONNX, per channel for weights)"),
    make=make_quantize_dequantize,
))
