"""Export patches must compute exactly what the mmdet3d code they replace computes, and be undone after."""

import pytest
import torch

from autoexport.patches import PatchContext, export_patches


def _scatter_inputs(batch: int, per_sample: int, nx: int, ny: int, channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coors, feats = [], []
    for b in range(batch):
        cells = torch.randperm(nx * ny, generator=g)[:per_sample]
        coors.append(torch.stack([torch.full_like(cells, b), torch.zeros_like(cells), cells // nx, cells % nx], 1))
        feats.append(torch.randn(per_sample, channels, generator=g))
    return torch.cat(feats), torch.cat(coors).int()


def test_pillar_scatter_patch_matches_mmdet3d_for_batches():
    from mmdet3d.models.middle_encoders import PointPillarsScatter

    scatter = PointPillarsScatter(in_channels=8, output_shape=[12, 10])  # ny=12, nx=10
    for batch in (1, 2, 3):
        feats, coors = _scatter_inputs(batch, 37, nx=10, ny=12, channels=8, seed=batch)
        expected = scatter(feats, coors, batch)
        with export_patches(scatter, PatchContext(batch_size=batch)) as applied:
            got = scatter(feats, coors, batch)
        assert [p.target for p in applied] == ["PointPillarsScatter"]
        assert got.shape == expected.shape == (batch, 8, 12, 10)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_patches_are_undone_after_the_block_even_on_error():
    from mmdet3d.models.middle_encoders import PointPillarsScatter

    original = PointPillarsScatter.forward
    scatter = PointPillarsScatter(in_channels=4, output_shape=[4, 4])
    try:
        with export_patches(scatter, PatchContext(batch_size=1)):
            assert PointPillarsScatter.forward is not original
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert PointPillarsScatter.forward is original


def test_pillar_scatter_patch_exports_with_dynamic_voxel_count():
    from mmdet3d.models.middle_encoders import PointPillarsScatter

    scatter = PointPillarsScatter(in_channels=4, output_shape=[16, 16]).eval()
    feats, coors = _scatter_inputs(1, 50, nx=16, ny=16, channels=4)
    n = torch.export.Dim("num_voxels", min=1)
    with export_patches(scatter, PatchContext(batch_size=1)):
        program = torch.export.export(scatter, (feats, coors, 1), dynamic_shapes=({0: n}, {0: n}, None), strict=False)
    more_feats, more_coors = _scatter_inputs(1, 90, nx=16, ny=16, channels=4, seed=5)
    torch.testing.assert_close(program.module()(more_feats, more_coors, 1), scatter(more_feats, more_coors, 1),
                               rtol=0, atol=0)


def _pillar_inputs(n: int, max_points: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    num_points = torch.randint(1, max_points + 1, (n,), generator=g).int()
    voxels = torch.randn(n, max_points, 4, generator=g) * 10
    voxels *= (torch.arange(max_points)[None, :] < num_points[:, None]).unsqueeze(-1)
    coors = torch.stack([torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                         torch.randint(0, 40, (n,), generator=g), torch.randint(0, 40, (n,), generator=g)], 1).int()
    return voxels, num_points, coors


def test_pillar_feature_net_patch_is_exact_and_leaves_its_input_alone():
    from mmdet3d.models.voxel_encoders import PillarFeatureNet

    for legacy in (True, False):
        net = PillarFeatureNet(in_channels=4, feat_channels=[16], with_distance=True, legacy=legacy,
                               voxel_size=(0.16, 0.16, 4), point_cloud_range=(0, -39.68, -3, 69.12, 39.68, 1)).eval()
        voxels, num_points, coors = _pillar_inputs(50, seed=int(legacy))
        expected = net(voxels.clone(), num_points, coors)
        given = voxels.clone()
        with torch.no_grad(), export_patches(net, PatchContext(batch_size=1)) as applied:
            got = net(given, num_points, coors)
        assert [p.target for p in applied] == ["PillarFeatureNet"]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert torch.equal(given, voxels), "the patched encoder must not write into its input"


def test_deconv_rewrite_applies_to_the_iree_export_only_and_matches():
    from mmcv.cnn import build_upsample_layer

    deconv = build_upsample_layer(dict(type="deconv", bias=False), in_channels=8, out_channels=6,
                                  kernel_size=4, stride=4).eval()
    odd = torch.nn.ConvTranspose2d(8, 6, kernel_size=3, stride=2, padding=1).eval()  # not kernel == stride
    torch_forward, mmcv_forward = torch.nn.ConvTranspose2d.forward, type(deconv).forward
    x = torch.randn(2, 8, 5, 7)
    expected, expected_odd = deconv(x), odd(x)
    with export_patches(deconv, PatchContext(batch_size=1)) as applied:
        assert applied == []
    with torch.no_grad(), export_patches(deconv, PatchContext(batch_size=1, variant="iree")) as applied:
        assert {p.target for p in applied} == {"ConvTranspose2d"}
        got = deconv(x)
        with export_patches(odd, PatchContext(batch_size=1, variant="iree")):
            got_odd = odd(x)
    assert got.shape == expected.shape == (2, 6, 20, 28)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # a 1x1 conv sums in another order
    torch.testing.assert_close(got_odd, expected_odd, rtol=0, atol=0)
    assert torch.nn.ConvTranspose2d.forward is torch_forward and type(deconv).forward is mmcv_forward
    torch.testing.assert_close(deconv(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("groups, kernel, stride, padding, output_padding, dilation", [
    (16, 4, 2, 1, 0, 1),  # SMOKE's DLA neck: depthwise 4x4 / 2 upsampling
    (4, 3, 2, 1, 1, 1),
    (2, 3, 3, 0, 2, 2),
    (3, 5, 2, 4, 0, 1),  # padding past the kernel's reach crops the spread input
])
def test_grouped_deconv_is_rewritten_as_the_grouped_conv_it_is(groups, kernel, stride, padding, output_padding,
                                                             dilation):
    deconv = torch.nn.ConvTranspose2d(2 * groups, 3 * groups, kernel, stride, padding, output_padding, groups,
                                      bias=True, dilation=dilation).double().eval()
    x = torch.randn(2, 2 * groups, 7, 9, dtype=torch.float64)
    expected = deconv(x)
    with torch.no_grad(), export_patches(deconv, PatchContext(batch_size=1, variant="iree")) as applied:
        assert {p.target for p in applied} == {"ConvTranspose2d"}
        got = deconv(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # the same products, summed in another order


@pytest.mark.slow
def test_grouped_deconv_compiles_and_runs_in_iree_only_when_rewritten(tmp_path):
    """IREE 3.13 rejects ONNX ConvTranspose with group > 1 ('tensor.collapse_shape' verifier error); the IREE
    variant's rewrite compiles and matches PyTorch's ConvTranspose2d."""
    pytest.importorskip("iree.runtime")
    from autoexport.backends.iree import LLVM_CPU_FLAGS, IreeRunner, compile_vmfb, import_onnx
    from autoexport.errors import ExportFailedError

    torch.manual_seed(5)
    deconv = torch.nn.ConvTranspose2d(16, 16, 4, 2, 1, groups=16, bias=False).eval()
    x = torch.randn(1, 16, 12, 20)

    def compiled(name: str):
        with torch.no_grad():
            onnx_program = torch.onnx.export(torch.export.export(deconv, (x,)), dynamo=True, verbose=False)
        onnx_program.save(str(tmp_path / f"{name}.onnx"))
        import_onnx(tmp_path / f"{name}.onnx", tmp_path / f"{name}.mlir")
        compile_vmfb(tmp_path / f"{name}.mlir", tmp_path / f"{name}.vmfb", LLVM_CPU_FLAGS)
        return IreeRunner(tmp_path / f"{name}.vmfb", "local-task", ["x"], ["y"])

    with pytest.raises(ExportFailedError, match="collapse_shape"):
        compiled("plain")
    with export_patches(deconv, PatchContext(batch_size=1, variant="iree")):
        runner = compiled("rewritten")
    with torch.no_grad():
        expected = deconv(x)
    got = torch.from_numpy(runner.infer({"x": x.numpy()})["y"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_padded_rows_land_in_the_spare_canvas_row_and_are_dropped():
    from mmdet3d.models.middle_encoders import PointPillarsScatter

    scatter = PointPillarsScatter(in_channels=8, output_shape=[12, 10])
    feats, coors = _scatter_inputs(1, 37, nx=10, ny=12, channels=8)
    expected = scatter(feats, coors, 1)
    pad_feats = torch.cat([feats, torch.full((5, 8), 99.0)])
    pad_coors = torch.cat([coors, torch.tensor([[1, 0, 0, 0]] * 5, dtype=coors.dtype)])
    with export_patches(scatter, PatchContext(batch_size=1, spare_batch_row=True)):
        got = scatter(pad_feats, pad_coors, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_point_op_functions_are_substituted_wherever_imported_and_restored():
    """mmdet3d's PointNet++ set abstraction calls mmcv's CUDA-only FPS, ball query, grouping and gather through
    names bound at import; the substitution rebinds them for the eager reference and for torch.export."""
    import mmcv.ops
    import numpy as np
    import pytest
    from mmdet3d.models.layers.pointnet_modules import PointSAModule
    from mmdet3d.models.layers.pointnet_modules import point_sa_module

    from autoexport.patches import eager_substitutions, substituted_op_functions
    from test_ops import np_furthest_point_sample, point_cloud_batch

    torch.manual_seed(5)
    module = PointSAModule(num_point=16, radius=0.6, num_sample=8, mlp_channels=[3, 8], use_xyz=True).eval()
    xyz, features = point_cloud_batch(1, 120, seed=6), torch.randn(1, 3, 120)
    with pytest.raises(Exception):  # mmcv 2.1.0 has no CPU kernel for these ops
        module(xyz, features)

    with eager_substitutions("cpu") as substituted, torch.no_grad():
        new_xyz, new_features, indices = module(xyz, features)
    names = {p.substitutes for p in substituted if not p.method}
    assert {"mmcv.ops.furthest_point_sample", "mmcv.ops.ball_query", "mmcv.ops.gather_points"} <= names
    np.testing.assert_array_equal(indices.numpy(), np_furthest_point_sample(xyz.numpy(), 16))
    torch.testing.assert_close(new_xyz, xyz[0, indices[0].long()][None], rtol=0, atol=0)

    with substituted_op_functions() as called, torch.no_grad():
        program = torch.export.export(module, (xyz, features), strict=False)
    assert {p.substitutes for p in called} == {"mmcv.ops.furthest_point_sample", "mmcv.ops.ball_query",
                                               "mmcv.ops.grouping_operation", "mmcv.ops.gather_points"}
    assert "autoexport.furthest_point_sample" in str(program.graph)
    other_xyz, other_features = point_cloud_batch(1, 120, seed=7), torch.randn(1, 3, 120)
    with eager_substitutions("cpu"), torch.no_grad():
        expected = module(other_xyz, other_features)
    for got, want in zip(program.module()(other_xyz, other_features), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert point_sa_module.gather_points is mmcv.ops.gather_points  # restored


def test_point_op_functions_are_restored_in_modules_imported_inside_the_block(tmp_path, monkeypatch):
    """mmengine's registry imports mmdet3d.models at the first build, inside the export's substitution block; a
    module imported there binds the substitute and must get mmcv's function back on exit (it once kept it, so
    later exports in the process recorded their calls into a finished block's list)."""
    import sys

    import mmcv.ops

    from autoexport.patches import substituted_op_functions

    (tmp_path / "imported_inside_block.py").write_text("from mmcv.ops import gather_points, ball_query\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "imported_inside_block", raising=False)
    with substituted_op_functions():
        import imported_inside_block
        bound_inside = imported_inside_block.gather_points
    assert bound_inside is not mmcv.ops.gather_points  # the substitute was bound inside the block
    assert imported_inside_block.gather_points is mmcv.ops.gather_points
    assert imported_inside_block.ball_query is mmcv.ops.ball_query


def test_paconv_cuda_with_the_substituted_assign_score_equals_mmdet3d_pure_pytorch_paconv():
    """PAConvCUDA calls mmcv's CUDA-only assign_score_withk (bound as `assign_score_cuda`); substituted, it must give
    what mmdet3d's own non-CUDA PAConv gives with the same weights on the same neighbourhoods."""
    import pytest
    from mmdet3d.models.layers.paconv import PAConv, PAConvCUDA, paconv

    from autoexport.patches import eager_substitutions

    torch.manual_seed(8)
    scorenet_cfg = dict(mlp_channels=[8, 16, 16], score_norm="softmax", temp_factor=1.0, last_bn=False)
    cuda_layer = PAConvCUDA(6, 16, 8, scorenet_cfg=scorenet_cfg).eval()
    plain_layer = PAConv(6, 16, 8, kernel_input="w_neighbor", scorenet_cfg=scorenet_cfg).eval()
    plain_layer.load_state_dict(cuda_layer.state_dict())
    features = torch.randn(2, 6, 200)
    knn_idx = torch.randint(0, 200, (2, 40, 12))
    points_xyz = torch.randn(2, 3, 40, 12)
    grouped = torch.stack([features[b][:, knn_idx[b]] for b in range(2)])  # (B, C, npoint, K)
    original = paconv.assign_score_cuda
    with pytest.raises(Exception):  # mmcv 2.1.0 has no CPU kernel for it
        cuda_layer((features, points_xyz, knn_idx))

    with eager_substitutions("cpu") as substituted, torch.no_grad():
        assembled = cuda_layer((features, points_xyz, knn_idx))[0]
    assert "mmcv.ops.assign_score_withk" in {p.substitutes for p in substituted if not p.method}
    assert paconv.assign_score_cuda is original  # restored
    with torch.no_grad():
        expected = plain_layer((grouped, points_xyz))[0]
    assert assembled.shape == expected.shape == (2, 16, 40, 12)
    torch.testing.assert_close(assembled, expected, rtol=1e-5, atol=1e-5)


def test_roiaware_pool3d_is_substituted_where_mmcv_has_no_kernel():
    from mmcv.ops import RoIAwarePool3d

    from autoexport.ops.points_in_boxes import roiaware_pool3d
    from autoexport.patches import eager_substitutions

    g = torch.Generator().manual_seed(0)
    rois = torch.cat([torch.rand(6, 3, generator=g) * 10, torch.rand(6, 3, generator=g) * 3 + 1,
                      torch.rand(6, 1, generator=g) * 3], dim=1)
    pts = torch.rand(3000, 3, generator=g) * 12 - 1
    feats = torch.randn(3000, 5, generator=g)
    original = RoIAwarePool3d.forward
    for mode in ("max", "avg"):
        pool = RoIAwarePool3d(out_size=4, max_pts_per_voxel=16, mode=mode)
        with pytest.raises(RuntimeError, match="implementation for device cpu not found"):
            pool(rois, pts, feats)  # why the eager reference needs the substitute on CPU
        with eager_substitutions("cpu") as applied:
            got = pool(rois, pts, feats)
        assert any(p.target == "RoIAwarePool3d" for p in applied)
        expected = roiaware_pool3d(rois, pts, feats, 4, 16, mode)  # checked against mmcv's kernels in test_ops
        assert got.shape == (6, 4, 4, 4, 5) and bool(got.abs().sum() > 0)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert RoIAwarePool3d.forward is original  # restored after the block


def test_roiaware_extractor_pools_every_sample_at_once_like_its_batch_loop():
    """PartA2's Single3DRoIAwareExtractor loops over int(batch_inds.max()) + 1 samples; the export patch pools all
    RoIs in one call where a RoI sees only its own sample's points. Both samples share one region, so a patch that
    let a RoI pool the other sample's points would differ."""
    from mmdet3d.models.roi_heads.roi_extractors import Single3DRoIAwareExtractor

    from autoexport.patches import eager_substitutions

    g = torch.Generator().manual_seed(3)
    extractor = Single3DRoIAwareExtractor(roi_layer=dict(type="RoIAwarePool3d", out_size=3, max_pts_per_voxel=8,
                                                         mode="max"))
    rois = torch.cat([torch.tensor([[0.0]] * 4 + [[1.0]] * 3),  # sample index, then 4 + 3 boxes in one region
                      torch.rand(7, 3, generator=g) * 6, torch.rand(7, 3, generator=g) * 2 + 2,
                      torch.rand(7, 1, generator=g) * 3], dim=1)
    coordinate = torch.rand(2000, 3, generator=g) * 8 - 1
    batch_inds = (torch.rand(2000, generator=g) < 0.5).long()
    feats = torch.randn(2000, 6, generator=g)
    with eager_substitutions("cpu"):
        expected = extractor(feats, coordinate, batch_inds, rois)  # mmdet3d's loop, the library's pooling
    assert expected.shape == (7, 3, 3, 3, 6) and bool((expected != 0).any(dim=-1).sum() > 20)
    original = Single3DRoIAwareExtractor.forward
    with export_patches(extractor, PatchContext(batch_size=2)) as applied:
        assert {p.target for p in applied} == {"Single3DRoIAwareExtractor", "RoIAwarePool3d"}
        batched = extractor(feats, coordinate, batch_inds, rois)
        program = torch.export.export(extractor, (feats, coordinate, batch_inds, rois), dynamic_shapes=(
            {0: torch.export.Dim("points")}, {0: torch.export.Dim("points")}, {0: torch.export.Dim("points")},
            {0: torch.export.Dim("rois", min=2)}))
    assert Single3DRoIAwareExtractor.forward is original  # restored after the block
    torch.testing.assert_close(batched, expected, rtol=0, atol=0)
    # The graph takes another RoI count than the example's.
    torch.testing.assert_close(program.module()(feats, coordinate, batch_inds, rois[:5]), expected[:5], rtol=0, atol=0)
    mixed = rois.clone()
    mixed[:4, 0] = 1.0  # every RoI on sample 1: other points, other pooled values
    assert not torch.equal(program.module()(feats, coordinate, batch_inds, mixed)[:4], expected[:4])


def _minkunet_points(n: int, extent: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xyz = torch.rand(n, 3, generator=g) * extent - extent / 2
    return torch.cat([xyz, torch.rand(n, 1, generator=g)], dim=1)


def test_minkunet_voxelize_runs_on_cpu_as_mmdet3d_would():
    """mmdet3d's minkunet voxelization calls .cuda() on its index tensors; the patch keeps them on the points'
    device. Reference: mmdet3d's own method with Tensor.cuda made a no-op for the test."""
    from mmdet3d.models.data_preprocessors import Det3DDataPreprocessor
    from mmdet3d.structures import Det3DDataSample, PointData

    from autoexport.patches import eager_substitutions

    preprocessor = Det3DDataPreprocessor(voxel=True, voxel_type="minkunet", batch_first=True, voxel_layer=dict(
        max_num_points=-1, point_cloud_range=[-100, -100, -20, 100, 100, 20], voxel_size=[0.2, 0.2, 0.2],
        max_voxels=(-1, -1)))
    points = [_minkunet_points(3000, 8.0, 0), _minkunet_points(2000, 6.0, 1)]

    def samples() -> list:
        return [Det3DDataSample(gt_pts_seg=PointData()) for _ in points]

    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        preprocessor.voxelize(points, samples())  # why the patch exists
    with eager_substitutions("cpu") as applied:
        got_samples = samples()
        got = preprocessor.voxelize(points, got_samples)
    assert any(p.target == "Det3DDataPreprocessor" for p in applied)
    expected_samples = samples()
    cuda = torch.Tensor.cuda
    try:
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        expected = preprocessor.voxelize(points, expected_samples)
    finally:
        torch.Tensor.cuda = cuda
    assert 1000 < got["voxels"].shape[0] < 5000  # several points share voxels
    for key in ("voxels", "coors"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    for mine, theirs in zip(got_samples, expected_samples):
        torch.testing.assert_close(mine.point2voxel_map, theirs.point2voxel_map, rtol=0, atol=0)
        torch.testing.assert_close(mine.batch_idx, theirs.batch_idx, rtol=0, atol=0)
    assert got["coors"][:, 0].unique().tolist() == [0, 1]  # batch_first: the sample index leads


def test_minkunet_voxelize_patch_is_listed_for_minkunet_preprocessors_only():
    """Every detector has a Det3DDataPreprocessor; only the minkunet voxel type gets (and reports) the patch."""
    from mmdet3d.models.data_preprocessors import Det3DDataPreprocessor

    from autoexport.patches import patches_for

    def targets(voxel_type: str) -> set[str]:
        model = torch.nn.Module()
        model.data_preprocessor = Det3DDataPreprocessor(voxel=True, voxel_type=voxel_type, voxel_layer=dict(
            max_num_points=-1, point_cloud_range=[-100, -100, -20, 100, 100, 20], voxel_size=[0.2, 0.2, 0.2],
            max_voxels=(-1, -1)))
        return {patch.target for _, patch, _ in patches_for(model)}

    assert "Det3DDataPreprocessor" in targets("minkunet")
    assert "Det3DDataPreprocessor" not in targets("hard") and "Det3DDataPreprocessor" not in targets("dynamic")


def test_minkunet_spconv_backbone_patch_keeps_the_data_dependent_grid():
    """MinkUNetBackbone's spconv path sizes the grid from the data (coors.max + 1); mmcv's SparseSequential cannot
    take it as one tensor. The patch passes it as 0-d tensors; it must equal mmdet3d's forward given the same grid
    as ints, and the exported graph must recompute the grid for each input (a strided conv drops the sites on an
    odd grid's last row, so a grid fixed to the example's would give other outputs)."""
    import mmdet3d.models.backbones.minkunet_backbone as minkunet_backbone
    from mmcv.ops import SparseConvTensor

    from autoexport.patches import eager_substitutions

    torch.manual_seed(0)
    backbone = minkunet_backbone.MinkUNetBackbone(
        in_channels=4, base_channels=8, num_stages=2, encoder_channels=[8, 16], encoder_blocks=[1, 1],
        decoder_channels=[16, 8], decoder_blocks=[1, 1], sparseconv_backend="spconv").eval()

    def voxels(n: int, extent: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        cells = torch.randperm(extent ** 3, generator=g)[:n]
        coors = torch.stack([torch.zeros_like(cells), cells // extent ** 2, cells // extent % extent,
                             cells % extent], dim=1).int()
        # Features of 100: a randomly initialised backbone is homogeneous, and its outputs are then O(1).
        return torch.randn(n, 4, generator=g) * 100, coors

    def reference(feats: torch.Tensor, coors: torch.Tensor, grid: list[int] | None = None) -> torch.Tensor:
        """mmdet3d's own forward, the grid handed to mmcv's SparseConvTensor as ints (the op library's convs)."""
        def as_ints(features, indices, spatial_shape, batch_size):  # noqa: ANN001, ANN202
            return SparseConvTensor(features, indices, grid or [int(s) for s in spatial_shape], batch_size)
        saved = minkunet_backbone.SparseConvTensor
        minkunet_backbone.SparseConvTensor = as_ints
        try:
            with eager_substitutions("cpu"):
                return original_forward(backbone, feats, coors)
        finally:
            minkunet_backbone.SparseConvTensor = saved

    original_forward = minkunet_backbone.MinkUNetBackbone.forward
    feats, coors = voxels(400, 12, 0)
    with pytest.raises(TypeError):
        backbone(feats, coors)  # mmdet3d's forward with mmcv's spconv: np.prod of the grid tensor
    with eager_substitutions("cpu") as applied:
        got = backbone(feats, coors)
    assert any(p.target == "MinkUNetBackbone" for p in applied)
    assert minkunet_backbone.MinkUNetBackbone.forward is original_forward  # restored after the block
    torch.testing.assert_close(got, reference(feats, coors), rtol=0, atol=0)

    with export_patches(backbone, PatchContext(batch_size=1)):
        program = torch.export.export(backbone, (feats, coors), dynamic_shapes=(
            {0: torch.export.Dim("voxels")}, {0: torch.export.Dim("voxels")}))
    other_feats, other_coors = voxels(300, 9, 1)  # grid 9 (odd) against the example's 12
    assert int(other_coors[:, 1:].max()) + 1 == 9
    expected = reference(other_feats, other_coors)
    torch.testing.assert_close(program.module()(other_feats, other_coors), expected, rtol=1e-5, atol=1e-5)
    fixed_grid = reference(other_feats, other_coors, grid=[12, 12, 12])
    assert not torch.allclose(fixed_grid, expected, rtol=1e-5, atol=1e-5)
