"""Camera and camera+lidar models: samples parsed by the dataset's own class, camera matrices as named inputs,
deformable convolution and matrix inverse through the export."""

from __future__ import annotations

import json
from pathlib import Path

import mmcv
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from autoexport.analyze import _sample_spec, load_config
from autoexport.configs import resolve_config
from autoexport.onnx_translations import translation_table
from autoexport.patches import substituted_functions
from conftest import FUSION_SAMPLE, export_to

SMOKE = "smoke_dla34_dlaneck_gn-all_4xb8-6x_kitti-mono3d"
FCOS3D = "fcos3d_r101-caffe-dcn_fpn_head-gn_8xb2-1x_nus-mono3d"
IMVOXELNET = "imvoxelnet_8xb4_kitti-3d-car"
MONOFLEX_SAMPLE = str(Path(__file__).resolve().parents[1] / "sample_configs" / "monoflex_dla34_kitti_mono3d.py")


def test_kitti_mono_samples_come_from_the_dataset_parser(tmp_path: Path) -> None:
    spec = _sample_spec(load_config(resolve_config(SMOKE)), tmp_path)
    sources = spec.synthesize(tmp_path, seed=0)
    assert [s.role for s in sources] == ["export", "export", "heldout"]
    info = sources[0].info
    # KittiDataset.parse_data_info copied the default camera (CAM2) up and composed lidar2img = cam2img @ lidar2cam.
    assert Path(info["img_path"]).is_file() and info["img_path"].endswith("_CAM2.png")
    np.testing.assert_allclose(info["lidar2img"], np.asarray(info["cam2img"]) @ np.asarray(info["lidar2cam"]))
    image = mmcv.imread(info["img_path"])
    assert image.shape == (375, 1242, 3)
    # Scenes differ between samples, and objects are drawn: not a flat background.
    other = mmcv.imread(sources[1].info["img_path"])
    assert np.abs(image.astype(int) - other.astype(int)).mean() > 1.0 and image.std() > 20


def test_nuscenes_multi_view_dataset_gives_one_record_per_camera(tmp_path: Path) -> None:
    spec = _sample_spec(load_config(resolve_config(FCOS3D)), tmp_path)
    sources = spec.synthesize(tmp_path, seed=0)
    cameras = [next(iter(s.info["images"])) for s in sources]
    # NuScenesDataset (mv_image_based) splits a frame into six camera records; samples take different cameras.
    assert cameras == ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT"]
    assert all(len(s.files) == 6 for s in sources)  # all six images were written for each frame


def test_user_point_files_are_refused_for_camera_pipelines(tmp_path: Path) -> None:
    cloud = tmp_path / "cloud.bin"
    np.zeros((100, 4), np.float32).tofile(cloud)
    assert export_to(SMOKE, tmp_path / "out", "--sample", str(cloud)) == 2
    assert not (tmp_path / "out").exists()


def test_matrix_inverse_exports_to_onnx() -> None:
    import onnxruntime as ort

    class Inverts(torch.nn.Module):
        def forward(self, batch: torch.Tensor, single: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.inverse(batch), torch.linalg.inv(single), single[:2, :2].inverse()

    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(2, 4, 4, generator=generator) + 3 * torch.eye(4)
    single = torch.randn(3, 3, generator=generator) + 2 * torch.eye(3)
    with substituted_functions() as used:
        program = torch.export.export(Inverts(), (batch, single))
    assert [u.target for u in used] == ["torch.inverse"]
    onnx_program = torch.onnx.export(program, (), dynamo=True, custom_translation_table=translation_table())
    ort_model = ort.InferenceSession(onnx_program.model_proto.SerializeToString())
    outputs = ort_model.run(None, {i.name: t.numpy() for i, t in zip(ort_model.get_inputs(), (batch, single))})
    for got, expected in zip(outputs, Inverts()(batch, single)):
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-5)


def _group_norm_in_onnx_runtime(norm: torch.nn.Module, x: torch.Tensor, translations: dict,
                                decomposed: bool = False) -> tuple[np.ndarray, set[str]]:
    with torch.no_grad():
        exported = torch.export.export(norm, (x,))  # keeps aten.group_norm; decomposed: aten.native_group_norm
        program = torch.onnx.export(exported.run_decompositions() if decomposed else exported, dynamo=True,
                                    verbose=False, custom_translation_table=translations)
    ort_model = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return (ort_model.run(None, {ort_model.get_inputs()[0].name: x.numpy()})[0],
            {n.op_type for n in program.model_proto.graph.node})


@pytest.mark.parametrize("shape, groups, affine, decomposed", [
    ((2, 64, 12, 20), 32, True, False), ((3, 12, 50), 4, True, False), ((4, 6), 3, True, False),
    ((1, 16, 5, 6, 7), 8, False, False), ((2, 64, 12, 20), 32, True, True)])
def test_group_norm_translation_is_the_same_function(shape, groups, affine, decomposed):
    torch.manual_seed(2)
    norm = torch.nn.GroupNorm(groups, shape[1], affine=affine).eval()
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(*shape) * 3 + 2
    with torch.no_grad():
        expected = norm(x).numpy()
    got, op_types = _group_norm_in_onnx_runtime(norm, x, translation_table(), decomposed)
    assert "ReduceMean" in op_types and "InstanceNormalization" not in op_types
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_group_norm_translation_keeps_pytorch_precision_in_onnx_runtime():
    """A single fp32 InstanceNormalization over a 8 x 96 x 320 group (onnxscript's translation) drifts 3e-4 from
    float64 in ONNX Runtime; the blocked statistics stay at PyTorch's own ~2e-6."""
    torch.manual_seed(3)
    norm = torch.nn.GroupNorm(32, 256).eval()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.relu(torch.randn(1, 256, 96, 320) + 1.0) * 3 + 2  # post-activation maps: a mean far from zero
    with torch.no_grad():
        exact = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
        eager_error = (norm(x).double() - exact).abs().max().item()
    plain = np.abs(_group_norm_in_onnx_runtime(norm, x, {})[0] - exact.numpy()).max()  # onnxscript's
    blocked = np.abs(_group_norm_in_onnx_runtime(norm, x, translation_table())[0] - exact.numpy()).max()
    assert eager_error < 1e-5
    assert plain > 1e-4  # the drift the translation is for (measured 3.3e-4)
    assert blocked < 2 * max(eager_error, 1e-6), (blocked, eager_error)


def test_smoke_substitutes_deformable_conv_with_nonzero_offsets(tmp_path: Path) -> None:
    from autoexport.analyze import build_model, init_random_weights

    # mmcv zero-initializes the offset convs, which makes a deformable conv a plain conv; give them real offsets
    # (up to a few pixels) so the library's bilinear sampling is what parity checks.
    model = build_model(load_config(resolve_config(SMOKE)), "cpu", seed=0)
    init_random_weights(model)
    generator = torch.Generator().manual_seed(1)
    offset_convs = [m for name, m in model.named_modules() if name.endswith("conv_offset")]
    assert offset_convs
    for conv in offset_convs:
        conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * 0.02
        conv.bias.data = torch.randn(conv.bias.shape, generator=generator) * 0.5
    checkpoint = tmp_path / "smoke_offsets.pth"
    torch.save({"state_dict": model.state_dict()}, checkpoint)

    out = tmp_path / "smoke"
    assert export_to(SMOKE, out, "--checkpoint", str(checkpoint), "--format", "pt2") == 0
    metadata = json.loads((out / "metadata.json").read_text())
    substituted = json.dumps(metadata)
    assert "mmcv.ops.ModulatedDeformConv2dPack (modulated_deform_conv2d)" in substituted
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["runtime"] for c in parity["checks"]} == {"pt2"}
    # eager runs mmcv's CPU kernel, model.pt2 the library's (both im2col + GEMM: equal here to the last bit).
    assert max(c["max_abs"] for c in parity["checks"]) <= 1e-4
    # ... with the offsets in use: model.pt2 carries the non-zero offset convs of the checkpoint.
    state = torch.export.load(str(out / "model.pt2")).state_dict
    offsets = [v for k, v in state.items() if "conv_offset" in k and k.endswith("bias")]
    assert offsets and all(v.abs().max() > 0.1 for v in offsets)


def _random_checkpoint(config: str, path: Path) -> Path:
    from autoexport.analyze import build_model, init_random_weights

    model = build_model(load_config(resolve_config(config)), "cpu", seed=0)
    init_random_weights(model)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def imvoxelnet_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("camera")
    checkpoint = _random_checkpoint(IMVOXELNET, folder / "imvoxelnet.pth")  # so a test can rebuild the same model
    out = folder / "imvoxelnet"
    assert export_to(IMVOXELNET, out, "--checkpoint", str(checkpoint), "--format", "onnx") == 0
    return out, checkpoint


def test_imvoxelnet_reads_lidar2img_as_a_named_input(imvoxelnet_export: tuple[Path, Path]) -> None:
    out, _ = imvoxelnet_export
    metadata = json.loads((out / "metadata.json").read_text())
    inputs = {i["name"]: i for i in metadata["manifest"]["inputs"]}
    assert inputs["lidar2img"]["path"] == "metainfo.0.lidar2img" and inputs["lidar2img"]["shape"] == [4, 4]
    wrapper = (out / "wrapper.py").read_text()
    assert "set_field(lidar2img, 'lidar2img', field_type='metainfo')" in wrapper
    assert "'lidar2img': np.array" not in wrapper  # not also baked in as a constant
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["runtime"] for c in parity["checks"]} == {"pt2", "onnxruntime"}


def test_imvoxelnet_onnx_follows_a_new_camera_calibration(imvoxelnet_export: tuple[Path, Path]) -> None:
    """Another lidar2img fed to model.onnx gives what eager PyTorch gives with that matrix in its metainfo."""
    import onnxruntime as ort

    from autoexport.analyze import build_model, load_checkpoint_strict
    from autoexport.wrap import build_wrapper

    out, checkpoint = imvoxelnet_export
    feed = dict(np.load(out / "inputs" / "sample_0.npz"))
    shifted = feed["lidar2img"].copy()
    shifted[0, :] += 40.0 * shifted[2, :]  # principal point moved 40 px to the right
    ort_model = ort.InferenceSession(str(out / "model.onnx"))
    original = ort_model.run(None, feed)
    moved = ort_model.run(None, {**feed, "lidar2img": shifted})
    assert np.abs(moved[0] - original[0]).max() > 1e-3  # the matrix is used, not a constant

    model = build_model(load_config(resolve_config(IMVOXELNET)), "cpu", seed=0)
    load_checkpoint_strict(model, str(checkpoint))
    wrapper = build_wrapper(out / "wrapper.py", model.eval())
    with torch.no_grad():
        expected = wrapper(torch.from_numpy(feed["imgs"]), torch.from_numpy(shifted))
    for got, want in zip(moved, expected):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_custom_imports_fusion_sample_exports_with_camera_matrix_input(tmp_path: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "fusion"
    assert export_to(FUSION_SAMPLE, out, "--format", "both") == 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["model_type"] == "TinyFusionDetector"  # registered by the config's custom_imports module
    names = [i["name"] for i in metadata["manifest"]["inputs"]]
    assert names == ["voxels_num_points", "voxels_voxels", "voxels_coors", "imgs", "lidar2img"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["runtime"] for c in parity["checks"]} == {"pt2", "onnxruntime"}
    # Both camera inputs reach the outputs: another calibration or a blank image changes the class scores.
    feed = dict(np.load(out / "inputs" / "sample_0.npz"))
    ort_model = ort.InferenceSession(str(out / "model.onnx"))
    base = ort_model.run(None, feed)[0]
    moved = feed["lidar2img"].copy()
    moved[0] += 40.0 * moved[2]
    assert np.abs(ort_model.run(None, {**feed, "lidar2img": moved})[0] - base).max() > 1e-2
    assert np.abs(ort_model.run(None, {**feed, "imgs": np.zeros_like(feed["imgs"])})[0] - base).max() > 1e-2


def test_missing_custom_import_and_bad_module_arguments_exit_2(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing_import.py"
    missing.write_text(f"_base_ = [{FUSION_SAMPLE!r}]\n"
                       "custom_imports = dict(imports=['no_such_project.models'], allow_failed_imports=False)\n")
    assert export_to(str(missing), tmp_path / "a") == 2
    assert "no_such_project" in caplog.text
    caplog.clear()
    # A config inheriting the fusion sample from elsewhere: its custom module is found through PYTHONPATH.
    monkeypatch.syspath_prepend(str(Path(FUSION_SAMPLE).parent))
    bad = tmp_path / "bad_backbone.py"
    bad.write_text(f"_base_ = [{FUSION_SAMPLE!r}]\nmodel = dict(img_backbone=dict(strides=(1, 2, 2)))\n")
    assert export_to(str(bad), tmp_path / "b") == 2
    assert "could not be built" in caplog.text and "resnet.py" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


IMVOTENET = "imvotenet_stage2_8xb16_sunrgbd-3d"


def test_sunrgbd_samples_project_depth_points_with_depth2img(tmp_path: Path) -> None:
    """SUN RGB-D's parser reads depth2img of its default camera; the rig looks along the depth frame's +y."""
    spec = _sample_spec(load_config(resolve_config(IMVOTENET)), tmp_path)
    sources = spec.synthesize(tmp_path, seed=0)
    info = sources[0].info
    depth2img = np.asarray(info["depth2img"])
    # 3x3 as mmdet3d's SUN RGB-D converter writes it (K @ Rt) and VoteFusion reads it.
    assert depth2img.shape == (3, 3)
    np.testing.assert_allclose(depth2img, (np.asarray(info["images"]["CAM0"]["cam2img"])
                                           @ np.asarray(info["images"]["CAM0"]["lidar2cam"]))[:3, :3], rtol=1e-6)
    # A point 3 m straight ahead of the camera lands on the principal point; one 1 m to the right, right of it.
    ahead = depth2img @ np.array([0.0, 3.0, 0.0])
    right = depth2img @ np.array([1.0, 3.0, 0.0])
    np.testing.assert_allclose(ahead[:2] / ahead[2], (365.0, 265.0), atol=1e-6)
    assert right[0] / right[2] > 365.0 + 100
    image = mmcv.imread(info["img_path"])
    assert image.shape == (530, 730, 3) and image.std() > 20
    assert sources[0].num_points == 14000 and Path(info["lidar_points"]["lidar_path"]).is_file()


def test_detector_whose_train_returns_none_is_built_and_initialised() -> None:
    """ImVoteNet.train() returns None, so `model.eval()` is None: the build must not chain it (its split export
    is checked in tests/test_imvotenet.py)."""
    from autoexport.analyze import build_model, init_random_weights

    model = build_model(load_config(resolve_config(IMVOTENET)), "cpu", seed=0)
    assert type(model).__name__ == "ImVoteNet" and not model.training
    assert not model._is_init
    init_random_weights(model)  # raised AttributeError on None before
    assert model._is_init


def test_monoflex_sample_config_exports_its_head_with_the_image_metas(tmp_path: Path) -> None:
    """MonoFlexHead.forward takes the image metas, which mmdet3d's detectors never pass, and its init_weights fails;
    the sample config (SMOKE's DLA-34 + DLANeck with MonoFlexHead) exports with parity all the same."""
    out = tmp_path / "monoflex"
    assert export_to(MONOFLEX_SAMPLE, out, "--format", "both") == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model_type"] == "SingleStageMono3DDetector" and meta["tensor_boundary"] == "mono3d_forward"
    assert meta["init_weights_failed"] == ["bbox_head (MonoFlexHead) raised AttributeError: 'MonoFlexHead' object "
                                           "has no attribute 'cls_convs'"]
    # KITTI's AffineResize gives 1280 x 384 images; the head's outputs are at a quarter of that.
    assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [("cls_score_0", [1, 3, 96, 320]),
                                                                  ("bbox_pred_0", [1, 50, 96, 320])]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["runtime"] for c in parity["checks"]} == {"pt2", "onnxruntime"}
    assert all(c["passed"] and c["max_abs"] <= 1e-4 for c in parity["checks"])
    assert max(c["max_abs"] for c in parity["checks"] if c["runtime"] == "pt2") == 0.0
    # The edge fusion, the part that reads the metas, is in the graph: a GridSample along the image border and a
    # scatter back onto it, for the heatmap and for the 2D offsets.
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("GridSample") == 2 and ops.count("ScatterND") == 2


def test_a_module_whose_init_weights_raises_has_its_children_initialised() -> None:
    """mmdet3d 1.4's MonoFlexHead.init_weights reads layers it never builds (AttributeError): random weights then
    come from its sub-modules' own init_weights, and the failure is reported, not raised."""
    from mmengine.model import BaseModule

    from autoexport.analyze import init_random_weights

    class Branch(BaseModule):
        def __init__(self) -> None:
            super().__init__(init_cfg=dict(type="Constant", layer="Conv2d", val=0.25, bias=0.5))
            self.conv = torch.nn.Conv2d(8, 8, 3)

    class BrokenHead(BaseModule):
        def __init__(self) -> None:
            super().__init__()
            self.branch = Branch()

        def init_weights(self) -> None:
            raise AttributeError("'BrokenHead' object has no attribute 'cls_convs'")

    class Detector(BaseModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = Branch()
            self.head = BrokenHead()

    model = Detector()
    assert not torch.all(model.head.branch.conv.bias == 0.5)  # PyTorch's default init until init_weights
    failed = init_random_weights(model)
    # Only the module at fault is named (the detector failed through it).
    assert failed == ["head (BrokenHead) raised AttributeError: 'BrokenHead' object has no attribute 'cls_convs'"]
    # mmengine's per-parameter bookkeeping is gone, as after a call that returns (torch.export chokes on it).
    assert not any(hasattr(m, "_params_init_info") for m in model.modules())
    # The branch's own init_cfg ran inside the broken head, and in the backbone.
    for branch in (model.head.branch, model.backbone):
        assert torch.all(branch.conv.weight == 0.25) and torch.all(branch.conv.bias == 0.5)


def test_image_only_pipeline_on_a_lidar_dataset_gets_the_cloud_its_parser_reads(tmp_path: Path) -> None:
    """ImVoteNet's image-only stage loads images only, but SUN RGB-D's modality uses lidar, so its parser reads
    lidar_points (was a KeyError crash)."""
    spec = _sample_spec(load_config(resolve_config("imvotenet_faster-rcnn-r50_fpn_4xb2_sunrgbd-3d")), tmp_path)
    assert spec.cameras is not None and not spec.cameras.use_lidar
    sources = spec.synthesize(tmp_path, seed=0)
    info = sources[0].info
    assert Path(info["lidar_points"]["lidar_path"]).is_file() and Path(info["img_path"]).is_file()
    assert [f.suffix for f in sources[0].files] == [".jpg"] and sources[0].num_points == 0
