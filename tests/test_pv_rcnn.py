"""PV-RCNN's export patches (voxel set abstraction, stacked grouping, RoI grid pooling) compute exactly what
mmdet3d's code computes, and keep the graph's point and RoI counts dynamic."""

from __future__ import annotations

import torch

from autoexport.patches import PatchContext, eager_substitutions, export_patches, substituted_op_functions

PV_RCNN = "pv_rcnn_8xb2-80e_kitti-3d-3class"


def _build(part: str) -> torch.nn.Module:
    import mmdet3d.models  # noqa: F401  registers the modules
    from mmdet3d.registry import MODELS
    from mmengine.registry import init_default_scope

    from autoexport.analyze import load_config
    from autoexport.configs import resolve_config

    init_default_scope("mmdet3d")
    torch.manual_seed(0)
    cfg = load_config(resolve_config(PV_RCNN)).model
    for key in part.split("."):
        cfg = cfg[key]
    module = MODELS.build(cfg)
    module.init_weights()
    for norm in (m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        norm.running_mean.normal_(0, 0.1)  # other than the identity, so a feature mix-up shows
        norm.running_var.uniform_(0.5, 2.0)
    return module.eval()


def _cloud(n: int, seed: int) -> torch.Tensor:
    """Points in PV-RCNN's KITTI range [0, -40, -3, 70.4, 40, 1], clustered so balls hold several points."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 3, generator=g) * torch.tensor([60.0, 60.0, 3.0]) + torch.tensor([5.0, -30.0, -2.5])
    xyz = centres[torch.randint(0, 12, (n,), generator=g)] + torch.randn(n, 3, generator=g) * 0.6
    return torch.cat([xyz, torch.rand(n, 1, generator=g)], dim=1)


def _sparse_levels(batch: int, seed: int) -> list:
    """Multi-scale sparse features as PV-RCNN's SparseEncoder returns them (channels 16, 32, 64, 64 at strides
    1, 2, 4, 8 of the 41 x 1600 x 1408 grid); the set abstraction reads their indices and features."""
    from mmcv.ops import SparseConvTensor

    g = torch.Generator().manual_seed(seed)
    levels = []
    for channels, stride in ((16, 1), (32, 2), (64, 4), (64, 8)):
        shape = [41 // stride + 1, 1600 // stride, 1408 // stride]
        rows = []
        for b in range(batch):
            count = 600 // stride + 50 * b
            cells = torch.stack([torch.randint(0, s, (count,), generator=g) for s in shape], dim=1)
            rows.append(torch.cat([torch.full((count, 1), b), cells], dim=1))
        indices = torch.cat(rows).int()
        levels.append(SparseConvTensor(torch.randn(len(indices), channels, generator=g), indices, shape, batch))
    return levels


def test_key_point_sampler_matches_mmdet3d_with_more_and_fewer_points_than_keypoints():
    """mmdet3d repeats the furthest-point order when a cloud has fewer points than keypoints (2048); the patch's
    modulo gives the same keypoints in both cases, without a branch on the point count."""
    vsa = _build("points_encoder")
    clouds = [_cloud(3000, 1), _cloud(700, 2)]
    with eager_substitutions("cpu"):  # mmcv's furthest point sampling is CUDA-only
        expected = vsa.sample_key_points(clouds, None)
        with export_patches(vsa, PatchContext(batch_size=2)) as applied:
            got = vsa.sample_key_points(clouds, None)
    assert "VoxelSetAbstraction" in {p.target for p in applied}
    assert got.shape == expected.shape == (2, 2048, 3)
    assert len(torch.unique(got[1], dim=0)) == 700  # the small cloud: every point, repeated
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_set_abstraction_matches_mmdet3d_and_keeps_the_point_count_dynamic():
    """VoxelSetAbstraction.forward and StackQueryAndGroup.forward patched: the same keypoint features as mmdet3d's
    (raw points, four sparse levels, BEV map) for a batch of two, and a graph exported on one cloud size gives
    mmdet3d's features on another (new_tensor([len(p)]) used to bake the traced point count in)."""
    vsa = _build("points_encoder")
    g = torch.Generator().manual_seed(5)
    feats = {"multi_scale_3d_feats": _sparse_levels(2, 7), "spatial_feats": torch.randn(2, 256, 200, 176, generator=g)}

    def run(clouds: list[torch.Tensor]) -> dict:
        return vsa({"points": clouds, "voxels": {}}, feats, None)

    clouds = [_cloud(2600, 3), _cloud(2300, 4)]
    with eager_substitutions("cpu"):
        expected = run(clouds)
        with export_patches(vsa, PatchContext(batch_size=2)) as applied:
            got = run(clouds)
    assert {"VoxelSetAbstraction", "StackQueryAndGroup"} <= {p.target for p in applied}
    assert expected["keypoint_features"].shape == (4096, 256 + 32 + 32 + 64 + 128 + 128)
    assert float(expected["keypoint_features"].abs().mean()) > 1e-2
    for name in ("keypoints", "keypoint_features", "fusion_keypoint_features"):
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)

    class Points(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vsa = vsa

        def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
            return run([first, second])["fusion_keypoint_features"]

    module = Points().eval()
    dims = ({0: torch.export.Dim("points_0", min=2049)}, {0: torch.export.Dim("points_1", min=2049)})
    with torch.no_grad(), export_patches(module, PatchContext(batch_size=2)), substituted_op_functions():
        program = torch.export.export(module, tuple(clouds), dynamic_shapes=dims)
    other = [_cloud(3100, 8), _cloud(2500, 9)]
    with torch.no_grad(), eager_substitutions("cpu"):
        reference = run(other)["fusion_keypoint_features"]
    torch.testing.assert_close(program.module()(*other), reference, rtol=1e-5, atol=1e-5)


def test_roi_grid_extractor_matches_mmdet3d_for_two_samples():
    """Batch3DRoIGridExtractor patched: batch counts against the static batch size, the grid cells from a
    meshgrid (mmdet3d: nonzero() of ones): the same pooled grids for RoIs of two samples over one region."""
    extractor = _build("roi_head.bbox_roi_extractor")
    g = torch.Generator().manual_seed(11)
    keypoints = torch.cat([_cloud(1024, 12)[:, :3], _cloud(1024, 12)[:, :3] + 0.3])
    batch_inds = torch.arange(2048) // 1024
    feats = torch.randn(2048, 128, generator=g)
    boxes = torch.cat([keypoints[torch.randint(0, 2048, (9,), generator=g)],
                       torch.rand(9, 3, generator=g) * 3 + 1, torch.rand(9, 1, generator=g) * 3], dim=1)
    rois = torch.cat([torch.tensor([[0.0]] * 5 + [[1.0]] * 4), boxes], dim=1)
    with eager_substitutions("cpu"):
        expected = extractor(feats, keypoints, batch_inds, rois)
        grid = extractor.get_dense_grid_points(rois[:, 1:])
        with export_patches(extractor, PatchContext(batch_size=2)) as applied:
            got = extractor(feats, keypoints, batch_inds, rois)
            patched_grid = extractor.get_dense_grid_points(rois[:, 1:])
    assert {"Batch3DRoIGridExtractor", "StackQueryAndGroup"} <= {p.target for p in applied}
    assert expected.shape == (9, 6, 6, 6, 128) and bool((expected != 0).any(dim=-1).float().mean() > 0.2)
    torch.testing.assert_close(patched_grid, grid, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
