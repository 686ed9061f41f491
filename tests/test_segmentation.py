"""Point cloud segmentors: the test pipeline's annotation masks are stood in for, and EncoderDecoder3D exports as
its network on a batch of sliding-window patches (the host cuts the cloud and averages logits per point)."""

import json
from pathlib import Path

import numpy as np

from conftest import export_to

POINTNET2_SEG = "pointnet2_ssg_2xb16-cosine-200e_scannet-seg"


def test_annotation_stand_ins_follow_the_pipeline(tmp_path: Path):
    from autoexport.samples import SampleSource, add_annotation_stand_ins

    pipeline = [dict(type="LoadPointsFromFile", coord_type="DEPTH", load_dim=6),
                dict(type="LoadAnnotations3D", with_seg_3d=True, seg_3d_dtype="np.uint32"),
                dict(type="PointSegClassMapping")]
    source = SampleSource("sample_0", "export", {}, [], 123, "synthesized")
    add_annotation_stand_ins([source], pipeline, tmp_path)
    mask = np.fromfile(source.info["pts_semantic_mask_path"], dtype=np.uint32)
    assert mask.shape == (123,) and not mask.any()
    assert "pts_instance_mask_path" not in source.info
    np.testing.assert_array_equal(source.info["seg_label_mapping"][:5], np.arange(5))
    detection = SampleSource("sample_1", "export", {}, [], 10, "synthesized")
    add_annotation_stand_ins([detection], [dict(type="LoadAnnotations3D", with_bbox_3d=True)], tmp_path)
    assert detection.info == {}


def test_pointnet2_segmentor_exports_its_patch_network_with_parity(tmp_path: Path):
    out = tmp_path / "seg"
    assert export_to(POINTNET2_SEG, out, "--format", "both") == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model_type"] == "EncoderDecoder3D"
    [patches] = meta["export_info"]["tensor_details"]
    assert patches["path"] == "inputs.patches" and patches["dynamic_dims"]["0"]["name"] == "num_patches"
    assert patches["shape"][1:] == [8192, 6]  # test_cfg.num_points, xyz + rgb
    assert [o["name"] for o in meta["outputs"]] == ["seg_logits"]
    assert "scatter_add" in meta["postprocess"]["host_side"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["runtime"] for c in parity["checks"]} == {"pt2", "onnxruntime"}
    # Export samples carry 2 and 3 patches, the held-out one 4: the graph ran on a patch count it was not traced with.
    held_out = np.load(out / "inputs" / "heldout_0.npz")
    assert held_out[patches["name"]].shape[0] == 4
    assert all(c["mismatched"] == 0 for c in parity["checks"])
    assert np.load(out / "reference" / "heldout_0.npz")["seg_logits"].shape == (4, 20, 8192)


CYLINDER3D = "cylinder3d_4xb4-3x_semantickitti"


def test_cylinder3d_voxel_segmentor_exports_per_point_logits_with_parity(tmp_path: Path):
    """Cylinder3D: the preprocessor's cylindrical voxelization (its dynamic_scatter_3d substituted) stays on the
    host; the graph takes the points' features and voxel coordinates plus point2voxel_map and returns per-point
    logits, as decode_head.predict does. Its sparse convs share indice_keys across kernel shapes (rulebook reuse)."""
    out = tmp_path / "cyl"
    assert export_to(CYLINDER3D, out, "--format", "both") == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model_type"] == "Cylinder3D" and meta["tensor_boundary"] == "voxel_segmentor_forward"
    details = {t["name"]: t for t in meta["export_info"]["tensor_details"]}
    assert set(details) == {"voxels_voxels", "voxels_coors", "point2voxel_map"}  # no raw cloud: unused
    assert all(t["dynamic_dims"]["0"]["name"] == "num_points" for t in details.values())
    assert details["voxels_voxels"]["shape"][1] == 6 and "one row per point" in details["voxels_voxels"]["description"]
    assert {s["op"].split(" ")[0] for s in meta["substitutions"]} >= {"mmcv.ops.SparseConvolution",
                                                                        "mmcv.ops.DynamicScatter"}
    # The preprocessor's point-to-voxel map ran mmdet3d's binding of a CUDA-only kernel, substituted host-side.
    host = [s for s in meta["substitutions"] if s.get("host_side")]
    assert [(s["op"], s["by"].split(" ")[0]) for s in host] == [
        ("mmdet3d.models.data_preprocessors.voxelize.dynamic_scatter_3d", "autoexport.ops.scatter.dynamic_scatter_3d")]
    assert [o["name"] for o in meta["outputs"]] == ["seg_logits"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["runtime"] for c in parity["checks"]} == {"pt2", "onnxruntime"}
    assert all(c["mismatched"] == 0 for c in parity["checks"])
    held_out = np.load(out / "reference" / "heldout_0.npz")["seg_logits"]
    assert held_out.shape[1] == 20 and held_out.shape[0] == np.load(out / "inputs" / "heldout_0.npz")[
        details["point2voxel_map"]["name"]].shape[0]
    assert held_out.std() > 0.1  # per-point logits vary: not a constant head bias
