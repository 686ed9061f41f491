"""``F.grid_sample`` (2D, zeros padding) as explicit index arithmetic and gathers, for backends whose own lowering of
ONNX GridSample is wrong.

IREE 3.13 reads out of bounds for sampling points outside the image with padding_mode "zeros": wrong values on a
small map and a segfault at run time on ImVoxelNet's 642816 voxel centres (tests/test_backends.py). This follows
PyTorch's CPU kernel (aten/src/ATen/native/GridSampler.cpp): the same source-index formula, nearest by round-half-
to-even (``std::nearbyint``), bilinear with the same corner weights, and 0 for every corner outside the map. Not an
mmcv op, so not in OP_LIBRARY; ``patches.FUNCTION_SUBSTITUTIONS`` swaps it in for the IREE export only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["grid_sample_by_gather"]

_ORIGINAL_GRID_SAMPLE = F.grid_sample


def _source_index(coord: Tensor, size: int, align_corners: bool) -> Tensor:
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _gather(flat: Tensor, x: Tensor, y: Tensor, width: int, height: int) -> Tensor:
    """flat (N, C, H*W); x, y (N, P) integer-valued float -> (N, C, P), 0 where (x, y) is outside the map."""
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    # Off-map points read element 0 and are zeroed below. (torch.where, not clamp: torch 2.13's ONNX export
    # emitted clamp's Clip bounds after the Clip here, an unsorted graph that IREE's importer rejects.)
    index = torch.where(inside, y * width + x, torch.zeros_like(x)).to(torch.int64)
    values = torch.gather(flat, 2, index[:, None, :].expand(-1, flat.shape[1], -1))
    return torch.where(inside[:, None, :], values, torch.zeros_like(values))


def grid_sample_by_gather(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                          align_corners: bool | None = None, **kwargs: Any) -> Tensor:
    """What ``F.grid_sample`` returns for 4-D input with nearest or bilinear mode and zeros padding; other cases go
    to ``F.grid_sample`` itself."""
    if input.dim() != 4 or padding_mode != "zeros" or mode not in ("nearest", "bilinear") or kwargs:
        return _ORIGINAL_GRID_SAMPLE(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners,
                                     **kwargs)
    align = bool(align_corners)  # None means False, as in F.grid_sample
    batch, channels, height, width = input.shape
    out_h, out_w = grid.shape[1], grid.shape[2]
    flat = input.reshape(batch, channels, height * width)
    points = grid.reshape(batch, out_h * out_w, 2)
    x = _source_index(points[..., 0], width, align)
    y = _source_index(points[..., 1], height, align)
    if mode == "nearest":
        sampled = _gather(flat, torch.round(x), torch.round(y), width, height)  # round half to even, as nearbyint
    else:
        x0, y0 = torch.floor(x), torch.floor(y)
        x1, y1 = x0 + 1, y0 + 1
        sampled = (_gather(flat, x0, y0, width, height) * ((x1 - x) * (y1 - y))[:, None]
                   + _gather(flat, x1, y0, width, height) * ((x - x0) * (y1 - y))[:, None]
                   + _gather(flat, x0, y1, width, height) * ((x1 - x) * (y - y0))[:, None]
                   + _gather(flat, x1, y1, width, height) * ((x - x0) * (y - y0))[:, None])
    return sampled.reshape(batch, channels, out_h, out_w)
