"""The TensorRT backend. TensorRT cannot be installed on this project's machines, so only the pure-Python parts run
here; the build+parity test runs wherever TensorRT and a GPU are present."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from autoexport.backends import BACKENDS, BackendSpec, LoweringSource, parse_backend
from autoexport.backends.tensorrt import _onnx_quantized_and_fp16, profile_shapes
from autoexport.errors import UserInputError
from autoexport.manifest import DynamicDim, Manifest, OutputSpec, TensorSpec

TENSORRT_AVAILABLE = importlib.util.find_spec("tensorrt") is not None


def voxel_manifest() -> Manifest:
    """Two inputs sharing num_voxels (no declared max), one with a declared max, one static."""
    return Manifest(
        inputs=[
            TensorSpec("voxels", "inputs.voxels.voxels", [18748, 32, 4], "float32", {0: "num_voxels"}),
            TensorSpec("coors", "inputs.voxels.coors", [18748, 4], "int32", {0: "num_voxels"}),
            TensorSpec("points", "inputs.points.0", [20000, 4], "float32", {0: "num_points"}),
            TensorSpec("calib", "inputs.calib", [4, 4], "float32"),
        ],
        outputs=[OutputSpec("scores", [0], [1, 10], "float32")],
        dims={"num_voxels": DynamicDim("num_voxels", observed=[18748, 17001], min=2),
              "num_points": DynamicDim("num_points", observed=[20000, 19000], min=0, max=30000)},
        structure={},
    )


def test_profile_shapes_from_manifest() -> None:
    shapes = profile_shapes(voxel_manifest())
    # 4 x 18748 = 74992, rounded up to a multiple of 64.
    assert shapes["voxels"] == ((2, 32, 4), (18748, 32, 4), (75008, 32, 4))
    assert shapes["coors"] == ((2, 4), (18748, 4), (75008, 4))
    # A declared max wins; a min below 1 is raised to 1.
    assert shapes["points"] == ((1, 4), (20000, 4), (30000, 4))
    assert "calib" not in shapes


def test_parse_tensorrt_targets() -> None:
    assert parse_backend("tensorrt:fp16") == BackendSpec("tensorrt", "fp16")
    assert parse_backend("tensorrt").target == "fp32"
    with pytest.raises(UserInputError):
        parse_backend("tensorrt:bf16")


@pytest.mark.skipif(TENSORRT_AVAILABLE, reason="TensorRT is installed here")
def test_missing_dependency_says_how_to_install() -> None:
    message = BACKENDS["tensorrt"].missing_dependency(parse_backend("tensorrt"))
    assert message and "not installed" in message
    assert "pip install tensorrt-cu12" in message and "iree" in message


def conv_onnx(path: Path, dtype: int = TensorProto.FLOAT, quantized: bool = False) -> Path:
    """A one-conv ONNX built by hand: enough for lower()'s checks, instant to make."""
    weight = helper.make_tensor("w", dtype, [4, 3, 3, 3], np.zeros(108).tolist())
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    if quantized:
        scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
        nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s"], ["xq"]),
                 helper.make_node("Conv", ["xq", "w"], ["y"], pads=[1, 1, 1, 1])]
        initializers = [weight, scale]
    else:
        initializers = [weight]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", dtype, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", dtype, ["batch", 4, 8, 8])], initializers)
    onnx.save(helper.make_model(graph), str(path))
    return path


def conv_manifest() -> Manifest:
    return Manifest(inputs=[TensorSpec("x", "inputs.x", [2, 3, 8, 8], "float32", {0: "batch"})],
                    outputs=[OutputSpec("y", [0], [2, 4, 8, 8], "float32", {0: "batch"})],
                    dims={"batch": DynamicDim("batch", observed=[1, 2], min=1, max=4)}, structure={})


def source_for(staging: Path, onnx_path: Path | None) -> LoweringSource:
    # lower() reads only the ONNX; the program and variant exporter are not needed for these checks.
    return LoweringSource(staging=staging, manifest=conv_manifest(), program=None, onnx_path=onnx_path,
                          padding=None, export_variant=lambda *_: Path())


def test_onnx_precision_checks(tmp_path: Path) -> None:
    assert _onnx_quantized_and_fp16(conv_onnx(tmp_path / "fp32.onnx")) == (False, False)
    assert _onnx_quantized_and_fp16(conv_onnx(tmp_path / "fp16.onnx", TensorProto.FLOAT16)) == (False, True)
    assert _onnx_quantized_and_fp16(conv_onnx(tmp_path / "qdq.onnx", quantized=True)) == (True, False)


@pytest.fixture
def fake_trt11(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in `tensorrt` module: lower() checks the ONNX against the version before touching the builder."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.0.0.114"))


@pytest.mark.skipif(TENSORRT_AVAILABLE, reason="uses a stand-in tensorrt module")
def test_lower_rejects_inputs_it_cannot_build(tmp_path: Path, fake_trt11: None) -> None:
    backend = BACKENDS["tensorrt"]
    fp32 = conv_onnx(tmp_path / "fp32.onnx")
    with pytest.raises(UserInputError, match="--format onnx"):
        backend.lower(parse_backend("tensorrt"), source_for(tmp_path, None))
    with pytest.raises(UserInputError, match="--precision int8"):
        backend.lower(parse_backend("tensorrt:int8"), source_for(tmp_path, fp32))
    with pytest.raises(UserInputError, match="strongly typed"):
        backend.lower(parse_backend("tensorrt:fp16"), source_for(tmp_path, fp32))


@pytest.mark.skipif(not TENSORRT_AVAILABLE or not torch.cuda.is_available(),
                    reason="TensorRT is not installable on this machine (see ../shared/ENVIRONMENT.md); "
                           "written against the documented API, untested here")
def test_engine_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3, padding=1)).eval()
    example = torch.randn(2, 3, 8, 8)
    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(model, (example,), str(onnx_path), dynamo=True, input_names=["x"], output_names=["y"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4)},))
    backend = BACKENDS["tensorrt"]
    spec = parse_backend("tensorrt:fp32")
    artifact = backend.lower(spec, source_for(tmp_path, onnx_path))
    assert (tmp_path / artifact.path).is_file()
    assert artifact.details["profiles"]["x"] == {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [4, 3, 8, 8]}
    runner = backend.runner(artifact, tmp_path, conv_manifest())
    for batch in (1, 3):  # the observed size and one the samples never had
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(runner.infer({"x": x.numpy()})["y"], expected, atol=1e-4, rtol=1e-4)
