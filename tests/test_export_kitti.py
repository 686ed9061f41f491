"""End to end on PointPillars KITTI 3-class: the issue's main job, checked the way a user would."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

TOL_ATOL = TOL_RTOL = 1e-4


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _input_names(export: Path) -> list[str]:
    meta = json.loads((export / "metadata.json").read_text())
    return [t["name"] for t in meta["export_info"]["tensor_details"]]


def test_output_directory_layout(kitti_export: Path):
    names = {p.name for p in kitti_export.iterdir()}
    assert {"model.pt2", "model.onnx", "wrapper.py", "metadata.json", "parity.json", "inputs", "reference"} <= names
    assert not list(kitti_export.parent.glob(".*partial*")), "staging directory left behind"


def test_metadata_lists_every_flat_input_with_dynamic_dims(kitti_export: Path):
    meta = json.loads((kitti_export / "metadata.json").read_text())
    assert meta["model_type"] == "VoxelNet" and meta["status"] == "ok"
    info = meta["export_info"]
    details = {t["path"]: t for t in info["tensor_details"]}
    assert info["total_inputs"] == len(details) == 3
    assert set(details) == {"inputs.voxels.voxels", "inputs.voxels.num_points", "inputs.voxels.coors"}
    for tensor in details.values():
        assert tensor["dynamic_dims"]["0"]["name"] == "num_voxels", tensor
        observed = tensor["dynamic_dims"]["0"]["observed"]
        assert len(set(observed)) == 2, "two export samples of different size"
        assert tensor["description"]
    assert details["inputs.voxels.voxels"]["shape"][1:] == [32, 4]
    assert details["inputs.voxels.voxels"]["mutated_by_model"] is True, "PillarFeatureNet legacy mode writes in place"
    assert set(info["unused_inputs"]) >= {"inputs.points.0"}
    outputs = [o["name"] for o in meta["outputs"]]
    assert outputs == ["cls_score_0", "bbox_pred_0", "dir_cls_pred_0"]
    assert meta["outputs"][0]["shape"] == [1, 18, 248, 216]
    assert {p["target"] for p in meta["export_patches"]} == {"PointPillarsScatter", "VoxelNet", "PillarFeatureNet"}
    assert meta["preprocess"]["data_preprocessor"]["voxel_layer"]["max_num_points"] == 32
    assert meta["postprocess"]["head_types"] == ["Anchor3DHead"]
    assert meta["versions"]["torch"].startswith("2.")
    assert meta["torch_threads"] == torch.get_num_threads()
    roles = [s["role"] for s in meta["samples"]]
    assert roles.count("export") == 2 and roles.count("heldout") >= 1


def test_parity_json_covers_every_output_runtime_and_sample(kitti_export: Path):
    parity = json.loads((kitti_export / "parity.json").read_text())
    assert parity["passed"] is True
    checks = parity["checks"]
    # The session fixture also lowers to IREE (llvm-cpu) and AOTInductor (cpu); IREE cuda is compiled, not run.
    assert {c["runtime"] for c in checks} == {"pt2", "onnxruntime", "iree-llvm-cpu", "aoti-cpu"}
    assert {c["sample"] for c in checks} == {"sample_0", "sample_1", "heldout_0"}
    assert len(checks) == 4 * 3 * 3
    for check in checks:
        assert check["passed"] and check["mismatched"] == 0
        assert check["cosine"] > 0.999999 and check["max_abs"] <= 1e-3


def test_pt2_on_stored_inputs_matches_onnxruntime(kitti_export: Path):
    """The issue's check, done independently of autoexport's own runners."""
    program = torch.export.load(str(kitti_export / "model.pt2"))
    session = ort.InferenceSession(str(kitti_export / "model.onnx"), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    for sample in ("sample_0", "heldout_0"):
        feed = _load_npz(kitti_export / "inputs" / f"{sample}.npz")
        pt2 = program.module()(*[torch.from_numpy(feed[n].copy()) for n in input_names])
        ort_out = session.run(output_names, feed)
        for name, a, b in zip(output_names, pt2, ort_out):
            np.testing.assert_allclose(a.numpy(), b, atol=TOL_ATOL, rtol=TOL_RTOL, err_msg=name)
        # Held-out inputs are larger than anything the export traced with: the dims really are dynamic.
    sizes = [_load_npz(kitti_export / "inputs" / f"{s}.npz")["voxels_voxels"].shape[0]
             for s in ("sample_0", "sample_1", "heldout_0")]
    assert len(set(sizes)) == 3


def test_pt2_is_pure_even_though_the_model_mutates_its_input(kitti_export: Path):
    program = torch.export.load(str(kitti_export / "model.pt2")).module()
    feed = _load_npz(kitti_export / "inputs" / "sample_0.npz")
    names = _input_names(kitti_export)
    args = [torch.from_numpy(feed[n].copy()) for n in names]
    first = program(*args)
    second = program(*args)  # the same tensors again
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    np.testing.assert_array_equal(args[names.index("voxels_voxels")].numpy(), feed["voxels_voxels"])


def test_onnx_graph_has_named_dynamic_inputs(kitti_export: Path):
    model = onnx.load(str(kitti_export / "model.onnx"))
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == _input_names(kitti_export)
    assert set(inputs) == {"voxels_voxels", "voxels_num_points", "voxels_coors"}
    first_dim = inputs["voxels_voxels"].type.tensor_type.shape.dim[0]
    assert first_dim.dim_param and not first_dim.dim_value
    assert [o.name for o in model.graph.output] == ["cls_score_0", "bbox_pred_0", "dir_cls_pred_0"]


def test_wrapper_is_readable_and_importable(kitti_export: Path):
    source = (kitti_export / "wrapper.py").read_text()
    signature = ", ".join(f"{n}: Tensor" for n in _input_names(kitti_export))
    assert f"def forward(self, {signature})" in source
    assert "voxels_voxels = voxels_voxels.clone()" in source
    compile(source, "wrapper.py", "exec")


def test_reference_outputs_are_reproduced_by_the_generated_wrapper(kitti_export: Path):
    """Eager reference = the generated wrapper around the original model; rebuild it from the files on disk."""
    from autoexport.analyze import build_model, load_config
    from autoexport.configs import resolve_config
    from autoexport.wrap import build_wrapper

    meta = json.loads((kitti_export / "metadata.json").read_text())
    model = build_model(load_config(resolve_config(meta["model_config"])), "cpu", 0)
    # The exported weights (random init + calibrated BatchNorm statistics) are in model.pt2's state dict.
    state = torch.export.load(str(kitti_export / "model.pt2")).state_dict
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=True)
    wrapper = build_wrapper(kitti_export / "wrapper.py", model)
    feed = _load_npz(kitti_export / "inputs" / "sample_1.npz")
    expected = _load_npz(kitti_export / "reference" / "sample_1.npz")
    with torch.no_grad():
        outputs = wrapper(*[torch.from_numpy(feed[n].copy()) for n in _input_names(kitti_export)])
    for name, value in zip(["cls_score_0", "bbox_pred_0", "dir_cls_pred_0"], outputs):
        np.testing.assert_array_equal(value.numpy(), expected[name])


def test_verify_passes_then_fails_on_a_perturbed_onnx(kitti_export: Path, tmp_path: Path):
    import shutil

    from autoexport.cli import main

    assert main(["verify", str(kitti_export)]) == 0
    copy = tmp_path / "perturbed"
    shutil.copytree(kitti_export, copy)
    model = onnx.load(str(copy / "model.onnx"))
    from onnx import numpy_helper

    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(biggest).copy()
    weights.flat[: weights.size // 10] += 0.05
    biggest.CopyFrom(numpy_helper.from_array(weights, biggest.name))
    onnx.save(model, str(copy / "model.onnx"))
    assert main(["verify", str(copy)]) == 1


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "autoexport", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--config" in result.stdout and "exit codes" in result.stdout


def test_random_weight_outputs_carry_signal(kitti_export: Path):
    """Parity on near-constant outputs would prove nothing: outputs must vary with the input far beyond the tolerance."""
    ref0 = _load_npz(kitti_export / "reference" / "sample_0.npz")
    ref1 = _load_npz(kitti_export / "reference" / "sample_1.npz")
    for name in ref0:
        spatial = ref0[name] - ref0[name].mean(axis=(2, 3), keepdims=True)
        assert spatial.std() > 1e-2, f"{name}: outputs are almost constant over the BEV grid"
        assert np.abs(ref0[name] - ref1[name]).max() > 100 * TOL_ATOL, f"{name}: outputs ignore the input"
