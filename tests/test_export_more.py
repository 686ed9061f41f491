"""The other required configs, user data and checkpoints, single formats, and a failing parity check."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CENTERPOINT_PILLAR, KITTI_PP, NUS_PP, export_to


def _meta(out: Path) -> dict:
    return json.loads((out / "metadata.json").read_text())


def _parity_passed_everywhere(out: Path, runtimes: set[str]) -> None:
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["checks"]
    assert {c["runtime"] for c in parity["checks"]} == runtimes
    assert all(c["passed"] and c["mismatched"] == 0 for c in parity["checks"])


@pytest.mark.parametrize("config, model_type, first_outputs, backends", [
    (NUS_PP, "MVXFasterRCNN", ["cls_score_0", "bbox_pred_0", "dir_cls_pred_0"], ()),
    (CENTERPOINT_PILLAR, "CenterPoint", ["reg_task0", "height_task0", "dim_task0", "rot_task0", "vel_task0",
                                         "heatmap_task0"], ("iree",)),
])
def test_nuscenes_configs_export_with_parity(tmp_path: Path, config: str, model_type: str, first_outputs: list[str],
                                             backends: tuple[str, ...]):
    out = tmp_path / "export"
    assert export_to(config, out, *[a for b in backends for a in ("--backend", b)]) == 0
    meta = _meta(out)
    assert meta["model_type"] == model_type
    assert [o["name"] for o in meta["outputs"]][: len(first_outputs)] == first_outputs
    details = meta["export_info"]["tensor_details"]
    assert {t["path"] for t in details} == {"inputs.voxels.voxels", "inputs.voxels.num_points", "inputs.voxels.coors"}
    assert all(t["dynamic_dims"]["0"]["name"] == "num_voxels" for t in details)
    assert meta["preprocess"]["point_cloud"]["load_dim"] == 5 and meta["preprocess"]["point_cloud"]["sweeps_num"] > 0
    assert "PointPillarsScatter" in {p["target"] for p in meta["export_patches"]}
    assert meta["tensor_boundary"] == "mvx_two_stage_forward"
    _parity_passed_everywhere(out, {"pt2", "onnxruntime"} | {"iree-llvm-cpu" for b in backends if b == "iree"})
    # The PT2 program runs the held-out sample (not used for export) within tolerance of eager.
    feed = dict(np.load(out / "inputs" / "heldout_0.npz"))
    expected = dict(np.load(out / "reference" / "heldout_0.npz"))
    program = torch.export.load(str(out / "model.pt2")).module()
    outputs = program(*[torch.from_numpy(feed[t["name"]]) for t in details])
    for spec, value in zip(meta["outputs"], outputs):
        np.testing.assert_allclose(value.numpy(), expected[spec["name"]], atol=1e-4, rtol=1e-4)


def test_user_samples_and_checkpoint(kitti_export: Path, tmp_path: Path):
    # A checkpoint in mmengine's layout, holding the weights of the earlier export.
    state = torch.export.load(str(kitti_export / "model.pt2")).state_dict
    ckpt = tmp_path / "pp.pth"
    torch.save({"state_dict": {k[len("model."):]: v for k, v in state.items()}, "meta": {"epoch": 1}}, ckpt)
    # User clouds: a KITTI-style .bin and a .npy, of different sizes.
    from autoexport.samples import PointCloudFormat, synthesize_cloud

    fmt = PointCloudFormat(4, [0, 1, 2, 3], [0, -39.68, -3, 69.12, 39.68, 1], dataset_type="KittiDataset")
    rng = np.random.default_rng(7)
    synthesize_cloud(rng, 9000, fmt).tofile(tmp_path / "000001.bin")
    np.save(tmp_path / "000002.npy", synthesize_cloud(rng, 16000, fmt))
    out = tmp_path / "user"
    code = export_to(KITTI_PP, out, "--checkpoint", str(ckpt), "--sample", str(tmp_path / "000001.bin"),
                     "--sample", str(tmp_path / "000002.npy"), "--format", "pt2")
    assert code == 0
    meta = _meta(out)
    assert meta["checkpoint"] == str(ckpt.resolve()) and meta["weights"] == "checkpoint"
    assert [s["origin"] for s in meta["samples"]][:2] == [str(tmp_path / "000001.bin"), str(tmp_path / "000002.npy")]
    assert "random subset" in meta["samples"][2]["origin"]
    assert (out / "model.pt2").exists() and not (out / "model.onnx").exists()
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["runtime"] for c in parity["checks"]} == {"pt2"}
    # Same weights as the earlier export: both PT2 programs agree on the user's inputs.
    feed = dict(np.load(out / "inputs" / "sample_0.npz"))
    names = [t["name"] for t in meta["export_info"]["tensor_details"]]
    args = [torch.from_numpy(feed[n]) for n in names]
    ours = torch.export.load(str(out / "model.pt2")).module()(*args)
    before = torch.export.load(str(kitti_export / "model.pt2")).module()(*args)
    for a, b in zip(ours, before):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_failed_parity_exits_1_and_keeps_artifacts_out_of_the_output_dir(tmp_path: Path, caplog):
    out = tmp_path / "strict"
    # ONNX Runtime differs from eager by ~1e-5 (float reassociation); a zero tolerance must fail under the strict
    # rule (the default float64-referenced rule would pass this float noise).
    assert export_to(KITTI_PP, out, "--format", "onnx", "--atol", "0", "--rtol", "0", "--parity", "strict") == 1
    assert not out.exists()
    failed = tmp_path / "strict.failed"
    parity = json.loads((failed / "parity.json").read_text())
    assert parity["passed"] is False
    assert any(c["runtime"] == "onnxruntime" and not c["passed"] for c in parity["checks"])
    assert _meta(failed)["status"] == "parity_failed"
    assert "parity failed" in caplog.text and "elements outside" in caplog.text
    # Each failed check is also measured against a float64 run of the model (eager fp32 misses a zero tolerance too).
    measured = [c["float64"] for c in parity["checks"] if not c["passed"]]
    assert measured and all(m is not None and m["eager_fp32_mismatched"] > 0 for m in measured)
    assert not (failed / "model.pt2").exists(), "--format onnx writes no model.pt2"
    shutil.rmtree(failed)


def test_sparse_conv_model_exports_through_the_op_library(tmp_path: Path) -> None:
    """SECOND: mmcv's sparse convolution has no CPU kernel and cannot be traced; the op library's substitute runs
    in the eager reference (on CPU) and in the export, and ONNX Runtime reproduces it."""
    out = tmp_path / "second"
    assert export_to("second_hv_secfpn_8xb6-80e_kitti-3d-3class", out, "--format", "both") == 0
    metadata = json.loads((out / "metadata.json").read_text())
    subs = {s["by"]: s for s in metadata["substitutions"]}
    assert subs["SparseConvolution.forward (autoexport.ops)"]["in_eager_reference"]
    assert "middle_encoder.conv_input.0" in subs["SparseConvolution.forward (autoexport.ops)"]["module_paths"]
    assert not subs["SparseSequential.forward (autoexport.ops)"]["in_eager_reference"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["runtime"] for c in parity["checks"]} == {"pt2", "onnxruntime"}
    # Substitutions are undone after the export: mmcv's own forward is back.
    import mmcv.ops.sparse_conv as sparse_conv

    assert sparse_conv.SparseConvolution.forward.__module__ == "mmcv.ops.sparse_conv"


def test_one_view_test_time_augmentation_is_unwrapped(tmp_path: Path) -> None:
    """Waymo configs pack inside MultiScaleFlipAug3D, so the pipeline returns a one-view list; the data
    preprocessor then returned a list of batches. One view is no augmentation: it must reach the model as a batch."""
    from autoexport.analyze import _run_pipeline, _sample_spec, build_model, load_config
    from autoexport.configs import resolve_config

    cfg = load_config(resolve_config("second_hv_secfpn_sbn-all_16xb2-2x_waymoD5-3d-3class"))
    assert cfg.test_dataloader.dataset.pipeline[-1]["type"] == "MultiScaleFlipAug3D"
    model = build_model(cfg, "cpu", seed=0)
    spec = _sample_spec(cfg, tmp_path)
    [prepared] = _run_pipeline(model, spec.pipeline, spec.synthesize(tmp_path, seed=0)[:1], seed=0, quiet=True)
    voxels = prepared.inputs["voxels"]
    assert voxels["voxels"].shape[1:] == (20, 5) and voxels["voxels"].shape[0] > 1000  # Waymo: 5 features, 20 points
    assert len(prepared.data_samples) == 1 and type(prepared.data_samples[0]).__name__ == "Det3DDataSample"


def test_h3dnet_boundary_outputs_are_what_predict_decodes(monkeypatch: pytest.MonkeyPatch):
    """H3DNet is two-stage, but its proposals are decoded without NMS (test_cfg.rpn.use_nms=False), so the
    tensor boundary runs RPN, primitive heads and refinement as one graph. Its outputs must be exactly the tensors
    mmdet3d's own predict hands to H3DBboxHead.predict_by_feat, the host-side decode + NMS metadata.json names."""
    import copy
    import tempfile

    from mmdet3d.models.roi_heads.bbox_heads.h3d_bbox_head import H3DBboxHead
    from mmengine.structures import InstanceData

    from autoexport.analyze import build_model, init_random_weights, load_config, prepare_samples
    from autoexport.boundaries import boundary_for
    from autoexport.configs import resolve_config
    from autoexport.patches import eager_substitutions

    decoded: list[dict] = []

    def record_decode_input(self, points, feats_dict, batch_input_metas, suffix="_optimized", **kwargs):
        decoded.append({k: v.clone() for k, v in feats_dict.items() if isinstance(v, torch.Tensor)})
        return [InstanceData() for _ in batch_input_metas]

    monkeypatch.setattr(H3DBboxHead, "predict_by_feat", record_decode_input)
    cfg = load_config(resolve_config("h3dnet_8xb3_scannet-seg"))
    model = build_model(cfg, "cpu", seed=0)
    init_random_weights(model)
    boundary, forward = boundary_for(model)
    assert boundary.forward_name == "h3dnet_forward"
    with tempfile.TemporaryDirectory() as workdir:
        sample = prepare_samples(model, cfg, [], Path(workdir), seed=0)[0][0]  # 14000 synthesized points
    # mmcv's point ops are CUDA-only here: the eager runs use autoexport.ops' CPU kernels, as the pipeline's does.
    with eager_substitutions("cpu"), torch.no_grad():
        outputs = forward(model, copy.deepcopy(sample.inputs), sample.data_samples)
        model.predict(copy.deepcopy(sample.inputs), copy.deepcopy(sample.data_samples))
    read_by_decode = {"obj_scores_optimized", "sem_scores", "center_optimized", "dir_class", "dir_res_optimized",
                      "size_class", "size_res_optimized"}
    assert read_by_decode <= set(outputs) and all(isinstance(v, torch.Tensor) for v in outputs.values())
    for key in sorted(set(outputs)):
        torch.testing.assert_close(outputs[key], decoded[0][key], rtol=0, atol=0, msg=key)
    assert outputs["center_optimized"].std() > 0.01  # refined centres vary: not constant head biases


MINKUNET_SPCONV = "minkunet34_w32_spconv_8xb2-laser-polar-mix-3x_semantickitti"


def test_minkunet_spconv_exports_on_cpu_with_parity(tmp_path: Path) -> None:
    """MinkUNet's spconv backbone: mmdet3d's host voxelization moves indices to CUDA and its backbone's grid tensor
    breaks mmcv's SparseSequential, so both are patched in the eager reference too (and say so); the grid is the
    data's, computed in the graph, so the held-out cloud (another extent) checks that it is not fixed."""
    rng = np.random.default_rng(0)
    cloud = np.concatenate([rng.uniform(-12, 12, (4000, 2)), rng.uniform(-2, 1, (4000, 1)),
                            rng.uniform(0, 1, (4000, 1))], axis=1).astype(np.float32)
    sample = tmp_path / "000000.bin"
    cloud.tofile(sample)
    out = tmp_path / "minkunet"
    assert export_to(MINKUNET_SPCONV, out, "--sample", str(sample)) == 0
    meta = _meta(out)
    assert meta["model_type"] == "MinkUNet" and [o["name"] for o in meta["outputs"]] == ["seg_logits"]
    # The manifest says what each input holds: one point per voxel (not per point, as for dynamic voxelization).
    details = {t["path"]: t for t in meta["export_info"]["tensor_details"]}
    assert details["inputs.voxels.voxels"]["dynamic_dims"]["0"]["name"] == "num_voxels"
    assert "one point per occupied voxel" in details["inputs.voxels.voxels"]["description"]
    assert "(batch_index, x, y, z)" in details["inputs.voxels.coors"]["description"]
    points_dim = details["inputs.point2voxel_map"]["dynamic_dims"]["0"]
    assert points_dim["name"] == "num_points" and points_dim["observed"][0] == 4000
    in_eager = {f"{p['target']}.{p['method']}": p["in_eager_reference"] for p in meta["export_patches"]}
    assert in_eager["Det3DDataPreprocessor.voxelize"] and in_eager["MinkUNetBackbone.forward"]
    assert not in_eager["SparseSequential.forward"]  # export only: mmcv's own runs in the reference
    _parity_passed_everywhere(out, {"pt2", "onnxruntime"})
    parity = json.loads((out / "parity.json").read_text())
    reference = parity["reference"]
    assert "replaced as in the export" in reference and "MinkUNetBackbone.forward" in reference
    assert "SparseSequential" not in reference
    # Per-point logits of every point of each sample (subsets of the cloud: 100%, 80%, 60%).
    rows = {c["sample"]: c["shape"][0] for c in parity["checks"] if c["runtime"] == "onnxruntime"}
    assert rows["sample_0"] == 4000 and 3000 < rows["sample_1"] < 3500 and 2000 < rows["heldout_0"] < 2800
