"""BEVFusion (mmdet3d projects/BEVFusion): its configs import on a CPU machine with the op library standing in for
the project's compiled extensions, the stand-ins keep the semantics of the project's kernels (ported here from
bev_pool_cuda.cu and voxelization_cpu.cpp), and the lidar-only model exports."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoexport import configs
from autoexport.ops.bev_pool import bev_pool, bev_pool_forward

PROJECT = Path("/work/shared/mmdet3d-projects/BEVFusion")
LIDAR = PROJECT / "configs" / "bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py"
LIDAR_CAM = PROJECT / "configs" / "bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py"
DEMO = Path("/work/shared/data/mmdet3d-demo/nuscenes")

needs_project = pytest.mark.skipif(not LIDAR.is_file(), reason=f"BEVFusion project not at {PROJECT}")


# ---- the project's kernels, ported line by line ------------------------------------------------------------

def kernel_bev_pool(x: np.ndarray, geom: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                    B: int, D: int, H: int, W: int) -> np.ndarray:
    """bev_pool_kernel: per interval, a float32 running sum assigned to out[b, z, x, y] (geom = x, y, z, b)."""
    out = np.zeros((B, D, H, W, x.shape[1]), np.float32)
    for start, length in zip(starts, lengths):
        psum = np.zeros(x.shape[1], np.float32)
        for i in range(start, start + length):
            psum = psum + x[i]
        gx, gy, gz, gb = geom[start]
        out[gb, gz, gx, gy] = psum
    return out


def kernel_hard_voxelize(points: np.ndarray, voxel_size, coors_range, max_points: int, max_voxels: int):
    """voxelization_cpu.cpp: float32 floor((p - min) / size) per axis, coordinates kept (x, y, z), voxels numbered
    by first point, points past max_points and voxels past max_voxels dropped."""
    size, low = np.float32(voxel_size), np.float32(coors_range[:3])
    grid = np.round((np.float32(coors_range[3:]) - low) / size).astype(int)
    index, voxels, coors, counts = {}, [], [], []
    for point in points:
        cell = np.floor((point[:3] - low) / size).astype(int)
        if (cell < 0).any() or (cell >= grid).any():
            continue
        key = tuple(cell)
        if key not in index:
            if len(voxels) >= max_voxels:
                continue
            index[key] = len(voxels)
            voxels.append(np.zeros((max_points, points.shape[1]), np.float32))
            coors.append(cell)
            counts.append(0)
        v = index[key]
        if counts[v] < max_points:
            voxels[v][counts[v]] = point
            counts[v] += 1
    return np.stack(voxels), np.stack(coors).astype(np.int32), np.asarray(counts, np.int32)


def random_frustum(seed: int, n: int = 3000, B: int = 2, D: int = 1, H: int = 12, W: int = 9, C: int = 5):
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([torch.randint(0, H, (n,), generator=g), torch.randint(0, W, (n,), generator=g),
                          torch.randint(0, D, (n,), generator=g), torch.randint(0, B, (n,), generator=g)], 1)
    return torch.randn(n, C, generator=g), coords.int(), (B, D, H, W)


def sorted_intervals(feats: torch.Tensor, coords: torch.Tensor, B: int, D: int, H: int, W: int):
    """What the project's bev_pool and QuickCumsumCuda.forward hand the kernel (ranks sorted stably here)."""
    ranks = coords[:, 0] * (W * D * B) + coords[:, 1] * (D * B) + coords[:, 2] * B + coords[:, 3]
    order = torch.from_numpy(np.argsort(ranks.numpy(), kind="stable"))
    feats, coords, ranks = feats[order], coords[order], ranks[order]
    kept = torch.ones(len(ranks), dtype=torch.bool)
    kept[1:] = ranks[1:] != ranks[:-1]
    starts = torch.where(kept)[0].int()
    lengths = torch.diff(starts, append=torch.tensor([len(ranks)], dtype=torch.int32)).int()
    return feats, coords, starts, lengths


# ---- bev_pool --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_extension_stand_in_is_the_kernel_bit_for_bit(seed: int):
    feats, coords, (B, D, H, W) = random_frustum(seed, D=3)
    feats, coords, starts, lengths = sorted_intervals(feats, coords, B, D, H, W)
    ours = bev_pool_forward(feats, coords, lengths, starts, B, D, H, W).numpy()
    expected = kernel_bev_pool(feats.numpy(), coords.numpy(), starts.numpy(), lengths.numpy(), B, D, H, W)
    assert np.array_equal(ours, expected)  # the same float32 sums in the same order


@pytest.mark.parametrize("seed", [0, 1])
def test_export_bev_pool_against_a_float64_cell_sum(seed: int):
    """The export's bev_pool (an index_add into each point's cell, no sort) against a plain float64 loop."""
    feats, coords, (B, D, H, W) = random_frustum(seed, D=3)
    expected = np.zeros((B, D, H, W, feats.shape[1]))
    for f, (x, y, z, b) in zip(feats.double().numpy(), coords.numpy()):
        expected[b, z, x, y] += f
    ours = bev_pool(feats, coords, B, D, H, W).permute(0, 2, 3, 4, 1).double().numpy()
    assert np.abs(ours - expected).max() < 2e-6  # float32 sums of about 25 values of size 1
    assert (ours[expected == 0] == 0).all()


# ---- importing the project on a CPU machine --------------------------------------------------------------------

@pytest.fixture(scope="module")
def lidar_cfg():
    if not LIDAR.is_file():
        pytest.skip(f"BEVFusion project not at {PROJECT}")
    return configs.load_config(LIDAR)


@needs_project
def test_lidar_config_imports_with_the_stand_ins(lidar_cfg):
    assert lidar_cfg.model.type == "BEVFusion"
    assert lidar_cfg.default_scope == "mmdet3d"  # from _base_/default_runtime.py, found in the wheel's configs
    assert set(configs.SUBSTITUTED_EXTENSIONS) == {"projects.BEVFusion.bevfusion.ops.bev_pool.bev_pool_ext",
                                                   "projects.BEVFusion.bevfusion.ops.voxel.voxel_layer"}
    assert not any(isinstance(f, configs._SubstituteFinder) for f in sys.meta_path)  # removed after the import
    from mmdet3d.registry import MODELS
    assert MODELS.get("BEVFusion") is not None and MODELS.get("DepthLSSTransform") is not None


@needs_project
def test_lidar_camera_config_imports(lidar_cfg):
    cfg = configs.load_config(LIDAR_CAM)
    assert cfg.model.view_transform.type == "DepthLSSTransform" and cfg.model.fusion_layer.type == "ConvFuser"


@needs_project
def test_projects_bev_pool_runs_on_the_stand_in(lidar_cfg):
    """The project's own bev_pool (its sort, QuickCumsumCuda, the stand-in kernel) against the ported kernel."""
    project_bev_pool = importlib.import_module("projects.BEVFusion.bevfusion.ops.bev_pool.bev_pool").bev_pool
    feats, coords, (B, D, H, W) = random_frustum(3, D=2)
    ours = project_bev_pool(feats, coords, B, D, H, W)
    sorted_feats, sorted_coords, starts, lengths = sorted_intervals(feats, coords, B, D, H, W)
    expected = kernel_bev_pool(sorted_feats.numpy(), sorted_coords.numpy(), starts.numpy(), lengths.numpy(),
                               B, D, H, W)
    # The project's argsort is not stable: within a cell, the order of the float32 sum may differ.
    assert np.abs(ours.permute(0, 2, 3, 4, 1).numpy() - expected).max() < 2e-6
    assert torch.equal(ours, bev_pool(feats, coords, B, D, H, W)) or \
        (ours - bev_pool(feats, coords, B, D, H, W)).abs().max() < 2e-6


@needs_project
def test_projects_voxelization_on_the_stand_in_is_its_cpu_kernel(lidar_cfg):
    """The project's Voxelization module over the voxel_layer stand-in: (x, y, z) coordinates as its kernels write
    them, on a grid that is not cubic."""
    voxelization = importlib.import_module("projects.BEVFusion.bevfusion.ops.voxel.voxelize").Voxelization
    voxel_size, pc_range = [0.5, 0.4, 1.0], [-4.0, -3.0, -2.0, 4.0, 3.0, 1.0]
    layer = voxelization(voxel_size, pc_range, max_num_points=3, max_voxels=[50, 50]).eval()
    points = torch.from_numpy(np.random.default_rng(0).uniform([-5, -4, -3, 0, 0], [5, 4, 2, 1, 1],
                                                               (400, 5)).astype(np.float32))
    voxels, coors, counts = layer(points)
    expected = kernel_hard_voxelize(points.numpy(), voxel_size, pc_range, 3, 50)
    assert np.array_equal(voxels.numpy(), expected[0])
    assert np.array_equal(coors.numpy(), expected[1])
    assert np.array_equal(counts.numpy(), expected[2])


def test_a_project_extension_without_a_stand_in_still_gets_the_clear_error(tmp_path: Path):
    package = tmp_path / "otherproject" / "ops"
    package.mkdir(parents=True)
    (tmp_path / "otherproject" / "__init__.py").write_text("from .ops import pool\n")
    (package / "__init__.py").write_text("")
    (package / "pool.py").write_text("from . import bev_pool_ext\n")  # same name, another project: no stand-in
    (package / "pool_cuda.cu").write_text("// kernel\n")
    config = tmp_path / "cfg.py"
    config.write_text("custom_imports = dict(imports=['otherproject'])\nmodel = dict(type='X')\n")
    with pytest.raises(configs.UserInputError, match="compiled extension otherproject.ops.bev_pool_ext.*no substitute"):
        configs.load_config(config)


# ---- TransFusionHead's proposal order ------------------------------------------------------------------------

def test_stable_sort_translates_to_onnx_topk_with_ties_in_index_order(tmp_path: Path):
    """aten.sort.stable (the stable proposal order) has no torch.onnx translation; autoexport's is TopK over the
    axis, whose ties come out lower index first, as a stable sort's do."""
    import onnxruntime as ort

    from autoexport.onnx_translations import translation_table

    class Sorts(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = x.view(1, -1)
            return (torch.sort(flat, dim=-1, descending=True, stable=True).indices[..., :300],
                    torch.sort(flat, dim=1, stable=True).indices[..., :300])

    x = torch.zeros(1, 20000)
    x[0, torch.randperm(20000, generator=torch.Generator().manual_seed(0))[:400]] = 1.0  # 400 exact ties on top
    x[0, 7:20] = -1.0
    program = torch.onnx.export(torch.export.export(Sorts(), (x,)), dynamo=True,
                                custom_translation_table=translation_table())
    program.save(str(tmp_path / "sorts.onnx"))
    ort_model = ort.InferenceSession(str(tmp_path / "sorts.onnx"))
    ours = ort_model.run(None, {ort_model.get_inputs()[0].name: x.numpy()})
    for got, expected in zip(ours, Sorts()(x)):
        assert np.array_equal(got, expected.numpy())
    assert not torch.equal(x.view(-1).argsort(descending=True)[:300], Sorts()(x)[0][0]), \
        "PyTorch's unstable CPU argsort now keeps ties in index order: index_ordered_ties may be unneeded"


# ---- the lidar-only export ----------------------------------------------------------------------------------------

@needs_project
@pytest.mark.slow
def test_lidar_only_export_parity_on_the_demo_sweep(tmp_path: Path):
    """Random weights, the nuScenes demo sweep through the project's test pipeline (80% and 60% subsets of it as the
    second and held-out samples): about 6 minutes on 2 cores. On synthesized clouds random weights saturate the
    heatmap and the proposal ranking parts on 1-ulp Sigmoid differences (docs/models/bevfusion.md)."""
    from conftest import export_to

    sweep = next(DEMO.glob("*LIDAR_TOP*.pcd.bin"))
    out = tmp_path / "bevfusion"
    assert export_to(str(LIDAR), out, "--format", "both", "--sample", str(sweep)) == 0
    checks = json.loads((out / "parity.json").read_text())["checks"]
    outputs = {"center", "height", "dim", "rot", "vel", "heatmap", "query_heatmap_score", "dense_heatmap"}
    assert {c["output"] for c in checks} == outputs and len(checks) == 2 * 3 * len(outputs)
    assert all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    assert max(c["max_abs"] for c in checks if c["runtime"] == "pt2") == 0.0
    assert max(c["max_abs"] for c in checks if c["runtime"] == "onnxruntime") < 2e-4  # measured 1.2e-4
    metadata = json.loads((out / "metadata.json").read_text())
    assert [t["name"] for t in metadata["export_info"]["tensor_details"]] == ["voxels_feats", "voxels_coords"]
