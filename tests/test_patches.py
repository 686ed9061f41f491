"""Export patches must compute exactly what the mmdet3d code they replace computes, and be undone after."""

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
