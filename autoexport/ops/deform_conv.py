"""Deformable convolution v1/v2 (mmcv.ops.deform_conv2d / modulated_deform_conv2d and their modules) in PyTorch.

Sampling reproduces mmcv's im2col bilinear kernel (csrc/pytorch/cpu/deform_conv.cpp, modulated_deform_conv.cpp):
location ``(h_out * stride - pad + i * dilation + offset_h, ...)``, zero outside ``(-1, H) x (-1, W)``, each of the
four corners read only when inside the image, value ``w1*v1 + w2*v2 + w3*v3 + w4*v4`` in that order. Gathers over a
flattened image instead of ``grid_sample`` keep the arithmetic identical (no coordinate normalisation) and export
to ONNX ``GatherElements``. The im2col columns then meet the weight in one batched matmul per group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = ["deform_conv2d", "modulated_deform_conv2d", "DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2d",
           "ModulatedDeformConv2dPack"]

IntPair = int | tuple[int, int]


def _sample_columns(input: Tensor, offset: Tensor, mask: Tensor | None, kernel_size: tuple[int, int],
                    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                    deform_groups: int) -> Tensor:
    """im2col columns (N, C, K, H_out, W_out) of deformable sampling, optionally modulated by ``mask``."""
    batch, channels, height, width = input.shape
    kernel_h, kernel_w = kernel_size
    kernel_volume = kernel_h * kernel_w
    out_h, out_w = offset.shape[2], offset.shape[3]
    # Offset channels are laid out [group][kernel position][dy, dx].
    offset = offset.reshape(batch, deform_groups, kernel_volume, 2, out_h, out_w)
    device = input.device
    kernel_row = torch.arange(kernel_h, device=device).repeat_interleave(kernel_w) * dilation[0]
    kernel_col = torch.arange(kernel_w, device=device).repeat(kernel_h) * dilation[1]
    base_h = torch.arange(out_h, device=device) * stride[0] - padding[0]
    base_w = torch.arange(out_w, device=device) * stride[1] - padding[1]
    # Integer base first, then one float add of the offset: the kernel's `h_in + i * dilation + offset_h`.
    grid_h = (base_h[None, :, None] + kernel_row[:, None, None]).to(input.dtype)  # (K, H_out, 1)
    grid_w = (base_w[None, None, :] + kernel_col[:, None, None]).to(input.dtype)  # (K, 1, W_out)
    h = grid_h + offset[:, :, :, 0]  # (N, G, K, H_out, W_out)
    w = grid_w + offset[:, :, :, 1]

    inside = (h > -1) & (w > -1) & (h < height) & (w < width)
    h_low = torch.floor(h)
    w_low = torch.floor(w)
    lh = h - h_low
    lw = w - w_low
    hh = 1 - lh
    hw = 1 - lw
    h_low = h_low.to(torch.int64)
    w_low = w_low.to(torch.int64)
    h_high = h_low + 1
    w_high = w_low + 1

    image = input.reshape(batch, deform_groups, channels // deform_groups, height * width)
    num_samples = kernel_volume * out_h * out_w

    def corner(rows: Tensor, cols: Tensor, valid: Tensor) -> Tensor:
        valid = valid & inside
        flat = torch.where(valid, rows * width + cols, torch.zeros_like(rows)).reshape(batch, deform_groups, 1, -1)
        index = flat.expand(batch, deform_groups, channels // deform_groups, num_samples)
        values = torch.gather(image, 3, index).reshape(batch, deform_groups, channels // deform_groups,
                                                       kernel_volume, out_h, out_w)
        return torch.where(valid[:, :, None], values, torch.zeros_like(values))

    v1 = corner(h_low, w_low, (h_low >= 0) & (w_low >= 0))
    v2 = corner(h_low, w_high, (h_low >= 0) & (w_high <= width - 1))
    v3 = corner(h_high, w_low, (h_high <= height - 1) & (w_low >= 0))
    v4 = corner(h_high, w_high, (h_high <= height - 1) & (w_high <= width - 1))
    w1 = (hh * hw)[:, :, None]
    w2 = (hh * lw)[:, :, None]
    w3 = (lh * hw)[:, :, None]
    w4 = (lh * lw)[:, :, None]
    columns = w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4  # (N, G, C/G, K, H_out, W_out)
    if mask is not None:
        columns = columns * mask.reshape(batch, deform_groups, 1, kernel_volume, out_h, out_w)
    return columns.reshape(batch, channels, kernel_volume, out_h, out_w)


def _deform_conv(input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, bias: Tensor | None,
                 stride: IntPair, padding: IntPair, dilation: IntPair, groups: int, deform_groups: int) -> Tensor:
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    columns = _sample_columns(input, offset, mask, (kernel_h, kernel_w), _pair(stride), _pair(padding),
                              _pair(dilation), deform_groups)
    batch, _, kernel_volume, out_h, out_w = columns.shape
    columns = columns.reshape(batch, groups, in_per_group * kernel_volume, out_h * out_w)
    kernels = weight.reshape(groups, out_channels // groups, in_per_group * kernel_volume)
    output = (kernels @ columns).reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        output = output + bias[:, None, None]
    return output


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, stride: IntPair = 1, padding: IntPair = 0,
                  dilation: IntPair = 1, groups: int = 1, deform_groups: int = 1, bias: bool = False,
                  im2col_step: int = 32) -> Tensor:
    """Drop-in for ``mmcv.ops.deform_conv2d`` (DCN v1); ``im2col_step`` only batches work in mmcv, so it is unused."""
    del im2col_step
    if bias:
        raise ValueError("mmcv's deform_conv2d supports bias=False only")
    return _deform_conv(input, offset, None, weight, None, stride, padding, dilation, groups, deform_groups)


def modulated_deform_conv2d(input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None = None,
                            stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                            deform_groups: int = 1) -> Tensor:
    """Drop-in for ``mmcv.ops.modulated_deform_conv2d`` (DCN v2)."""
    return _deform_conv(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups)


class DeformConv2d(nn.Module):
    """mmcv.ops.DeformConv2d: same parameters (weight (C_out, C_in/groups, kh, kw), no bias) and forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, deform_groups: int = 1,
                 bias: bool = False, im2col_step: int = 32) -> None:
        super().__init__()
        if bias:
            raise ValueError("mmcv's DeformConv2d supports bias=False only")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.im2col_step = im2col_step
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        return deform_conv2d(x, offset, self.weight, self.stride, self.padding, self.dilation, self.groups,
                             self.deform_groups)


def _zero_offset_conv(layer: nn.Module, values_per_tap: int) -> nn.Conv2d:
    """The Pack classes' ``conv_offset``: same geometry as the layer, zero-initialized as in mmcv (no offsets)."""
    conv = nn.Conv2d(layer.in_channels, layer.deform_groups * values_per_tap * math.prod(layer.kernel_size),
                     kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, bias=True)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class DeformConv2dPack(DeformConv2d):
    """mmcv.ops.DeformConv2dPack (registered as 'DCN'): offsets from an internal ``conv_offset``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = _zero_offset_conv(self, values_per_tap=2)  # (dy, dx)

    def forward(self, x: Tensor) -> Tensor:
        # Not super(): the export patch runs this on mmcv's DeformConv2dPack, which is no subclass of this class.
        return DeformConv2d.forward(self, x, self.conv_offset(x))


class ModulatedDeformConv2d(nn.Module):
    """mmcv.ops.ModulatedDeformConv2d: same parameters (weight, optional bias) and forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, deform_groups: int = 1,
                 bias: bool | str = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        bound = 1.0 / math.sqrt(in_channels * math.prod(self.kernel_size))
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, self.groups, self.deform_groups)


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """mmcv.ops.ModulatedDeformConv2dPack (registered as 'DCNv2', used by mmdet3d's DCN backbones)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = _zero_offset_conv(self, values_per_tap=3)  # (dy, dx, mask)

    def forward(self, x: Tensor) -> Tensor:
        offset_y_x_and_mask = self.conv_offset(x)
        offset_first, offset_second, mask = torch.chunk(offset_y_x_and_mask, 3, dim=1)
        offset = torch.cat((offset_first, offset_second), dim=1)
        return modulated_deform_conv2d(x, offset, torch.sigmoid(mask), self.weight, self.bias, self.stride,
                                       self.padding, self.dilation, self.groups, self.deform_groups)
