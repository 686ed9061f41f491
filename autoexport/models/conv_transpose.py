"""torch's ConvTranspose2d in IREE exports: written as the convolutions it is."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..patches import ExportPatch, PatchContext, register_patch


_TORCH_DECONV_FORWARD = torch.nn.ConvTranspose2d.forward


def _deconv_as_depth_to_space(self: Any, x: torch.Tensor) -> torch.Tensor:
    """kernel == stride: every input pixel fills its own k x k output block, which is a 1x1 conv to Cout*kh*kw
    channels followed by depth-to-space. No zero-inserted input, no wasted MACs."""
    batch, _, height, width = x.shape
    c_in, c_out, kh, kw = self.weight.shape
    weight = self.weight.permute(1, 2, 3, 0).reshape(c_out * kh * kw, c_in, 1, 1)
    y = torch.nn.functional.conv2d(x, weight)
    y = y.view(batch, c_out, kh, kw, height, width).permute(0, 1, 4, 2, 5, 3)
    y = y.reshape(batch, c_out, height * kh, width * kw)
    return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def _grouped_deconv_as_conv(self: Any, x: torch.Tensor) -> torch.Tensor:
    """A grouped transposed conv written as the plain grouped conv it is: stride-1 conv with the spatially
    flipped, per-group transposed kernel over the input with (stride - 1) zeros inserted between pixels."""
    batch, channels, height, width = x.shape
    (sh, sw), (kh, kw) = tuple(self.stride), tuple(self.kernel_size)
    (dh, dw), (ph, pw), (oh, ow) = tuple(self.dilation), tuple(self.padding), tuple(self.output_padding)
    groups = self.groups
    # Zero insertion by padding a trailing unit axis: (h, 1, w, 1) -> (h, s, w, s) -> (h*s, w*s); the last
    # (s - 1) rows and columns are zeros past the last pixel, accounted for in the bottom/right padding below.
    spread = torch.nn.functional.pad(x.reshape(batch, channels, height, 1, width, 1), (0, sw - 1, 0, 0, 0, sh - 1))
    spread = spread.reshape(batch, channels, height * sh, width * sw)
    top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    bottom, right = top + oh - (sh - 1), left + ow - (sw - 1)
    # Negative amounts crop (F.pad semantics); ConvTranspose2d's padding can exceed the kernel's reach.
    spread = torch.nn.functional.pad(spread, (left, right, top, bottom))
    c_in, c_out_per_group = self.weight.shape[:2]
    weight = self.weight.reshape(groups, c_in // groups, c_out_per_group, kh, kw).transpose(1, 2)
    weight = weight.reshape(groups * c_out_per_group, c_in // groups, kh, kw).flip(2, 3)
    return torch.nn.functional.conv2d(spread, weight, self.bias, dilation=(dh, dw), groups=groups)


def _make_deconv_as_conv(context: PatchContext) -> Callable[..., torch.Tensor]:
    def forward(self: Any, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        if output_size is not None or self.padding_mode != "zeros":
            return _TORCH_DECONV_FORWARD(self, x, output_size)
        if self.groups > 1:
            return _grouped_deconv_as_conv(self, x)
        if (tuple(self.kernel_size) == tuple(self.stride) and tuple(self.padding) == (0, 0)
                and tuple(self.output_padding) == (0, 0) and tuple(self.dilation) == (1, 1)):
            return _deconv_as_depth_to_space(self, x)
        return _TORCH_DECONV_FORWARD(self, x, output_size)

    return forward


register_patch(ExportPatch(
    target="ConvTranspose2d",
    method="forward",
    reason=("IREE lowers a transposed conv as a conv over a zero-inserted input (16x the work for SECONDFPN's "
            "k4/s4 deblock); with kernel == stride it is exactly a 1x1 conv plus depth-to-space. A grouped one "
            "(SMOKE's DLA neck upsamples with depthwise 4x4/2 deconvs) does not compile at all in IREE 3.13 "
            "('tensor.collapse_shape' verifier error), so it is written as the grouped conv over the "
            "zero-inserted input that it is"),
    make=_make_deconv_as_conv,
    variants=("iree",),
))
