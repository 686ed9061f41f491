"""autoexport::roi_align against mmcv's CPU RoIAlign kernel, and through torch.export / ONNX / ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from autoexport.ops import roi_align as ra

mmcv_ops = pytest.importorskip("mmcv.ops")

FEATURE_SHAPE = (2, 8, 25, 34)
SPATIAL_SCALE = 0.25  # the map is a stride-4 level of a 100 x 136 image
IMAGE_SIZE = torch.tensor([136.0, 100.0])  # (x, y)
# The kernel repeats mmcv's float32 operations in mmcv's order (the grid samples summed one by one), so it is
# bit-identical to mmcv's CPU kernel here; summing the grid with a torch reduction instead differed by up to 2.4e-7
# (the summation order). ONNX Runtime's RoiAlign measured bit-identical too, but its build (vectorisation, FMA) is not
# ours to pin down, so it gets a float32 tolerance.
EXACT = {"rtol": 0.0, "atol": 0.0}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def features(seed: int = 0) -> Tensor:
    return torch.randn(FEATURE_SHAPE, generator=torch.Generator().manual_seed(seed))


def mixed_rois(count: int, seed: int) -> Tensor:
    """(count, 5) image-space RoIs of mixed kinds: tiny, large, partly and wholly off the map, zero-size (both axes
    and one axis), over both samples."""
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=generator) * IMAGE_SIZE
    size = torch.rand(count, 2, generator=generator) * 120  # large: up to 30 map pixels, grids up to 5
    kind = torch.arange(count) % 8  # kinds 6 and 7: plain
    size[kind == 0] = torch.rand(int((kind == 0).sum()), 2, generator=generator) * 4  # under one map pixel
    corner[kind == 1] -= 70  # partly off the top-left
    corner[kind == 2] += 25  # partly off the bottom-right
    size[kind == 3] = 0.0  # zero-size: an empty grid when aligned, 1x1 when not
    size[kind == 4, 0] = 0.0  # zero width only
    corner[kind == 5] += IMAGE_SIZE * torch.tensor([2.0, -2.0])  # wholly off the map
    batch = (torch.rand(count, 1, generator=generator) < 0.5).float()
    return torch.cat([batch, corner, corner + size], dim=1)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_kernel_matches_mmcv(aligned: bool, sampling_ratio: int) -> None:
    x, rois = features(), mixed_rois(60, seed=1)
    expected = mmcv_ops.roi_align(x, rois, (7, 5), SPATIAL_SCALE, sampling_ratio, "avg", aligned)
    got = torch.ops.autoexport.roi_align(x, rois, 7, 5, SPATIAL_SCALE, sampling_ratio, aligned)
    torch.testing.assert_close(got, expected, **EXACT)
    # The RoIs do reach the kernel's branches: empty bins (zero-size aligned or off the map) and non-empty ones.
    empty = expected.flatten(1).abs().amax(dim=1) == 0
    assert empty.sum() >= 8 and (~empty).sum() >= 30
    if sampling_ratio == 0:  # adaptive grids of several sizes, hence several groups
        size = (rois[:, 3:] - rois[:, 1:3]) * SPATIAL_SCALE
        assert len(torch.unique(torch.ceil(size.clamp_min(0 if aligned else 1) / torch.tensor([5, 7])), dim=0)) > 5


def test_module_function_and_edge_cases_match_mmcv() -> None:
    x, rois = features(2), mixed_rois(24, seed=3)
    reference = mmcv_ops.RoIAlign((3, 4), spatial_scale=SPATIAL_SCALE, sampling_ratio=0, aligned=True)
    expected = reference(x, rois)
    torch.testing.assert_close(ra.RoIAlign((3, 4), SPATIAL_SCALE, 0)(x, rois), expected, **EXACT)
    # forward reads only mmcv's attributes: it runs bound to mmcv's own module (an export patch's use).
    torch.testing.assert_close(ra.RoIAlign.forward(reference, x, rois), expected, **EXACT)
    torch.testing.assert_close(ra.roi_align_function(x, rois, 3, SPATIAL_SCALE, 1, "avg", False),
                               mmcv_ops.roi_align(x, rois, 3, SPATIAL_SCALE, 1, "avg", False), **EXACT)
    # No RoIs.
    none = ra.roi_align_function(x, rois[:0], (3, 4), SPATIAL_SCALE)
    assert none.shape == (0, 8, 3, 4)
    # A chunked group (more gathered elements than one chunk holds) gives the same result.
    limit = ra._MAX_ELEMENTS
    try:
        ra._MAX_ELEMENTS = 2 * (3 * 2) * (4 * 2) * 8  # two RoIs of a 2x2 grid per chunk
        torch.testing.assert_close(ra.RoIAlign((3, 4), SPATIAL_SCALE, 2)(x, rois),
                                   mmcv_ops.RoIAlign((3, 4), SPATIAL_SCALE, 2)(x, rois), **EXACT)
    finally:
        ra._MAX_ELEMENTS = limit
    with pytest.raises(NotImplementedError, match="max of the weighted bilinear corners"):
        ra.RoIAlign(7, pool_mode="max")(x, rois)


class RoIHead(nn.Module):
    """A learned scale on a stride-4 feature map, then RoIAlign: the start of an image RoI head."""

    def __init__(self, aligned: bool, sampling_ratio: int) -> None:
        super().__init__()
        self.pool = ra.RoIAlign((7, 7), SPATIAL_SCALE, sampling_ratio, aligned=aligned)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor, rois: Tensor) -> Tensor:
        return self.pool(x * self.scale, rois)


@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 0), (False, 2)])
def test_export_and_onnx_runtime_match_mmcv(aligned: bool, sampling_ratio: int, tmp_path) -> None:
    import onnx
    import onnxruntime

    from autoexport.export import export_onnx

    module = RoIHead(aligned, sampling_ratio).eval()
    num_rois = torch.export.Dim("num_rois", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(module, (features(4), mixed_rois(60, seed=5)), strict=False,
                                      dynamic_shapes=({}, {0: num_rois}))
    assert any(node.target is torch.ops.autoexport.roi_align.default for node in program.graph.nodes)
    path = tmp_path / "roi_align.onnx"
    export_onnx(program, ["features", "rois"], ["pooled"], path)

    x, rois = features(6), mixed_rois(37, seed=7)  # another RoI count than exported
    expected = mmcv_ops.roi_align(x * 1.5, rois, (7, 7), SPATIAL_SCALE, sampling_ratio, "avg", aligned)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, rois), expected, **EXACT)  # the same kernel
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (pooled,) = session.run(None, {"features": x.numpy(), "rois": rois.numpy()})
    assert pooled.shape == (37, 8, 7, 7)
    np.testing.assert_allclose(pooled, expected.numpy(), **TOLERANCE)
    (no_rois,) = session.run(None, {"features": x.numpy(), "rois": rois[:0].numpy()})
    assert no_rois.shape == (0, 8, 7, 7)
    assert [node.op_type for node in onnx.load(str(path)).graph.node].count("RoiAlign") == 1
