"""autoexport.ops against mmcv's CPU kernels, against brute-force numpy references written from mmcv's CUDA kernels
(ops mmcv has no CPU kernel for), against a dense conv3d for sparse convolution, and through torch.export / ONNX."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoexport.ops import OP_LIBRARY, SparseConvTensor, onnx_translation_table, sparse_conv_forward
from autoexport.ops.sparse_conv import sparse_maxpool_forward
from autoexport.ops import deform_conv as dc
from autoexport.ops import paconv as pc
from autoexport.ops import point_sample as ps
from autoexport.ops import points_in_boxes as pib
from autoexport.ops import scatter as sc
from autoexport.ops import sparse_conv as spc
from autoexport.ops import voxelize as vx

mmcv_ops = pytest.importorskip("mmcv.ops")

KITTI_RANGE = [0, -39.68, -3, 69.12, 39.68, 1]


def lidar_cloud(num_points: int, seed: int, features: int = 4) -> Tensor:
    """A cloud partly outside KITTI_RANGE, with dense clusters so that voxels overflow max_points."""
    generator = torch.Generator().manual_seed(seed)
    spread = torch.rand(num_points, features, generator=generator) * torch.tensor([80, 90, 6, 1][:features]) \
        + torch.tensor([-5, -45, -4, 0][:features])
    clusters = torch.rand(num_points // 4, features, generator=generator) * 0.3 + spread[: num_points // 4]
    tight = torch.rand(num_points // 8, features, generator=generator) * 0.03 + spread[: num_points // 8]
    cloud = torch.cat([spread, clusters, tight])
    return cloud[torch.randperm(cloud.shape[0], generator=generator)]


def random_boxes(batch: int, count: int, seed: int) -> Tensor:
    """(batch, count, 7) LiDAR boxes (bottom center, sizes, yaw); half of them overlap an earlier box."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.rand(batch, count, 3, generator=generator) * torch.tensor([60.0, 70, 2]) \
        + torch.tensor([0, -35, -3])
    centers[:, count // 2:] = centers[:, : count - count // 2] + 0.5
    sizes = torch.rand(batch, count, 3, generator=generator) * torch.tensor([6.0, 3, 2]) + 0.5
    yaw = (torch.rand(batch, count, 1, generator=generator) - 0.5) * 2 * np.pi
    return torch.cat([centers, sizes, yaw], dim=2)


def points_near_boxes(boxes: Tensor, per_box: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    batch, count, _ = boxes.shape
    jitter = (torch.rand(batch, count, per_box, 3, generator=generator) - 0.5) * boxes[:, :, None, 3:6] * 1.6
    center = boxes[:, :, None, :3] + torch.stack([torch.zeros_like(boxes[..., 5]), torch.zeros_like(boxes[..., 5]),
                                                  boxes[..., 5] / 2], dim=-1)[:, :, None]
    return (center + jitter).reshape(batch, count * per_box, 3)


# --- ops with an mmcv CPU kernel: compared with it ----------------------------------------------------------------

@pytest.mark.parametrize("voxel_size, max_points, max_voxels", [
    ([0.16, 0.16, 4], 32, 16000),   # PointPillars KITTI
    ([0.05, 0.05, 0.1], 5, 40000),  # SECOND KITTI
    ([0.16, 0.16, 4], 3, 500),      # both limits bind: points and voxels are dropped
])
def test_hard_voxelization_matches_mmcv(voxel_size: list[float], max_points: int, max_voxels: int) -> None:
    points = lidar_cloud(20000, seed=1)
    expected = mmcv_ops.Voxelization(voxel_size, KITTI_RANGE, max_points, max_voxels).eval()(points)
    actual = vx.Voxelization(voxel_size, KITTI_RANGE, max_points, max_voxels).eval()(points)
    assert expected[2].max() >= min(max_points, 3)  # the cloud does fill voxels past one point
    for got, want in zip(actual, expected):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dynamic_voxelization_matches_mmcv() -> None:
    points = lidar_cloud(20000, seed=2)
    expected = mmcv_ops.voxelization(points, [0.05, 0.05, 0.1], KITTI_RANGE, -1, -1)
    actual = vx.voxelization(points, [0.05, 0.05, 0.1], KITTI_RANGE, -1, -1)
    assert (expected[:, 0] == -1).any() and (expected[:, 0] >= 0).any()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape, out_channels, kernel, stride, padding, dilation, groups, deform_groups", [
    ((2, 16, 25, 30), 32, 3, 1, 1, 1, 1, 1),
    ((1, 32, 20, 24), 16, 3, 2, 2, 2, 2, 4),
    ((2, 8, 7, 9), 8, (3, 2), 1, 0, 1, 1, 2),
])
def test_deform_conv_matches_mmcv(shape: tuple[int, ...], out_channels: int, kernel, stride: int, padding: int,
                                  dilation: int, groups: int, deform_groups: int) -> None:
    torch.manual_seed(3)
    batch, channels, height, width = shape
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    out_h = (height + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    x = torch.randn(shape)
    # Offsets of a few pixels send samples across and outside the border, where mmcv's zero rules apply.
    offset = torch.randn(batch, deform_groups * 2 * kh * kw, out_h, out_w) * 3
    mask = torch.rand(batch, deform_groups * kh * kw, out_h, out_w)
    args = (channels, out_channels, kernel, stride, padding, dilation, groups, deform_groups)

    reference_v1 = mmcv_ops.DeformConv2d(*args)
    ours_v1 = dc.DeformConv2d(*args)
    ours_v1.load_state_dict(reference_v1.state_dict())
    reference_v2 = mmcv_ops.ModulatedDeformConv2d(*args)
    nn.init.uniform_(reference_v2.bias)
    ours_v2 = dc.ModulatedDeformConv2d(*args)
    ours_v2.load_state_dict(reference_v2.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours_v1(x, offset), reference_v1(x, offset), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_v2(x, offset, mask), reference_v2(x, offset, mask), rtol=1e-5, atol=1e-5)


def test_deform_conv_packs_match_mmcv() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 16, 30, 40)
    for reference_class, ours_class in [(mmcv_ops.DeformConv2dPack, dc.DeformConv2dPack),
                                        (mmcv_ops.ModulatedDeformConv2dPack, dc.ModulatedDeformConv2dPack)]:
        reference = reference_class(16, 16, 3, padding=1, deform_groups=2)
        nn.init.normal_(reference.conv_offset.weight, std=0.1)  # non-zero offsets (the init zeroes them)
        ours = ours_class(16, 16, 3, padding=1, deform_groups=2)
        ours.load_state_dict(reference.state_dict())
        with torch.no_grad():
            expected = reference(x)
            torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
            # The export patch binds the library's forward to mmcv's own module (CenterPoint's DCN head).
            torch.testing.assert_close(ours_class.forward(reference, x), expected, rtol=1e-5, atol=1e-5)


def test_points_in_boxes_match_mmcv_cpu() -> None:
    boxes = random_boxes(2, 40, seed=5)
    background = lidar_cloud(4000, seed=7, features=3)[None].expand(2, -1, -1)
    points = torch.cat([points_near_boxes(boxes, 200, seed=6), background], dim=1).contiguous()
    expected_all = mmcv_ops.points_in_boxes_cpu(points, boxes)
    assert (expected_all.sum(dim=2) > 1).any(), "boxes must overlap to tell 'part' (first box) apart"
    torch.testing.assert_close(pib.points_in_boxes_cpu(points, boxes), expected_all, rtol=0, atol=0)
    torch.testing.assert_close(pib.points_in_boxes_all(points, boxes), expected_all, rtol=0, atol=0)
    # points_in_boxes_part is CUDA-only in mmcv: its kernel stops at the first containing box.
    expected_part = torch.where(expected_all.any(dim=2), expected_all.argmax(dim=2), -1).to(torch.int32)
    torch.testing.assert_close(pib.points_in_boxes_part(points, boxes), expected_part, rtol=0, atol=0)


# --- sparse convolution: mmcv 2.1.0 has no CPU kernel, so a dense conv3d is the reference ------------------------

def test_mmcv_sparse_conv_has_no_cpu_kernel() -> None:
    """Pins down what fails in SECOND on CPU: if mmcv gains CPU kernels, compare against them instead."""
    from mmcv.ops import sparse_ops

    indices = torch.tensor([[0, 1, 1, 1], [0, 1, 2, 1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="get_indice_pairs is not implemented on CPU"):
        sparse_ops.get_indice_pairs(indices, 1, [4, 4, 4], 3, 1, 1, 1, 0, True, False)
    pairs = torch.full((27, 2, 2), -1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="indice_conv_forward_impl: implementation for device cpu not found"):
        sparse_ops.indice_conv(torch.randn(2, 4), torch.randn(3, 3, 3, 4, 8), pairs,
                               torch.zeros(27, dtype=torch.int32), 2, False, True)


SPARSE_SHAPE = [21, 100, 90]


def sparse_input(num_sites: int, seed: int, channels: int = 4, batch: int = 2) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    volume = int(np.prod(SPARSE_SHAPE))
    linear = torch.randperm(batch * volume, generator=generator)[:num_sites]
    depth, height, width = SPARSE_SHAPE
    indices = torch.stack([linear // volume, (linear // (height * width)) % depth, (linear // width) % height,
                           linear % width], dim=1).to(torch.int32)
    return torch.randn(num_sites, channels, generator=generator), indices


class SparseChain(nn.Module):
    """SECOND-like encoder slice plus what it lacks: anisotropic stride and an inverse conv."""

    def __init__(self) -> None:
        super().__init__()
        self.subm_a = spc.SubMConv3d(4, 16, 3, indice_key="subm1")
        self.subm_b = spc.SubMConv3d(16, 16, 3, indice_key="subm1")
        self.down = spc.SparseConv3d(16, 32, 3, stride=2, padding=1, indice_key="spconv2")
        self.subm_c = spc.SubMConv3d(32, 32, 3, indice_key="subm2")
        self.up = spc.SparseInverseConv3d(32, 16, 3, indice_key="spconv2")
        self.squash = spc.SparseConv3d(16, 8, (3, 1, 1), stride=(2, 1, 1), padding=0)

    def forward(self, features: Tensor, indices: Tensor, grid: Any = None) -> tuple[Tensor, ...]:
        x = SparseConvTensor(features, indices, SPARSE_SHAPE if grid is None else grid, 2)
        a = self.subm_a(x)
        b = self.subm_b(a)
        down = self.down(b)
        c = self.subm_c(down)
        up = self.up(c)
        squash = self.squash(up)
        return (a.features, b.features, down.features, down.indices, c.features, up.features, up.indices,
                squash.features, squash.indices, squash.dense())


def _dense_weight(weight: Tensor) -> Tensor:
    return weight.permute(4, 3, 0, 1, 2)  # mmcv (*kernel, C_in, C_out) -> conv3d (C_out, C_in, *kernel)


def _at_sites(dense: Tensor, indices: Tensor) -> Tensor:
    index = indices.long()
    return dense[index[:, 0], :, index[:, 1], index[:, 2], index[:, 3]]


def _active_sites(dense: Tensor, kernel, stride, padding) -> Tensor:
    occupied = (dense.abs().sum(dim=1, keepdim=True) > 0).to(dense.dtype)
    reach = F.conv3d(occupied, torch.ones(1, 1, *kernel), stride=stride, padding=padding)
    return torch.nonzero(reach[:, 0] > 0).to(torch.int32)  # sorted by (batch, z, y, x)


def _assert_features_close(actual: Tensor, expected: Tensor) -> None:
    # Sums of up to 27*32 products: relative to the output scale, float32 reordering stays below 1e-5.
    scale = expected.abs().max()
    assert scale > 0
    assert (actual - expected).abs().max() <= 1e-5 * scale


def test_sparse_conv_matches_dense_conv() -> None:
    torch.manual_seed(8)
    chain = SparseChain().eval()
    features, indices = sparse_input(3000, seed=9)
    with torch.no_grad():
        a, b, down, down_idx, c, up, up_idx, squash, squash_idx, squash_dense = chain(features, indices)

        dense_in = SparseConvTensor(features, indices, SPARSE_SHAPE, 2).dense()
        expected_a = F.conv3d(dense_in, _dense_weight(chain.subm_a.weight), chain.subm_a.bias, padding=1)
        _assert_features_close(a, _at_sites(expected_a, indices))
        dense_a = SparseConvTensor(a, indices, SPARSE_SHAPE, 2).dense()
        expected_b = F.conv3d(dense_a, _dense_weight(chain.subm_b.weight), chain.subm_b.bias, padding=1)
        _assert_features_close(b, _at_sites(expected_b, indices))

        dense_b = SparseConvTensor(b, indices, SPARSE_SHAPE, 2).dense()
        torch.testing.assert_close(down_idx, _active_sites(dense_b, (3, 3, 3), 2, 1), rtol=0, atol=0)
        expected_down = F.conv3d(dense_b, _dense_weight(chain.down.weight), chain.down.bias, stride=2, padding=1)
        _assert_features_close(down, _at_sites(expected_down, down_idx))

        down_shape = list(expected_down.shape[2:])
        dense_down = SparseConvTensor(down, down_idx, down_shape, 2).dense()
        expected_c = F.conv3d(dense_down, _dense_weight(chain.subm_c.weight), chain.subm_c.bias, padding=1)
        _assert_features_close(c, _at_sites(expected_c, down_idx))

        # The inverse conv is the transpose of `down`, evaluated at down's input sites.
        dense_c = SparseConvTensor(c, down_idx, down_shape, 2).dense()
        output_padding = [size - ((out - 1) * 2 - 2 + 3) for size, out in zip(SPARSE_SHAPE, down_shape)]
        expected_up = F.conv_transpose3d(dense_c, chain.up.weight.permute(3, 4, 0, 1, 2), chain.up.bias, stride=2,
                                         padding=1, output_padding=output_padding)
        torch.testing.assert_close(up_idx, indices, rtol=0, atol=0)
        _assert_features_close(up, _at_sites(expected_up, indices))

        dense_up = SparseConvTensor(up, indices, SPARSE_SHAPE, 2).dense()
        torch.testing.assert_close(squash_idx, _active_sites(dense_up, (3, 1, 1), (2, 1, 1), 0), rtol=0, atol=0)
        expected_squash = F.conv3d(dense_up, _dense_weight(chain.squash.weight), chain.squash.bias, stride=(2, 1, 1))
        _assert_features_close(squash, _at_sites(expected_squash, squash_idx))
        # dense() holds the active sites' features and zeros elsewhere.
        site = squash_idx.long()
        occupied = torch.zeros_like(expected_squash[:, :1], dtype=torch.bool)
        occupied[site[:, 0], 0, site[:, 1], site[:, 2], site[:, 3]] = True
        _assert_features_close(squash_dense, expected_squash * occupied)


class GridFromData(nn.Module):
    """SparseChain on the grid its sites span (MinkUNet's spconv backbone: coors.max(0)[0][1:] + 1), given as 0-d
    tensors, so an exported graph computes it from each input."""

    def __init__(self, chain: SparseChain) -> None:
        super().__init__()
        self.chain = chain

    def forward(self, features: Tensor, indices: Tensor) -> tuple[Tensor, ...]:
        grid = tuple((indices.max(0)[0][1:] + 1).unbind(0))
        return self.chain(features, indices, grid)[:-1]  # not dense(): its size would be data-dependent


def _shallower(num_sites: int, seed: int) -> tuple[Tensor, Tensor]:
    """sparse_input's sites with z < 20: a grid one layer shallower than SPARSE_SHAPE's."""
    features, indices = sparse_input(num_sites, seed)
    inside = indices[:, 1] < 20
    return features[inside], indices[inside]


def test_sparse_conv_on_a_data_dependent_grid_matches_the_same_grid_as_ints_and_exports() -> None:
    torch.manual_seed(8)
    chain = SparseChain().eval()
    model = GridFromData(chain).eval()
    features, indices = sparse_input(3000, seed=9)
    # A second cloud spanning a smaller grid, 20 deep: stride 2 reaches z = 10 from its last layer (z = 19), one
    # past that grid's output (10 deep) but inside the first grid's (21 deep, 11 out).
    small_features, small_indices = _shallower(3000, seed=9)
    assert int(small_indices[:, 1].max()) == 19
    with torch.no_grad():
        for feats, idx in ((features, indices), (small_features, small_indices)):
            ints = [int(v) for v in idx.max(0)[0][1:] + 1]
            expected = chain(feats, idx, ints)[:-1]
            got = model(feats, idx)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        # The smaller grid's strided conv: the sites a dense conv3d over that grid reaches, not the first grid's.
        small_grid = [20, *SPARSE_SHAPE[1:]]
        b_small = chain.subm_b(chain.subm_a(SparseConvTensor(small_features, small_indices, small_grid, 2)))
        dense_b = SparseConvTensor(b_small.features, small_indices, small_grid, 2).dense()
        torch.testing.assert_close(got[3], _active_sites(dense_b, (3, 3, 3), 2, 1), rtol=0, atol=0)
        assert got[3].shape[0] != chain(small_features, small_indices)[3].shape[0]  # the fixed grid keeps more

        sites = torch.export.Dim("sites")
        program = torch.export.export(model, (features, indices), dynamic_shapes=({0: sites}, {0: sites}))
        for a, b in zip(program.module()(small_features, small_indices), got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rulebook_cached_by_a_conv_of_another_kernel_is_reused_as_mmcv_does() -> None:
    """Cylinder3D shares indice_keys between 1x3x3, 3x1x3 and 3x3x3 submanifold convs. mmcv reuses the first
    conv's rulebook for the later ones and its kernel reads filters 0..8 over those 9 offsets; so the 3x1x3 conv
    acts as a 1x3x3 conv with its own first 9 filters, and the 3x3x3 conv as a 1x3x3 conv with filters 0..8."""
    torch.manual_seed(10)
    first = spc.SubMConv3d(4, 8, (1, 3, 3), indice_key="bef")
    second = spc.SubMConv3d(8, 8, (3, 1, 3), indice_key="bef")
    third = spc.SubMConv3d(8, 8, 3, indice_key="bef")
    features, indices = sparse_input(2500, seed=11)
    with torch.no_grad():
        a = first(SparseConvTensor(features, indices, SPARSE_SHAPE, 2))
        b = second(a)
        c = third(b)
        for conv, before, after in ((second, a, b), (third, b, c)):
            as_first = conv.weight.reshape(-1, *conv.weight.shape[-2:])[:9].reshape(1, 3, 3, *conv.weight.shape[-2:])
            dense = SparseConvTensor(before.features, indices, SPARSE_SHAPE, 2).dense()
            expected = F.conv3d(dense, _dense_weight(as_first), conv.bias, padding=(0, 1, 1))
            _assert_features_close(after.features, _at_sites(expected, indices))


def test_sparse_maxpool_matches_dense_max_pool_floored_at_zero() -> None:
    """PartA2's RoI head pools with SparseMaxPool3d(2, 2). Output sites are the windows holding an active site
    (a conv's), features the dense max pool of the zero-filled grid, floored at 0 where a window is full of
    negative sites (mmcv's kernel starts every output at 0). mmcv's own module runs the same forward."""
    features, indices = sparse_input(6000, seed=12)
    features[:40] = -features[:40].abs() - 0.1  # negative sites, some in windows of their own
    pool = spc.SparseMaxPool3d(2, 2)
    with torch.no_grad():
        pooled = pool(SparseConvTensor(features, indices, SPARSE_SHAPE, 2))
        through_mmcv = sparse_maxpool_forward(mmcv_ops.SparseMaxPool3d(2, 2),
                                              mmcv_ops.SparseConvTensor(features, indices, SPARSE_SHAPE, 2))
    dense = SparseConvTensor(features, indices, SPARSE_SHAPE, 2).dense()
    occupied = torch.zeros_like(dense[:, :1])
    site = indices.long()
    occupied[site[:, 0], 0, site[:, 1], site[:, 2], site[:, 3]] = 1
    torch.testing.assert_close(pooled.indices, _active_sites(occupied, (2, 2, 2), 2, 0), rtol=0, atol=0)
    expected = F.max_pool3d(dense, 2, 2).clamp(min=0)
    torch.testing.assert_close(pooled.features, _at_sites(expected, pooled.indices), rtol=0, atol=0)
    assert list(pooled.spatial_shape) == list(expected.shape[2:])
    # Some outputs are floored: a window whose active sites are all negative gives 0, not their max.
    window_max = F.max_pool3d(dense.masked_fill(occupied == 0, float("-inf")), 2, 2)
    assert (_at_sites(window_max, pooled.indices) < 0).any()
    torch.testing.assert_close(through_mmcv.features, pooled.features, rtol=0, atol=0)
    torch.testing.assert_close(through_mmcv.indices, pooled.indices, rtol=0, atol=0)
    with pytest.raises(Exception):  # mmcv 2.1.0 has no CPU kernel for it
        mmcv_ops.SparseMaxPool3d(2, 2)(mmcv_ops.SparseConvTensor(features, indices, SPARSE_SHAPE, 2))


def test_sparse_conv_forward_patches_mmcv_modules() -> None:
    """sparse_conv_forward runs mmcv's own SubMConv3d/SparseConv3d modules on mmcv's SparseConvTensor."""
    torch.manual_seed(10)
    features, indices = sparse_input(2000, seed=11)
    mmcv_subm = mmcv_ops.SubMConv3d(4, 8, 3, indice_key="k")
    mmcv_down = mmcv_ops.SparseConv3d(8, 8, 3, stride=2, padding=1)
    ours_subm = spc.SubMConv3d(4, 8, 3, indice_key="k")
    ours_down = spc.SparseConv3d(8, 8, 3, stride=2, padding=1)
    ours_subm.load_state_dict(mmcv_subm.state_dict())
    ours_down.load_state_dict(mmcv_down.state_dict())
    with torch.no_grad():
        through_mmcv = mmcv_ops.SparseConvTensor(features, indices, SPARSE_SHAPE, 2)
        through_mmcv = sparse_conv_forward(mmcv_down, sparse_conv_forward(mmcv_subm, through_mmcv))
        ours = ours_down(ours_subm(SparseConvTensor(features, indices, SPARSE_SHAPE, 2)))
    assert isinstance(through_mmcv, mmcv_ops.SparseConvTensor)
    assert "k" in through_mmcv.indice_dict
    torch.testing.assert_close(through_mmcv.indices, ours.indices, rtol=0, atol=0)
    torch.testing.assert_close(through_mmcv.features, ours.features, rtol=0, atol=0)


def test_dense_site_tables_build_the_sorted_rulebooks() -> None:
    """IREE's export indexes active sites in dense grid tables instead of sorting; the rulebooks must be the same."""
    _, indices = sparse_input(2500, seed=61)
    for kernel, stride, padding in (([3, 3, 3], [2, 2, 2], [1, 1, 1]), ([3, 1, 1], [2, 1, 1], [0, 0, 0])):
        by_sort = spc.conv_rulebook(indices, 2, SPARSE_SHAPE, kernel, stride, padding, [1, 1, 1], "sort")
        by_table = spc.conv_rulebook(indices, 2, SPARSE_SHAPE, kernel, stride, padding, [1, 1, 1], "dense")
        assert by_sort.neighbors.shape[0] > 0
        torch.testing.assert_close(by_table.out_indices, by_sort.out_indices, rtol=0, atol=0)
        torch.testing.assert_close(by_table.neighbors, by_sort.neighbors, rtol=0, atol=0)
    by_sort = spc.subm_rulebook(indices, 2, SPARSE_SHAPE, [3, 3, 3], [1, 1, 1], "sort")
    by_table = spc.subm_rulebook(indices, 2, SPARSE_SHAPE, [3, 3, 3], [1, 1, 1], "dense")
    assert (by_sort.neighbors < indices.shape[0]).sum() > indices.shape[0]  # beyond itself, some site has neighbours
    torch.testing.assert_close(by_table.neighbors, by_sort.neighbors, rtol=0, atol=0)


class DenseSiteChain(SparseChain):
    """SparseChain with the rulebooks IREE's export builds (dense site tables)."""

    def forward(self, features: Tensor, indices: Tensor, grid: Any = None) -> tuple[Tensor, ...]:
        x = SparseConvTensor(features, indices, SPARSE_SHAPE if grid is None else grid, 2)
        layers = (self.subm_a, self.subm_b, self.down, self.subm_c, self.up, self.squash)
        for layer in layers:
            x = sparse_conv_forward(layer, x, "dense")
        return x.features, x.indices


@pytest.mark.slow
def test_sparse_conv_runs_in_iree(tmp_path) -> None:
    """The dense-table rulebook has no ONNX Unique or TopK: IREE compiles it and matches eager PyTorch."""
    import onnx

    from autoexport.backends.iree import LLVM_CPU_FLAGS, IreeRunner, compile_vmfb, import_onnx

    torch.manual_seed(62)
    chain = DenseSiteChain().eval()
    with torch.no_grad():
        program = torch.export.export(chain, sparse_input(700, seed=63), strict=False,
                                      dynamic_shapes=({0: sites_dim}, {0: sites_dim}))
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
        check_inputs = sparse_input(1000, seed=64)
        expected = SparseChain.forward(chain, *check_inputs)[-3:-1]  # the sort-built rulebooks' squash output
    path = tmp_path / "sparse.onnx"
    onnx_program.save(str(path))
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not op_types & {"Unique", "TopK"}
    import_onnx(path, tmp_path / "sparse.mlir")
    compile_vmfb(tmp_path / "sparse.mlir", tmp_path / "sparse.vmfb", LLVM_CPU_FLAGS)
    runner = IreeRunner(tmp_path / "sparse.vmfb", "local-task", ["features", "indices"], ["features", "indices"])
    got = runner.infer({"features": check_inputs[0].numpy(), "indices": check_inputs[1].numpy()})
    torch.testing.assert_close(torch.from_numpy(got["indices"]), expected[1], rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(got["features"]), expected[0], rtol=1e-5, atol=1e-5)


class ScatterForIree(nn.Module):
    """DynamicVFE's reductions as the IREE export writes them: mean and max (scan) per voxel of 4-column coors."""

    def forward(self, points: Tensor, coors: Tensor) -> tuple[Tensor, ...]:
        mean_feats, voxel_coors = sc.dynamic_scatter(points, coors, "mean")
        max_feats, _ = sc.dynamic_scatter(points, coors, "max", max_by="scan")
        return mean_feats, max_feats, voxel_coors


@pytest.mark.slow
def test_dynamic_scatter_runs_in_iree(tmp_path) -> None:
    """IREE 3.13 imports no reducing ScatterElements and miscompiled the scatter-add when it was indexed by the
    unique's scattered inverse (wrong voxel rows, heap corruption); the sorted-order reductions run and match."""
    pytest.importorskip("iree.runtime")
    import onnx

    from autoexport.backends.iree import LLVM_CPU_FLAGS, IreeRunner, compile_vmfb, import_onnx

    def cloud(count: int, seed: int) -> tuple[Tensor, Tensor]:
        points = lidar_cloud(count, seed=seed)
        coors = vx.dynamic_voxelize(points, [0.8, 0.8, 1.0], KITTI_RANGE)
        rows = points.shape[0]
        batch = (torch.arange(rows) >= rows // 2).to(torch.int32)
        return points, torch.where((coors >= 0).all(1, keepdim=True), torch.cat([batch[:, None], coors], 1),
                                   torch.full((rows, 4), -1, dtype=torch.int32))

    points_dim = torch.export.Dim("num_points", min=2)
    with torch.no_grad():
        program = torch.export.export(ScatterForIree(), cloud(3000, 71), strict=False,
                                      dynamic_shapes=({0: points_dim}, {0: points_dim}))
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    path = tmp_path / "scatter.onnx"
    onnx_program.save(str(path))
    reductions = {a.s for node in onnx.load(str(path)).graph.node if node.op_type.startswith("Scatter")
                  for a in node.attribute if a.name == "reduction"}
    assert reductions <= {b"none", b"add"}
    import_onnx(path, tmp_path / "scatter.mlir")
    compile_vmfb(tmp_path / "scatter.mlir", tmp_path / "scatter.vmfb", LLVM_CPU_FLAGS)
    names = ["mean_feats", "max_feats", "voxel_coors"]
    runner = IreeRunner(tmp_path / "scatter.vmfb", "local-task", ["points", "coors"], names)
    for count, seed in ((3000, 72), (5000, 73)):
        points, coors = cloud(count, seed)
        expected = dict(zip(names, ScatterForIree()(points, coors)))
        got = runner.infer({"points": points.numpy(), "coors": coors.numpy()})
        torch.testing.assert_close(torch.from_numpy(got["voxel_coors"]), expected["voxel_coors"], rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(got["max_feats"]), expected["max_feats"], rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(got["mean_feats"]), expected["mean_feats"], rtol=1e-5, atol=1e-5)


# --- CUDA-only in mmcv: brute-force numpy references written from the CUDA kernels ------------------------------

def np_square_distance(center: np.ndarray, points: np.ndarray) -> np.ndarray:
    """float32 (dx*dx + dy*dy) + dz*dz of one center (3,) to points (N, 3), the kernels' order."""
    d = (center[None, :] - points).astype(np.float32)
    return (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) + d[:, 2] * d[:, 2]


def _np_fps(distance_row, batch: int, count: int, num_samples: int) -> np.ndarray:
    """mmcv's FPS loop: start at index 0, keep each point's distance to the picked set, pick the farthest."""
    picks = np.zeros((batch, num_samples), dtype=np.int32)
    for b in range(batch):
        nearest = np.full(count, 1e10, dtype=np.float32)
        last = 0
        for j in range(1, num_samples):
            nearest = np.minimum(nearest, distance_row(b, last))
            last = int(np.argmax(nearest))
            picks[b, j] = last
    return picks


def np_furthest_point_sample(points: np.ndarray, num_samples: int) -> np.ndarray:
    batch, count, _ = points.shape
    return _np_fps(lambda b, last: np_square_distance(points[b, last], points[b]), batch, count, num_samples)


def np_furthest_point_sample_with_dist(dist: np.ndarray, num_samples: int) -> np.ndarray:
    batch, count, _ = dist.shape
    return _np_fps(lambda b, last: dist[b, last], batch, count, num_samples)


def np_ball_query(min_radius: float, max_radius: float, sample_num: int, xyz: np.ndarray,
                  centers: np.ndarray) -> np.ndarray:
    min2 = np.float32(min_radius) * np.float32(min_radius)
    max2 = np.float32(max_radius) * np.float32(max_radius)
    idx = np.zeros((*centers.shape[:2], sample_num), dtype=np.int32)
    for b in range(centers.shape[0]):
        for m in range(centers.shape[1]):
            d2 = np_square_distance(centers[b, m], xyz[b])
            hits = np.nonzero((d2 == 0) | ((d2 >= min2) & (d2 < max2)))[0][:sample_num]
            if len(hits):
                idx[b, m, :] = hits[0]
                idx[b, m, : len(hits)] = hits
    return idx


def np_stack_ball_query(radius: float, sample_num: int, xyz: np.ndarray, centers: np.ndarray, xyz_cnt: np.ndarray,
                        center_cnt: np.ndarray) -> np.ndarray:
    """Port of mmcv's stack_ball_query_forward_cuda_kernel: d2 < r * r only, indices local to the sample."""
    radius2 = np.float32(radius) * np.float32(radius)
    idx = np.zeros((centers.shape[0], sample_num), dtype=np.int32)
    center_ends, xyz_starts = np.cumsum(center_cnt), np.cumsum(xyz_cnt) - xyz_cnt
    for m in range(centers.shape[0]):
        b = int(np.searchsorted(center_ends, m, side="right"))
        cloud = xyz[xyz_starts[b]: xyz_starts[b] + xyz_cnt[b]]
        hits = np.nonzero(np_square_distance(centers[m], cloud) < radius2)[0][:sample_num]
        if len(hits):
            idx[m, :] = hits[0]
            idx[m, : len(hits)] = hits
        else:
            idx[m, 0] = -1
    return idx


def np_stack_grouping(features: np.ndarray, idx: np.ndarray, features_cnt: np.ndarray,
                      idx_cnt: np.ndarray) -> np.ndarray:
    """Port of mmcv's stack_group_points_forward_cuda_kernel: out[m, c, s] = features[start + idx[m, s], c] when
    idx * C + c < end * C (local index against the absolute end row), else 0."""
    out = np.zeros((idx.shape[0], features.shape[1], idx.shape[1]), dtype=features.dtype)
    idx_ends, starts = np.cumsum(idx_cnt), np.cumsum(features_cnt) - features_cnt
    for m in range(idx.shape[0]):
        b = min(int(np.searchsorted(idx_ends, m, side="right")), len(idx_cnt) - 1)  # first end above m
        for s_ in range(idx.shape[1]):
            if idx[m, s_] < starts[b] + features_cnt[b] and 0 <= starts[b] + idx[m, s_] < len(features):
                out[m, :, s_] = features[starts[b] + idx[m, s_]]
    return out


def np_knn(k: int, xyz: np.ndarray, centers: np.ndarray) -> np.ndarray:
    idx = np.zeros((centers.shape[0], centers.shape[1], k), dtype=np.int32)
    for b in range(centers.shape[0]):
        for m in range(centers.shape[1]):
            nearest = np.argsort(np_square_distance(centers[b, m], xyz[b]), kind="stable")[:k]
            idx[b, m, : len(nearest)] = nearest
    return idx.transpose(0, 2, 1)


def np_three_nn(target: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = np.zeros((*target.shape[:2], 3), dtype=np.float32)
    idx = np.zeros((*target.shape[:2], 3), dtype=np.int32)
    for b in range(target.shape[0]):
        for n in range(target.shape[1]):
            d2 = np_square_distance(target[b, n], source[b])
            nearest = np.argsort(d2, kind="stable")[:3]  # ties: lower index first, as the strict-< kernel
            idx[b, n], dist[b, n] = nearest, np.sqrt(d2[nearest])
    return dist, idx


def np_dynamic_scatter(feats: np.ndarray, coors: np.ndarray, reduce: str) -> tuple[np.ndarray, np.ndarray]:
    kept = (coors >= 0).all(axis=1)
    voxels, inverse = np.unique(coors[kept], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = np.full((len(voxels), feats.shape[1]), -np.inf if reduce == "max" else 0, dtype=np.float32)
    if reduce == "max":
        np.maximum.at(out, inverse, feats[kept])
    else:
        np.add.at(out, inverse, feats[kept])
        if reduce == "mean":
            out /= np.bincount(inverse)[:, None]
    return out, voxels


def np_roiaware_pool3d(rois: np.ndarray, pts: np.ndarray, feats: np.ndarray, out_size: int, max_pts: int,
                       mode: str) -> np.ndarray:
    """Literal port of generate_pts_mask_for_box3d, collect_inside_pts_for_box3d and the max/avg pool kernels."""
    f32 = np.float32
    pooled = np.zeros((len(rois), out_size, out_size, out_size, feats.shape[1]), dtype=np.float32)
    for r, (cx, cy, cz, x_size, y_size, z_size, rz) in enumerate(rois.astype(np.float32)):
        members: dict[tuple[int, int, int], list[int]] = {}
        cos_a, sin_a = f32(np.cos(-np.float64(rz))), f32(np.sin(-np.float64(rz)))
        for k, (x, y, z) in enumerate(pts):
            if abs(f32(z - f32(cz + z_size / f32(2)))) > z_size / f32(2):
                continue
            shift_x, shift_y = f32(x - cx), f32(y - cy)
            local_x = f32(shift_x * cos_a) + f32(shift_y * -sin_a)
            local_y = f32(shift_x * sin_a) + f32(shift_y * cos_a)
            if not (-x_size / 2 < local_x < x_size / 2 and -y_size / 2 < local_y < y_size / 2):
                continue
            cell = (min(max(int(f32(local_x + x_size / f32(2)) / f32(x_size / f32(out_size))), 0), out_size - 1),
                    min(max(int(f32(local_y + y_size / f32(2)) / f32(y_size / f32(out_size))), 0), out_size - 1),
                    min(max(int(f32(z - cz) / f32(z_size / f32(out_size))), 0), out_size - 1))
            bucket = members.setdefault(cell, [])
            if len(bucket) < max_pts - 1:
                bucket.append(k)
        for cell, bucket in members.items():
            pooled[(r, *cell)] = feats[bucket].max(axis=0) if mode == "max" else feats[bucket].mean(axis=0)
    return pooled


def np_roipoint_pool3d(points: np.ndarray, feats: np.ndarray, boxes: np.ndarray, sampled: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Literal port of assign_pts_to_box3d, get_pooled_idx and roipoint_pool3d_forward (mmcv's CUDA kernels)."""
    f32 = np.float32
    batch, num_boxes = boxes.shape[:2]
    pooled = np.zeros((batch, num_boxes, sampled, 3 + feats.shape[2]), dtype=np.float32)
    empty = np.zeros((batch, num_boxes), dtype=np.int32)
    for b in range(batch):
        for m, (cx, cy, cz, dx, dy, dz, rz) in enumerate(boxes[b].astype(np.float32)):
            cos_a, sin_a = f32(np.cos(-np.float64(rz))), f32(np.sin(-np.float64(rz)))
            chosen: list[int] = []
            for k, (x, y, z) in enumerate(points[b]):
                if abs(f32(z - f32(cz + dz / f32(2)))) > dz / f32(2):
                    continue
                shift_x, shift_y = f32(x - cx), f32(y - cy)
                local_x = f32(shift_x * cos_a) + f32(shift_y * -sin_a)
                local_y = f32(shift_x * sin_a) + f32(shift_y * cos_a)
                if -dx / 2 < local_x < dx / 2 and -dy / 2 < local_y < dy / 2:
                    chosen.append(k)
                    if len(chosen) == sampled:
                        break
            if not chosen:
                empty[b, m] = 1
                continue
            for slot in range(sampled):
                k = chosen[slot % len(chosen)]
                pooled[b, m, slot] = np.concatenate([points[b, k], feats[b, k]])
    return pooled, empty


def point_cloud_batch(batch: int, count: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, count, 3, generator=generator) * 4


def test_furthest_point_sample_matches_reference() -> None:
    points = point_cloud_batch(2, 1500, seed=12)
    points[:, 700:710] = points[:, 100:101]  # duplicates: zero distances must not be picked again
    expected = np_furthest_point_sample(points.numpy(), 256)
    actual = ps.furthest_point_sample(points, 256)
    assert len(np.unique(expected[0])) == 256
    np.testing.assert_array_equal(actual.numpy(), expected)

    dist = torch.cdist(points, points) ** 2
    expected_dist = np_furthest_point_sample_with_dist(dist.numpy(), 128)
    np.testing.assert_array_equal(ps.furthest_point_sample_with_dist(dist, 128).numpy(), expected_dist)


class FurthestPointSamples(nn.Module):
    """Two FPS loops in one graph, as in a PointNet++ backbone (one per set-abstraction level)."""

    def forward(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        stretched = xyz * torch.tensor([1.0, 3.0, 0.5])
        return ps.furthest_point_sample(xyz, 48), ps.furthest_point_sample(stretched, 16)


def test_furthest_point_sample_loops_compile_and_run_in_iree(tmp_path) -> None:
    """The FPS translation is an ONNX Loop; torch-mlir lowers it only in for-like form with typed carried values
    (backends/iree.py make_loops_for_like). IREE must give the reference's indices at a point count it was not
    exported with."""
    pytest.importorskip("iree.runtime")
    from pathlib import Path

    import onnx

    from autoexport.backends.iree import (LLVM_CPU_FLAGS, LOOP_CONDITION_TRUE, IreeRunner, compile_vmfb, import_onnx,
                                          make_loops_for_like)
    from autoexport.export import export_onnx

    program = torch.export.export(FurthestPointSamples(), (point_cloud_batch(2, 300, seed=40),),
                                  dynamic_shapes=({1: _dim("points", 64)},), strict=False)
    onnx_path = Path(tmp_path) / "fps.onnx"
    export_onnx(program, ["xyz"], ["centers", "stretched_centers"], onnx_path)
    model = onnx.load(str(onnx_path))
    assert [n.input[1] for n in model.graph.node if n.op_type == "Loop"] == ["", ""]  # what onnxscript writes
    assert make_loops_for_like(model) == 2
    assert [n.input[1] for n in model.graph.node if n.op_type == "Loop"] == [LOOP_CONDITION_TRUE] * 2
    import_onnx(onnx_path, Path(tmp_path) / "fps.mlir")
    compile_vmfb(Path(tmp_path) / "fps.mlir", Path(tmp_path) / "fps.vmfb", LLVM_CPU_FLAGS)
    runner = IreeRunner(Path(tmp_path) / "fps.vmfb", "local-task", ["xyz"], ["centers", "stretched_centers"])
    for count, seed in ((300, 41), (517, 42)):
        xyz = point_cloud_batch(2, count, seed=seed).numpy()
        out = runner.infer({"xyz": xyz})
        np.testing.assert_array_equal(out["centers"], np_furthest_point_sample(xyz, 48))
        stretched = xyz * np.array([1.0, 3.0, 0.5], np.float32)
        np.testing.assert_array_equal(out["stretched_centers"], np_furthest_point_sample(stretched, 16))
        assert not np.array_equal(out["centers"][:, :16], out["stretched_centers"])


def test_ball_query_matches_reference() -> None:
    xyz = point_cloud_batch(2, 1200, seed=13)
    centers = torch.cat([xyz[:, :60], point_cloud_batch(2, 20, seed=14) + 10], dim=1)  # far centers: no hits
    # ~40 hits within 0.8 (truncated to 16), ~9 within 0.2..0.5 (32 slots, mostly repeats of the first hit).
    for min_radius, max_radius, sample_num in [(0.0, 0.8, 16), (0.2, 0.5, 32)]:
        expected = np_ball_query(min_radius, max_radius, sample_num, xyz.numpy(), centers.numpy())
        assert (expected[:, :60, 1] != expected[:, :60, 0]).any() and (expected[:, 60:] == 0).all()
        actual = ps.ball_query(min_radius, max_radius, sample_num, xyz, centers)
        np.testing.assert_array_equal(actual.numpy(), expected)


def test_stacked_ball_query_and_grouping_match_the_kernels() -> None:
    """PV-RCNN's stacked forms: three samples of 500, 1200 and 7 points (fewer than sample_num) stacked row-wise,
    centers per sample, some far from every point (no hit: [-1, 0, ...]), indices local to each sample."""
    counts = np.array([500, 1200, 7], dtype=np.int32)
    xyz = torch.cat([point_cloud_batch(1, int(n), seed=60 + i)[0] for i, n in enumerate(counts)])
    center_counts = np.array([40, 30, 5], dtype=np.int32)
    centers = torch.cat([torch.cat([xyz[:20], xyz[:20] + 10]), xyz[500:530], xyz[1700:1705]])  # 20 far ones
    cnt, center_cnt = torch.from_numpy(counts), torch.from_numpy(center_counts)
    for radius, sample_num in [(0.8, 16), (0.3, 32)]:
        expected = np_stack_ball_query(radius, sample_num, xyz.numpy(), centers.numpy(), counts, center_counts)
        assert (expected[20:40, 0] == -1).all() and (expected[:20, 1] != expected[:20, 0]).any()
        assert expected[70:, 0].max() < 7  # the third sample's own points, numbered from 0
        for actual in (ps.stack_ball_query(radius, sample_num, xyz, centers, cnt, center_cnt),
                       ps.ball_query(0.0, radius, sample_num, xyz, centers, cnt, center_cnt)):  # mmcv's signature
            np.testing.assert_array_equal(actual.numpy(), expected)

    features = torch.randn(int(counts.sum()), 6)
    idx = expected.copy()
    idx[:, 0][idx[:, 0] == -1] = 0  # mmdet3d's StackQueryAndGroup points empty balls at row 0 before grouping
    idx[3, 1] = 600  # past the first sample's points: zero
    idx[45, 1] = 1203  # past the second sample's 1200 points but below its end row (1700): the kernel reads row 1703
    idx[45, 2] = 1700  # at the second sample's end row: zero
    expected_groups = np_stack_grouping(features.numpy(), idx, counts, center_counts)
    assert not expected_groups[3, :, 1].any() and not expected_groups[45, :, 2].any()
    np.testing.assert_array_equal(expected_groups[45, :, 1], features[1703].numpy())
    for actual in (ps.stack_grouping_operation(features, torch.from_numpy(idx), cnt, center_cnt),
                   ps.grouping_operation(features, torch.from_numpy(idx), cnt, center_cnt)):
        np.testing.assert_array_equal(actual.numpy(), expected_groups)


def test_knn_matches_reference() -> None:
    xyz = point_cloud_batch(2, 900, seed=15)
    centers = point_cloud_batch(2, 70, seed=16)
    np.testing.assert_array_equal(ps.knn(16, xyz, centers).numpy(), np_knn(16, xyz.numpy(), centers.numpy()))
    np.testing.assert_array_equal(ps.knn(8, xyz.transpose(1, 2), centers.transpose(1, 2), True).numpy(),
                                  np_knn(8, xyz.numpy(), centers.numpy()))
    short = xyz[:, :5]  # fewer points than k: the kernel leaves index 0
    np.testing.assert_array_equal(ps.knn(8, short, centers).numpy(), np_knn(8, short.numpy(), centers.numpy()))


def test_three_nn_and_interpolate_match_reference() -> None:
    target = point_cloud_batch(2, 400, seed=17)
    source = point_cloud_batch(2, 120, seed=18)
    source[:, 50] = source[:, 10]  # an exact tie: the lower index must come first
    expected_dist, expected_idx = np_three_nn(target.numpy(), source.numpy())
    dist, idx = ps.three_nn(target, source)
    np.testing.assert_array_equal(idx.numpy(), expected_idx)
    np.testing.assert_allclose(dist.numpy(), expected_dist, rtol=0, atol=0)

    features = torch.randn(2, 24, 120)
    weight = torch.rand(2, 400, 3)
    f, w, i = features.numpy(), weight.numpy(), idx.numpy().astype(np.int64)
    gathered = np.stack([np.take_along_axis(f, i[:, None, :, j].repeat(24, 1), 2) for j in range(3)], axis=-1)
    expected = (w[:, None, :, 0] * gathered[..., 0] + w[:, None, :, 1] * gathered[..., 1]) \
        + w[:, None, :, 2] * gathered[..., 2]
    np.testing.assert_allclose(ps.three_interpolate(features, idx, weight).numpy(), expected, rtol=0, atol=0)


def test_gather_points_and_grouping_match_reference() -> None:
    features = torch.randn(2, 6, 300)
    index = torch.randint(0, 300, (2, 40), dtype=torch.int32)
    group_index = torch.randint(0, 300, (2, 40, 16), dtype=torch.int32)
    expected_gather = np.stack([features[b].numpy()[:, index[b].numpy()] for b in range(2)])
    expected_group = np.stack([features[b].numpy()[:, group_index[b].numpy()] for b in range(2)])
    np.testing.assert_array_equal(ps.gather_points(features, index).numpy(), expected_gather)
    np.testing.assert_array_equal(ps.grouping_operation(features, group_index).numpy(), expected_group)


@pytest.mark.parametrize("reduce", ["max", "mean", "sum"])
def test_dynamic_scatter_matches_reference(reduce: str) -> None:
    points = lidar_cloud(6000, seed=19)
    coors = vx.dynamic_voxelize(points, [0.8, 0.8, 1.0], KITTI_RANGE)
    sample = (torch.arange(points.shape[0]) >= points.shape[0] // 2).to(torch.int32)
    batched = torch.cat([sample[:, None], coors], dim=1)
    batched[batched[:, 1] < 0] = -1
    for coordinates in (coors, batched):
        expected_feats, expected_coors = np_dynamic_scatter(points.numpy(), coordinates.numpy(), reduce)
        feats, voxel_coors = sc.dynamic_scatter(points, coordinates, reduce)
        np.testing.assert_array_equal(voxel_coors.numpy(), expected_coors)
        np.testing.assert_allclose(feats.numpy(), expected_feats, rtol=1e-6, atol=1e-6)
    module_feats, _ = sc.DynamicScatter([0.8, 0.8, 1.0], KITTI_RANGE, reduce == "mean")(points, batched)
    if reduce != "sum":
        torch.testing.assert_close(module_feats, feats)
    if reduce == "max":  # the IREE export's scan: the same maxima, exactly
        scanned, scanned_coors = sc.dynamic_scatter(points, batched, reduce, max_by="scan")
        torch.testing.assert_close(scanned, feats, rtol=0, atol=0)
        torch.testing.assert_close(scanned_coors, voxel_coors, rtol=0, atol=0)
    # mmdet3d's dynamic_scatter_3d (the voxel segmentors' preprocessor) also maps each point to its voxel row,
    # -1 for points dropped for a negative coordinate.
    feats_3d, coors_3d, point2voxel_map = sc.dynamic_scatter_3d(points, batched, reduce, True)
    torch.testing.assert_close(feats_3d, feats)
    torch.testing.assert_close(coors_3d, voxel_coors)
    dropped = (batched < 0).any(dim=1)
    assert dropped.any() and (point2voxel_map[dropped] == -1).all()
    torch.testing.assert_close(coors_3d[point2voxel_map[~dropped]], batched[~dropped])
    assert len(sc.dynamic_scatter_3d(points, batched, reduce)) == 2


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_roiaware_pool3d_matches_reference(mode: str) -> None:
    rois = random_boxes(1, 6, seed=20)[0]
    pts = torch.cat([points_near_boxes(rois[None], 150, seed=21)[0], lidar_cloud(300, seed=22, features=3)])
    feats = torch.randn(pts.shape[0], 5)
    expected = np_roiaware_pool3d(rois.numpy(), pts.numpy(), feats.numpy(), 4, 6, mode)
    actual = pib.RoIAwarePool3d(4, max_pts_per_voxel=6, mode=mode)(rois, pts, feats)
    assert (expected != 0).any(axis=-1).sum() > 50
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_roipoint_pool3d_matches_reference() -> None:
    boxes = random_boxes(2, 7, seed=40)
    points = points_near_boxes(boxes, 30, seed=41)
    boxes[1, 6, :2] = 500.0  # far from every point: an empty box
    points[0, :5] = points[0, 5:10]  # duplicates of an inside point
    feats = torch.randn(*points.shape[:2], 4, generator=torch.Generator().manual_seed(42))
    expected, expected_empty = np_roipoint_pool3d(points.numpy(), feats.numpy(), boxes.numpy(), 16)
    pooled, empty = pib.RoIPointPool3d(16)(points, feats, boxes)
    counts = pib.points_in_boxes_all(points, boxes).sum(dim=1)
    # Boxes with fewer points than slots (cyclic fill), with more (truncation) and one empty.
    assert (counts > 16).any() and ((counts > 0) & (counts < 16)).any() and expected_empty.sum() == 1
    np.testing.assert_array_equal(empty.numpy(), expected_empty)
    np.testing.assert_array_equal(pooled.numpy(), expected)


def np_assign_score_withk(scores: np.ndarray, points: np.ndarray, centers: np.ndarray, knn_idx: np.ndarray
                          ) -> np.ndarray:
    """mmcv's assign_score_withk_forward_cuda_kernel, one output element at a time in float32: the sum over m of
    points[kn] * score - centers[cn] * score, where cn is the row's first neighbour; out-of-range kn stays 0."""
    batch, num_points, num_kernels, out_channels = points.shape
    _, num_centers, num_neighbours, _ = scores.shape
    output = np.zeros((batch, out_channels, num_centers, num_neighbours), dtype=np.float32)
    for b, o, n, k in np.ndindex(batch, out_channels, num_centers, num_neighbours):
        center, neighbour = knn_idx[b, n, 0], knn_idx[b, n, k]
        if not 0 <= neighbour < num_points:
            continue
        value = np.float32(0)
        for m in range(num_kernels):
            score = scores[b, n, k, m]
            value += points[b, neighbour, m, o] * score - centers[b, center, m, o] * score
        output[b, o, n, k] = value
    return output


def test_assign_score_withk_matches_reference() -> None:
    generator = torch.Generator().manual_seed(43)
    scores = torch.softmax(torch.randn(2, 12, 6, 4, generator=generator), dim=-1)
    points = torch.randn(2, 50, 4, 5, generator=generator)
    centers = torch.randn(2, 50, 4, 5, generator=generator)
    knn_idx = torch.randint(0, 50, (2, 12, 6), generator=generator)
    knn_idx[1, 3, 2] = 50  # out of range: that output stays 0
    knn_idx[0, 5, 4] = -1
    expected = np_assign_score_withk(scores.numpy(), points.numpy(), centers.numpy(), knn_idx.numpy())
    assembled = pc.assign_score_withk(scores, points, centers, knn_idx)
    assert assembled.shape == (2, 5, 12, 6)
    assert not expected[1, :, 3, 2].any() and not expected[0, :, 5, 4].any()
    # (p - c) * s instead of the kernel's p * s - c * s: float32 rounding apart, nothing more.
    np.testing.assert_allclose(assembled.numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="aggregate"):
        pc.assign_score_withk(scores, points, centers, knn_idx, "median")


# --- export: torch.export with dynamic sizes, then ONNX Runtime, both compared with eager ------------------------

@dataclass
class ExportCase:
    build: Callable[[], nn.Module]
    export_inputs: Callable[[], tuple[Tensor, ...]]
    check_inputs: Callable[[], tuple[Tensor, ...]]  # other sizes than the export's
    dynamic_shapes: tuple


class VoxelPipeline(nn.Module):
    """Hard voxelization (custom op) next to the dynamic path of DynamicVFE: voxelize, then scatter per voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.hard = vx.Voxelization([0.16, 0.16, 4], KITTI_RANGE, 8, 3000).eval()
        self.dynamic = vx.Voxelization([0.8, 0.8, 4], KITTI_RANGE, -1, -1)
        self.scatter = sc.DynamicScatter([0.8, 0.8, 4], KITTI_RANGE, average_points=True)

    def forward(self, points: Tensor):
        coors = self.dynamic(points)
        return (*self.hard(points), coors, *self.scatter(points, coors), sc.dynamic_scatter(points, coors, "max")[0])


class StackedGrouping(nn.Module):
    """PV-RCNN's StackQueryAndGroup core: stacked ball query, then stacked grouping of the points' features."""

    def forward(self, xyz: Tensor, centers: Tensor, xyz_cnt: Tensor, center_cnt: Tensor, features: Tensor) -> Tensor:
        idx = ps.ball_query(0.0, 0.5, 8, xyz, centers, xyz_cnt, center_cnt)
        return ps.grouping_operation(features, idx.clamp(min=0), xyz_cnt, center_cnt)


def _stacked_inputs(first: int, second: int, seed: int) -> tuple[Tensor, ...]:
    """Two samples of `first` and `second` points stacked, 24 + 16 centers drawn from them."""
    xyz = torch.cat([point_cloud_batch(1, first, seed=seed)[0], point_cloud_batch(1, second, seed=seed + 1)[0]])
    centers = torch.cat([xyz[:24], xyz[first:first + 16]])
    return (xyz, centers, torch.tensor([first, second], dtype=torch.int32), torch.tensor([24, 16], dtype=torch.int32),
            torch.randn(first + second, 5, generator=torch.Generator().manual_seed(seed)))


class SparseUNet(nn.Module):
    """One of each sparse conv and the max pool: what the export test needs (SparseChain's dense test covers more
    geometry)."""

    def __init__(self) -> None:
        super().__init__()
        self.subm = spc.SubMConv3d(4, 8, 3, indice_key="subm1")
        self.down = spc.SparseConv3d(8, 16, 3, stride=2, padding=1, indice_key="spconv2")
        self.up = spc.SparseInverseConv3d(16, 8, 3, indice_key="spconv2")
        self.pool = spc.SparseMaxPool3d(2, 2)

    def forward(self, features: Tensor, indices: Tensor) -> tuple[Tensor, ...]:
        subm = self.subm(SparseConvTensor(features, indices, SPARSE_SHAPE, 2))
        down = self.down(subm)
        up = self.up(down)
        pooled = self.pool(up)
        return (subm.features, down.features, down.indices, up.features, up.indices, down.dense(), pooled.features,
                pooled.indices)


class DeformPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(23)
        self.v1 = dc.DeformConv2dPack(8, 8, 3, padding=1, deform_groups=2)
        self.v2 = dc.ModulatedDeformConv2dPack(8, 8, 3, stride=2, padding=1)
        for pack in (self.v1, self.v2):
            nn.init.normal_(pack.conv_offset.weight, std=0.3)

    def forward(self, x: Tensor):
        return self.v1(x), self.v2(x)


class BoxOps(nn.Module):
    def forward(self, points: Tensor, boxes: Tensor, feats: Tensor):
        return (pib.points_in_boxes_part(points, boxes), pib.points_in_boxes_all(points, boxes),
                pib.RoIAwarePool3d(3, 5, "max")(boxes[0], points[0], feats),
                pib.RoIAwarePool3d(3, 5, "avg")(boxes[0], points[0], feats),
                *pib.RoIPointPool3d(8)(points, feats[None], boxes))


class PAConvAssembly(nn.Module):
    """PAConvCUDA's use of the op: neighbours from knn, softmax scores over the weight bank."""

    def forward(self, xyz: Tensor, point_feats: Tensor, center_feats: Tensor, scores: Tensor):
        neighbours = ps.knn(scores.shape[2], xyz, xyz[:, :10]).transpose(1, 2)  # knn gives (B, K, npoint)
        return pc.assign_score_withk(scores, point_feats, center_feats, neighbours)


class PointNetOps(nn.Module):
    """A PointNet++ set-abstraction and feature-propagation round trip through every point op."""

    def forward(self, xyz: Tensor, feats: Tensor):
        centers_index = ps.furthest_point_sample(xyz, 24)
        centers = ps.gather_points(xyz.transpose(1, 2).contiguous(), centers_index).transpose(1, 2)
        square_distance = ((xyz[:, :, None] - xyz[:, None]) ** 2).sum(-1)
        grouped = ps.grouping_operation(feats, ps.ball_query(0.0, 0.8, 8, xyz, centers))
        center_feats = grouped.amax(dim=3)
        neighbours = ps.knn(4, xyz, centers)
        distance, index = ps.three_nn(xyz, centers)
        weight = torch.softmax(-distance, dim=2)
        return (centers_index, ps.furthest_point_sample_with_dist(square_distance, 12), grouped, neighbours,
                distance, index, ps.three_interpolate(center_feats, index, weight))


def _dim(name: str, min: int = 2) -> torch.export.Dim:
    return torch.export.Dim(name, min=min)


def _box_inputs(count: int, per_box: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    boxes = random_boxes(1, count, seed)
    points = points_near_boxes(boxes, per_box, seed + 1)
    return points, boxes, torch.randn(points.shape[1], 3, generator=torch.Generator().manual_seed(seed))


def _paconv_inputs(count: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (point_cloud_batch(2, count, seed), torch.randn(2, count, 4, 6, generator=generator),
            torch.randn(2, count, 4, 6, generator=generator),
            torch.softmax(torch.randn(2, 10, 8, 4, generator=generator), dim=-1))


points_dim, sites_dim, height_dim, width_dim, boxes_dim, centers_dim = (
    _dim("points", 16), _dim("sites"), _dim("height", 4), _dim("width", 4), _dim("boxes"), _dim("centers"))

EXPORT_CASES = {
    "voxelization_and_dynamic_scatter": ExportCase(
        VoxelPipeline, lambda: (lidar_cloud(3000, seed=24),), lambda: (lidar_cloud(5000, seed=25),),
        ({0: points_dim},)),
    "sparse_conv": ExportCase(lambda: SparseUNet().eval(), lambda: sparse_input(800, seed=26),
                              lambda: sparse_input(1100, seed=27), ({0: sites_dim}, {0: sites_dim})),
    # MinkUNet's grid, computed from the sites in the graph; checked on a cloud spanning a smaller one.
    "sparse_conv_on_the_data_grid": ExportCase(lambda: GridFromData(SparseChain()).eval(),
                                               lambda: sparse_input(800, seed=28), lambda: _shallower(1500, seed=29),
                                               ({0: sites_dim}, {0: sites_dim})),
    "stacked_ball_query_and_grouping": ExportCase(
        StackedGrouping, lambda: _stacked_inputs(300, 400, seed=64), lambda: _stacked_inputs(520, 250, seed=65),
        ({0: points_dim}, {0: centers_dim}, None, None, {0: points_dim})),
    "deform_conv": ExportCase(DeformPair, lambda: (torch.randn(1, 8, 12, 14),), lambda: (torch.randn(1, 8, 17, 9),),
                              ({2: height_dim, 3: width_dim},)),
    "points_in_boxes_and_roiaware_pool3d": ExportCase(
        BoxOps, lambda: _box_inputs(5, 50, seed=28), lambda: _box_inputs(7, 40, seed=30),
        ({1: points_dim}, {1: boxes_dim}, {0: points_dim})),
    "point_sampling_and_grouping": ExportCase(
        PointNetOps, lambda: (point_cloud_batch(2, 300, seed=32), torch.randn(2, 5, 300)),
        lambda: (point_cloud_batch(2, 410, seed=33), torch.randn(2, 5, 410)), ({1: points_dim}, {2: points_dim})),
    "paconv_assign_score_withk": ExportCase(
        PAConvAssembly, lambda: _paconv_inputs(300, seed=34), lambda: _paconv_inputs(410, seed=35),
        ({1: points_dim}, {1: points_dim}, {1: points_dim}, None)),
}


def _assert_outputs_equal(actual, expected) -> None:
    actual = actual if isinstance(actual, (tuple, list)) else [actual]
    expected = expected if isinstance(expected, (tuple, list)) else [expected]
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        got = torch.as_tensor(got)
        assert got.shape == want.shape
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got.to(want.dtype), want, rtol=0, atol=0)


@pytest.mark.parametrize("case_name", list(EXPORT_CASES))
def test_export_pt2_and_onnx_match_eager(case_name: str, tmp_path) -> None:
    import onnxruntime

    case = EXPORT_CASES[case_name]
    module = case.build()
    with torch.no_grad():
        program = torch.export.export(module, case.export_inputs(), dynamic_shapes=case.dynamic_shapes, strict=False)
        check_inputs = case.check_inputs()
        expected = module(*check_inputs)
        _assert_outputs_equal(program.module()(*check_inputs), expected)

        onnx_program = torch.onnx.export(program, case.export_inputs(), dynamo=True, verbose=False,
                                         custom_translation_table=onnx_translation_table())
    path = tmp_path / f"{case_name}.onnx"
    onnx_program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: value.numpy() for arg, value in zip(session.get_inputs(), check_inputs)}
    _assert_outputs_equal(session.run(None, feed), expected)


class StridedSparse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = spc.SparseConv3d(4, 8, 3, stride=2, padding=1)

    def forward(self, features: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        out = self.down(SparseConvTensor(features, indices, SPARSE_SHAPE, 2))
        return out.features, out.indices


@pytest.mark.slow
def test_aoti_compiles_sparse_conv_correctly(tmp_path) -> None:
    """AOTInductor once returned wrong features after a strided conv (index_select + reshape on a data-dependent
    row count); the gather now uses advanced indexing, which it compiles correctly."""
    torch.manual_seed(52)
    module = StridedSparse().eval()
    with torch.no_grad():
        program = torch.export.export(module, sparse_input(600, seed=53), strict=False,
                                      dynamic_shapes=({0: sites_dim}, {0: sites_dim}))
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "sparse.pt2"))
        check_inputs = sparse_input(900, seed=54)
        _assert_outputs_equal(torch._inductor.aoti_load_package(package)(*check_inputs), module(*check_inputs))


def test_registry_is_complete() -> None:
    required = {"Voxelization", "voxelization", "SubMConv3d", "SparseConv3d", "SparseInverseConv3d", "DeformConv2d",
                "ModulatedDeformConv2d", "deform_conv2d", "modulated_deform_conv2d", "points_in_boxes_part",
                "points_in_boxes_all", "points_in_boxes_cpu", "furthest_point_sample", "ball_query", "gather_points",
                "grouping_operation", "three_nn", "three_interpolate", "knn", "dynamic_scatter", "DynamicScatter",
                "RoIAwarePool3d", "assign_score_withk", "SparseMaxPool3d"}
    assert required <= set(OP_LIBRARY)
    custom_translations = {entry.onnx_translation for entry in OP_LIBRARY.values() if entry.method == "custom-op"}
    assert None not in custom_translations
    assert custom_translations <= set(onnx_translation_table().values())
    for entry in OP_LIBRARY.values():
        module_path, name = entry.mmcv_target.rsplit(".", 1)
        assert getattr(__import__(module_path, fromlist=[name]), name) is not None


class Reciprocal(nn.Module):
    def forward(self, distance: Tensor) -> Tensor:
        return 1.0 / (distance + 1e-8)  # mmdet3d's PointFPModule weights


def test_onnx_keeps_small_epsilons(tmp_path) -> None:
    """onnxscript's no-op rules treat `x + 1e-8` as `x + 0`; the export must keep the epsilon (1/0 would be inf)."""
    import onnxruntime

    from autoexport.export import export_onnx

    program = torch.export.export(Reciprocal(), (torch.rand(2, 3),), strict=False)
    export_onnx(program, ["distance"], ["weight"], tmp_path / "reciprocal.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "reciprocal.onnx"), providers=["CPUExecutionProvider"])
    distance = np.array([[0.0, 1e-3, 2.0], [4.0, 0.0, 1e-7]], dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"distance": distance})[0], 1.0 / (distance + np.float32(1e-8)),
                               rtol=1e-6)


def test_gpu_check_compares_with_mmcv_kernels(tmp_path) -> None:
    """The harness that compared the library with mmcv's CUDA kernels on an H200 (scripts/gpu_mmcv_reference.sh),
    run here on the ops where mmcv has CPU kernels: same code path, same comparisons, mmcv's CPU kernels."""
    import json

    from autoexport.ops import gpu_check

    report = tmp_path / "gpu_check.json"
    names = ["Voxelization (hard)", "DeformConv2d", "ModulatedDeformConv2d"]
    code = gpu_check.main(["--device", "cpu", "--reference", "mmcv", "--repeat", "1", "--only", *names,
                           "--json", str(report)])
    result = json.loads(report.read_text())
    assert result["reference"] == "mmcv CPU" and result["mmcv"] == "2.1.0"
    assert [row["op"] for row in result["rows"]] == names
    assert code == 0 and result["failures"] == 0, result["rows"]
    # bit-identical to mmcv's CPU kernels: voxel indices and floats alike
    assert all("max abs 0.0e+00" in row["comparison"] for row in result["rows"]), result["rows"]


def test_gpu_check_accepts_an_fps_mismatch_only_at_a_distance_tie() -> None:
    from autoexport.ops import gpu_check

    # From point 0, points 1 and 2 are equally far (1.0): either may come second; point 3 is nearer (0.5).
    points = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 0.5, 0]]])
    first = torch.tensor([[0, 1, 2]])
    assert gpu_check.fps_compare(torch.tensor([[0, 2, 1]]), first, (points, 3))[1]
    assert not gpu_check.fps_compare(torch.tensor([[0, 3, 1]]), first, (points, 3))[1]
    assert gpu_check.fps_compare(first.clone(), first, (points, 3)) == ("0/3 idx differ", True)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("align_corners", [True, False])
def test_grid_sample_by_gather_matches_torch(mode: str, align_corners: bool) -> None:
    from autoexport.ops.grid_sample import grid_sample_by_gather

    generator = torch.Generator().manual_seed(44)
    features = torch.randn(2, 5, 7, 9, generator=generator)
    grid = torch.rand(2, 4, 30, 2, generator=generator) * 2.6 - 1.3  # a third of the points off the map
    # Points on the corners and, for nearest, exactly halfway between pixels (round half to even, as nearbyint).
    grid[0, 0, :4] = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])
    grid[1, 0, :3, 0] = torch.tensor([0.5, 1.5, 6.5]) * 2 / 8 - 1
    expected = F.grid_sample(features, grid, mode=mode, padding_mode="zeros", align_corners=align_corners)
    got = grid_sample_by_gather(features, grid, mode=mode, padding_mode="zeros", align_corners=align_corners)
    if mode == "nearest":
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:  # the same corner weights; a sum of 4 weighted terms rounded in another order: a few ulps of the inputs
        torch.testing.assert_close(got, expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps
                                   * features.abs().max().item())
    # Anything else is F.grid_sample's own.
    border = F.grid_sample(features, grid, mode=mode, padding_mode="border", align_corners=align_corners)
    torch.testing.assert_close(grid_sample_by_gather(features, grid, mode=mode, padding_mode="border",
                                                     align_corners=align_corners), border, rtol=0, atol=0)
