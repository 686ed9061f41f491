"""mmcv's RoIAlign (avg pool mode) as the custom op ``autoexport::roi_align`` with an ONNX ``RoiAlign`` translation.

Semantics are mmcv's CPU kernel (csrc/pytorch/cpu/roi_align.cpp, Caffe2/detectron2's): RoI corners scaled by
``spatial_scale`` and shifted by -0.5 when ``aligned``; unaligned RoIs are at least 1x1; each output bin averages a
``grid_h x grid_w`` grid of bilinear samples, the grid being ``sampling_ratio`` or, if that is <= 0,
``ceil(roi size / pooled size)`` per RoI. That adaptive grid is data-dependent, so the op is opaque to torch.export
(a fake kernel with a static output shape) and the kernel groups RoIs by grid size. The kernel repeats mmcv's float32
operations in mmcv's order, so its output is bit-identical to mmcv's CPU kernel. ONNX Runtime's RoiAlign (opset 16+:
``coordinate_transformation_mode``) runs the same arithmetic for avg mode.
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import INT64
from onnxscript import opset18 as op
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = ["RoIAlign", "roi_align", "roi_align_function", "roi_align_onnx"]

# Largest intermediate (elements) one gather of bilinear corners may build; groups of RoIs are chunked below it.
_MAX_ELEMENTS = 32 * 1024 * 1024

_MAX_MODE_MESSAGE = ("RoIAlign pool_mode='max' is not supported: ONNX Runtime's RoiAlign max mode takes the max of "
                     "the weighted bilinear corners, not of the interpolated values as mmcv does, so an export would "
                     "not match mmcv")


def _divide(numerator: Tensor, divisor: int) -> Tensor:
    """numerator / divisor correctly rounded on every device, as the kernel's float division: PyTorch's CUDA
    division by a Python number multiplies by its reciprocal (an ulp off on half the values), not by a tensor."""
    return numerator / torch.full((), divisor, dtype=numerator.dtype, device=numerator.device)


def _axis_samples(start: Tensor, bin_size: Tensor, pooled: int, grid: int) -> Tensor:
    """(G, pooled, grid) sample coordinates along one axis, in the kernel's float order:
    ``start + p * bin + (i + 0.5) * bin / grid``."""
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)[None, :, None]
    i_half = (torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5)[None, None, :]
    return start[:, None, None] + p * bin_size[:, None, None] + _divide(i_half * bin_size[:, None, None], grid)


def _axis_interpolation(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Low/high indices and weights along one axis as bilinear_interpolate computes them; weights are 0 where the
    sample is off the map (< -1 or > size), which zeroes the sample's four corner weights as the kernel does."""
    valid = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp_min(0)
    low = coord.floor().long()  # coord >= 0: floor is the kernel's (int) truncation
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    coord = torch.where(at_edge, low.to(coord.dtype), coord)
    frac_high = coord - low.to(coord.dtype)
    frac_low = 1.0 - frac_high
    zero = torch.zeros((), dtype=coord.dtype, device=coord.device)
    return low, high, torch.where(valid, frac_low, zero), torch.where(valid, frac_high, zero)


def _pool_group(features_nhwc: Tensor, batch_index: Tensor, start_y: Tensor, start_x: Tensor, bin_h: Tensor,
                bin_w: Tensor, output_height: int, output_width: int, grid_h: int, grid_w: int) -> Tensor:
    """(G, C, output_height, output_width) averages for G RoIs sharing one (grid_h, grid_w) sampling grid."""
    _, height, width, _ = features_nhwc.shape
    count = len(batch_index)
    y_low, y_high, hy, ly = _axis_interpolation(_axis_samples(start_y, bin_h, output_height, grid_h), height)
    x_low, x_high, hx, lx = _axis_interpolation(_axis_samples(start_x, bin_w, output_width, grid_w), width)
    # The weights are separable: the (ph, iy) and (pw, ix) axes broadcast against each other.
    b = batch_index.view(count, 1, 1, 1, 1)
    y_low, y_high = y_low.view(count, output_height, grid_h, 1, 1), y_high.view(count, output_height, grid_h, 1, 1)
    x_low, x_high = x_low.view(count, 1, 1, output_width, grid_w), x_high.view(count, 1, 1, output_width, grid_w)
    hy, ly = hy.view(count, output_height, grid_h, 1, 1, 1), ly.view(count, output_height, grid_h, 1, 1, 1)
    hx, lx = hx.view(count, 1, 1, output_width, grid_w, 1), lx.view(count, 1, 1, output_width, grid_w, 1)
    # w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4 in the kernel's order, one (G, OH, gh, OW, gw, C) gather at a time.
    value = (hy * hx) * features_nhwc[b, y_low, x_low]
    value = value + (hy * lx) * features_nhwc[b, y_low, x_high]
    value = value + (ly * hx) * features_nhwc[b, y_high, x_low]
    value = value + (ly * lx) * features_nhwc[b, y_high, x_high]
    # The grid's samples are summed one at a time in the kernel's (iy, ix) order, not by a reduction (whose other
    # order is a few ulps off): bit-identical to mmcv, and faster than a sum over the two strided grid axes.
    total = value[:, :, 0, :, 0]
    for sample in range(1, grid_h * grid_w):
        total = total + value[:, :, sample // grid_w, :, sample % grid_w]
    return _divide(total, grid_h * grid_w).permute(0, 3, 1, 2)  # (G, OH, OW, C) -> (G, C, OH, OW)


@torch.library.custom_op("autoexport::roi_align", mutates_args=())
def roi_align(features: Tensor, rois: Tensor, output_height: int, output_width: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> Tensor:
    """mmcv's roi_align (avg): features (N, C, H, W), rois (R, 5) = (batch, x1, y1, x2, y2) -> (R, C, OH, OW)."""
    num_rois = rois.shape[0]
    channels = features.shape[1]
    output = features.new_zeros((num_rois, channels, output_height, output_width))
    if num_rois == 0 or channels == 0:
        return output
    dtype = features.dtype
    boxes = rois.to(dtype)
    batch_index = boxes[:, 0].long()  # the kernel's (int) truncation
    scale = torch.tensor(spatial_scale, dtype=dtype, device=features.device)  # a C float in the kernel
    offset = 0.5 if aligned else 0.0
    start_x, start_y, end_x, end_y = (boxes[:, k] * scale - offset for k in range(1, 5))
    roi_w, roi_h = end_x - start_x, end_y - start_y
    if not aligned:  # mmcv's backward-compatible mode: RoIs are at least 1x1
        roi_w, roi_h = roi_w.clamp_min(1.0), roi_h.clamp_min(1.0)
    bin_w, bin_h = _divide(roi_w, output_width), _divide(roi_h, output_height)
    if sampling_ratio > 0:
        grids = torch.full((num_rois, 2), sampling_ratio, dtype=torch.int64, device=features.device)
    else:
        # ceilf(roi_size / pooled): the same float quotient as the bin size. Negative sizes (mmcv asserts on
        # them) give an empty grid, as in ONNX Runtime.
        grids = torch.stack([bin_h.ceil(), bin_w.ceil()], dim=1).clamp_min(0).long()

    features_nhwc = features.permute(0, 2, 3, 1).contiguous()  # one contiguous C row per corner gather
    pairs, group_of_roi = torch.unique(grids, dim=0, return_inverse=True)
    for group, (grid_h, grid_w) in enumerate(pairs.tolist()):
        if grid_h == 0 or grid_w == 0:
            continue  # an empty grid (zero-size aligned RoI): the kernel's sum 0 over count 1
        members = torch.nonzero(group_of_roi == group).flatten()
        per_roi = output_height * grid_h * output_width * grid_w * channels
        chunk = max(1, _MAX_ELEMENTS // per_roi)
        for first in range(0, len(members), chunk):
            rows = members[first:first + chunk]
            output[rows] = _pool_group(features_nhwc, batch_index[rows], start_y[rows], start_x[rows], bin_h[rows],
                                       bin_w[rows], output_height, output_width, grid_h, grid_w)
    return output


@roi_align.register_fake
def _roi_align_fake(features: Tensor, rois: Tensor, output_height: int, output_width: int, spatial_scale: float,
                    sampling_ratio: int, aligned: bool) -> Tensor:
    return features.new_empty((rois.shape[0], features.shape[1], output_height, output_width))


def roi_align_onnx(features: Any, rois: Any, output_height: int, output_width: int, spatial_scale: float,
                   sampling_ratio: int, aligned: bool) -> Any:
    """ONNX translation of ``autoexport::roi_align``: one standard RoiAlign (opset 16+ attributes)."""
    boxes = op.Slice(rois, op.Constant(value_ints=[1]), op.Constant(value_ints=[5]), op.Constant(value_ints=[1]))
    first_column = op.Slice(rois, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]),
                            op.Constant(value_ints=[1]))
    # Cast truncates toward zero, as the kernel's (int) batch index.
    batch_indices = op.Cast(op.Squeeze(first_column, op.Constant(value_ints=[1])), to=INT64.dtype)
    # half_pixel shifts by -0.5 and keeps sizes; output_half_pixel does neither but forces RoIs to at least 1x1.
    return op.RoiAlign(features, boxes, batch_indices, mode="avg", output_height=output_height,
                       output_width=output_width, sampling_ratio=max(0, sampling_ratio), spatial_scale=spatial_scale,
                       coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")


def roi_align_function(input: Tensor, rois: Tensor, output_size: Any, spatial_scale: float = 1.0,
                       sampling_ratio: int = 0, pool_mode: str = "avg", aligned: bool = True) -> Tensor:
    """mmcv.ops.roi_align's signature, through ``autoexport::roi_align``; pool_mode 'max' is refused."""
    if pool_mode == "max":
        raise NotImplementedError(_MAX_MODE_MESSAGE)
    if pool_mode != "avg":
        raise ValueError(f"RoIAlign pool_mode must be 'avg' or 'max', got {pool_mode!r}")
    output_height, output_width = _pair(output_size)
    return torch.ops.autoexport.roi_align(input, rois, int(output_height), int(output_width), float(spatial_scale),
                                          int(sampling_ratio), bool(aligned))


class RoIAlign(nn.Module):
    """Drop-in for mmcv.ops.RoIAlign. ``forward`` reads only mmcv's attributes, so it also runs bound to an mmcv
    module. ``use_torchvision`` is accepted and ignored: torchvision's roi_align has the same arithmetic."""

    def __init__(self, output_size: Any, spatial_scale: float = 1.0, sampling_ratio: int = 0, pool_mode: str = "avg",
                 aligned: bool = True, use_torchvision: bool = False) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.pool_mode = pool_mode
        self.aligned = aligned
        self.use_torchvision = use_torchvision

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align_function(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                                  self.pool_mode, self.aligned)
