"""Lowered backends on the PointPillars KITTI export (IREE llvm-cpu, IREE cuda compiled only, AOTInductor CPU):
parity, what metadata says the artifacts accept, padded inputs, the reports, `verify --backend` and bad flags."""

import importlib.util
import json
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

from autoexport.backends import BACKENDS, Backend, BackendSpec, LoweredArtifact, LoweringSource, parse_backend
from autoexport.backends.iree import IreeRunner
from autoexport.cli import main
from autoexport.errors import ExportFailedError, UserInputError
from autoexport.padding import PaddingPlan
from conftest import FUSION_SAMPLE, KITTI_PP


FP32_LIMIT = 1e-4  # the fp32 rule's atol: every lowered fp32 artifact must stay inside it


def _meta(out: Path) -> dict:
    return json.loads((out / "metadata.json").read_text())


def _artifact(out: Path, backend: str) -> LoweredArtifact:
    return next(LoweredArtifact.from_json(a) for a in _meta(out)["backends"] if a["backend"] == backend)


def test_iree_and_aoti_pass_fp32_parity_on_every_sample(kitti_export: Path):
    parity = json.loads((kitti_export / "parity.json").read_text())
    assert parity["passed"]
    for runtime in ("iree-llvm-cpu", "aoti-cpu"):
        checks = [c for c in parity["checks"] if c["runtime"] == runtime]
        # 3 outputs x (2 export samples + the held-out 28000-point cloud, larger than both)
        assert len(checks) == 9 and {c["sample"] for c in checks} == {"sample_0", "sample_1", "heldout_0"}
        assert all(c["passed"] and c["mismatched"] == 0 and c["max_abs"] < FP32_LIMIT for c in checks), runtime
        assert max(c["max_abs"] for c in checks) > 0, f"{runtime} compared against itself?"
    assert [s["runtime"] for s in parity["skipped"]] == ["iree-cuda"]
    assert "no CUDA device" in parity["skipped"][0]["reason"]
    held_out = next(s for s in _meta(kitti_export)["samples"] if s["name"] == "heldout_0")
    assert held_out["num_points"] > max(s["num_points"] for s in _meta(kitti_export)["samples"] if s["role"] == "export")


def test_metadata_records_what_each_artifact_accepts(kitti_export: Path):
    iree = _artifact(kitti_export, "iree-llvm-cpu")
    assert (kitti_export / iree.path).stat().st_size > 1e6
    shapes = {i["name"]: i["shape"] for i in iree.inputs}
    # The voxel layer's test max_voxels (40000) is the static capacity; the count says how many rows are real.
    assert shapes == {"voxels_num_points": [40000], "voxels_voxels": [40000, 32, 4], "voxels_coors": [40000, 4],
                      "num_voxels": []}
    assert iree.padding["count_input"] == "num_voxels" and iree.padding["fills"]["voxels_coors"] == [1, 0, 0, 0]
    assert "--iree-llvmcpu-target-cpu=host" in iree.details["flags"]
    cuda = _artifact(kitti_export, "iree-cuda")
    assert (kitti_export / cuda.path).is_file() and cuda.device == "cuda"
    assert cuda.details["compiled_arch"] in ("sm_90", "sm_80")
    aoti = _artifact(kitti_export, "aoti-cpu")
    assert {i["name"]: i["shape"][0] for i in aoti.inputs} == {n: None for n in ("voxels_num_points", "voxels_voxels",
                                                                                "voxels_coors")}, "dynamic"
    variants = _meta(kitti_export)["export_variants"]
    assert "ConvTranspose2d.forward" in variants["iree-padded40000"]["export_patches"]
    assert not list(kitti_export.glob(".model.*.onnx")) and not list(kitti_export.glob("iree/*.mlir")), "intermediates"


def test_rows_after_the_count_are_ignored_whatever_they_hold(kitti_export: Path):
    iree = _artifact(kitti_export, "iree-llvm-cpu")
    plan = iree.padding_plan
    meta = _meta(kitti_export)
    runner = IreeRunner(kitti_export / iree.path, "local-task", [i["name"] for i in iree.inputs],
                        [o["name"] for o in meta["outputs"]])
    feed = dict(np.load(kitti_export / "inputs" / "sample_0.npz"))
    expected = dict(np.load(kitti_export / "reference" / "sample_0.npz"))
    padded = plan.pad_feed(feed)
    count = int(padded["num_voxels"])
    rng = np.random.default_rng(0)
    # Garbage where a caller's buffer is stale: real-looking voxels on occupied cells, and zero point counts.
    padded["voxels_voxels"][count:] = rng.normal(size=padded["voxels_voxels"][count:].shape) * 50
    padded["voxels_coors"][count:] = feed["voxels_coors"][rng.integers(0, count, 40000 - count)]
    padded["voxels_num_points"][count:] = 0
    got = runner.infer(padded)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=1e-4, err_msg=name)


def test_padding_plan_refuses_more_rows_than_its_capacity():
    plan = PaddingPlan(dim="num_voxels", capacity=4, count_input="num_voxels", axes={"a": 0})
    padded = plan.pad_feed({"a": np.ones((3, 2), np.float32)})
    assert padded["a"].shape == (4, 2) and padded["num_voxels"].shape == () and int(padded["num_voxels"]) == 3
    with pytest.raises(ValueError, match="exceed this artifact's static capacity of 4"):
        plan.pad_feed({"a": np.ones((5, 2), np.float32)})


def test_parity_xml_is_junit_with_a_case_per_backend_and_output(kitti_export: Path):
    root = ElementTree.parse(kitti_export / "parity.xml").getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    runtimes = {"pt2", "onnxruntime", "iree-llvm-cpu", "aoti-cpu"}
    assert int(suite.get("tests")) == len(cases) == 3 * len(runtimes) + 1
    assert suite.get("failures") == "0" and suite.get("skipped") == "1"
    assert {c.get("classname").rsplit(".", 1)[1] for c in cases} == runtimes | {"iree-cuda"}
    assert not suite.findall("testcase/failure")
    assert suite.find("testcase/skipped").get("message").startswith("no CUDA device")
    md = (kitti_export / "parity.md").read_text()
    assert md.splitlines()[0].endswith(": PASSED")
    assert "| output | shape | backend | max abs | max rel | cosine | tolerance | verdict |" in md
    assert md.count("| iree-llvm-cpu |") == 3 and "fp32 | \\|a-b\\| <= 0.0001" in md


def test_verify_a_backend_and_write_reports(kitti_export: Path, tmp_path: Path):
    assert main(["verify", str(kitti_export), "--backend", "iree", "--report-dir", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "parity.json").read_text())
    assert {c["runtime"] for c in report["checks"]} == {"iree-llvm-cpu"} and report["passed"]
    root = ElementTree.parse(tmp_path / "r" / "parity.xml").getroot()
    assert int(root.find("testsuite").get("tests")) == 3
    # Stricter than the measured error: the same stored export now fails, and verify says so with exit 1.
    assert main(["verify", str(kitti_export), "--backend", "iree", "--atol", "1e-7", "--rtol", "0"]) == 1
    # Only a CUDA artifact here: nothing can run, which is not a pass.
    assert main(["verify", str(kitti_export), "--backend", "iree:cuda"]) == 1


@pytest.mark.parametrize("flags, message", [
    (["--backend", "mlir"], "unknown backend 'mlir'"),
    (["--backend", "iree:rocm"], "backend iree has no target 'rocm'"),
    (["--backend", "aoti:cuda"], "needs a GPU"),
    (["--backend", "inductor:cuda"], "this machine has no CUDA device"),
    (["--backend", "tensorrt"], "TensorRT"),
    (["--capacity", "lots", "--backend", "iree"], "--capacity must be auto, dynamic or a positive integer"),
])
def test_bad_backend_flags_exit_2_before_any_work(tmp_path: Path, caplog: pytest.LogCaptureFixture, flags, message):
    if "tensorrt" in flags and importlib.util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be checked")
    out = tmp_path / "out"
    assert main(["--config", KITTI_PP, "--output-dir", str(out), *flags]) == 2
    assert message in caplog.text
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_verify_rejects_a_backend_the_export_does_not_have(kitti_export: Path, caplog: pytest.LogCaptureFixture):
    assert main(["verify", str(kitti_export), "--backend", "tensorrt"]) == 2
    assert "has no tensorrt-fp32 artifact" in caplog.text


def test_backend_names():
    assert parse_backend("iree").name == "iree-llvm-cpu"
    assert str(parse_backend("iree:cuda:sm_80")) == "iree:cuda:sm_80"
    assert parse_backend("aoti").name == "aoti-cpu"
    with pytest.raises(UserInputError):
        parse_backend("aoti:cpu:sm_80")


class _CrashingCompiler(Backend):
    """A backend whose compiler dies on the model, as iree-compile did on ImVoxelNet (exit -11)."""

    kind, targets, default_target = "crashing", ("cpu",), "cpu"

    def lower(self, spec: BackendSpec, source: LoweringSource) -> LoweredArtifact:
        raise ExportFailedError("crashing-compile failed (exit -11): Stack dump: 0. Program arguments: ...")

    def runner(self, artifact: LoweredArtifact, output_dir: Path, manifest: object) -> None:
        raise AssertionError("never built, never run")


def test_a_backend_that_fails_to_build_does_not_hide_the_others_parity(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(BACKENDS, "crashing", _CrashingCompiler())
    out = tmp_path / "fusion"
    assert main(["--config", FUSION_SAMPLE, "--output-dir", str(out), "--format", "both", "--backend", "crashing"]) == 3
    assert not out.exists(), "a failed lowering must not leave a complete-looking output directory"
    failed = tmp_path / "fusion.failed"
    parity = json.loads((failed / "parity.json").read_text())
    # ONNX Runtime and PT2 were still checked, and pass; the backend that was not built is a failure of the report.
    assert {rt: s["passed"] for rt, s in parity["summary"].items()} == {"pt2": True, "onnxruntime": True}
    assert [s["runtime"] for s in parity["not_built"]] == ["crashing-cpu"] and not parity["passed"]
    assert _meta(failed)["parity"]["not_built"][0]["reason"].startswith("crashing-compile failed (exit -11)")
    suite = ElementTree.parse(failed / "parity.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1" and suite.find("testcase[@name='build']/failure") is not None
    assert "lowering failed: crashing-cpu: crashing-compile failed" in caplog.text
    assert "pt2 passed, onnxruntime passed" in caplog.text

    # The zoo reads the same run as: ONNX Runtime parity passed, the backend failed.
    from autoexport import zoo

    entry = zoo.ZooEntry("tiny_fusion_kitti", "fusion", "3D Object Detection", "KITTI", "tiny", "fusion", None)
    row = zoo.classify(entry, 3, "\n".join(caplog.messages), _meta(failed), ["crashing"], 1.0)
    assert (row.verdict, row.pt2, row.onnx, row.ort_parity, row.stage) == \
        ("export failed", "pass", "pass", "pass", "lower")
    assert zoo.meets_fp32_target(row) and row.reason.startswith("lowering failed: crashing-cpu")


class _FpnTopDown(torch.nn.Module):
    """mmdet's FPN top-down path in miniature (1x1 lateral convs, nearest 2x upsampling, adds): IREE 3.13's
    iree-compile segfaults on it with data tiling and channels-last convs together, as on ImVoxelNet's image neck
    (whose backtrace names MaterializeDeviceEncodingPass; this one prints none); either flag alone compiles."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lateral = torch.nn.ModuleList(torch.nn.Conv2d(c, 16, 1) for c in (8, 16, 32))

    def forward(self, fine, middle, coarse):
        top = self.lateral[2](coarse)
        middle = self.lateral[1](middle) + torch.nn.functional.interpolate(top, scale_factor=2, mode="nearest")
        return self.lateral[0](fine) + torch.nn.functional.interpolate(middle, scale_factor=2, mode="nearest")


FPN_INPUTS = ["fine", "middle", "coarse"]


@pytest.fixture(scope="module")
def fpn_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict, list, str]:
    """The FPN reproducer through import_onnx and the llvm-cpu compile: (vmfb, feed, expected, flags, note)."""
    from autoexport.backends.iree import IreeBackend, import_onnx

    directory = tmp_path_factory.mktemp("fpn")
    module = _FpnTopDown().eval()
    inputs = (torch.randn(1, 8, 24, 24), torch.randn(1, 16, 12, 12), torch.randn(1, 32, 6, 6))
    torch.onnx.export(module, inputs, dynamo=True, verbose=False).save(str(directory / "fpn.onnx"))
    import_onnx(directory / "fpn.onnx", directory / "fpn.mlir")
    flags, note = IreeBackend._compile_llvm_cpu(directory / "fpn.mlir", directory / "fpn.vmfb")
    with torch.no_grad():
        expected = {"out": module(*inputs).numpy()}
    return directory / "fpn.vmfb", dict(zip(FPN_INPUTS, (x.numpy() for x in inputs))), expected, flags, note


def test_iree_compiles_again_without_data_tiling_when_the_compiler_crashes(fpn_build):
    from autoexport.backends.iree import DATA_TILING_FLAG, LLVM_CPU_FLAGS, CompilerCrash, compile_vmfb

    vmfb, feed, expected, flags, note = fpn_build
    with pytest.raises(CompilerCrash, match=r"iree-compile crashed \(exit -11, SIGSEGV\)"):
        # the bug this works around is still there
        compile_vmfb(vmfb.with_suffix(".mlir"), vmfb.with_name("direct.vmfb"), LLVM_CPU_FLAGS)
    assert DATA_TILING_FLAG not in flags and set(flags) == set(LLVM_CPU_FLAGS) - {DATA_TILING_FLAG}
    assert note.startswith(f"compiled without {DATA_TILING_FLAG}: with it, iree-compile crashed")
    got = IreeRunner(vmfb, "local-task", FPN_INPUTS, ["out"], name="iree").infer(feed)["out"]
    np.testing.assert_allclose(got, expected["out"], rtol=1e-5, atol=FP32_LIMIT / 10)


def _fpn_iree_runner(vmfb: Path) -> IreeRunner:
    return IreeRunner(vmfb, "local-task", FPN_INPUTS, ["out"], name="iree-llvm-cpu")


def test_a_runtime_that_dies_in_its_subprocess_fails_its_checks_instead_of_autoexport(fpn_build):
    """IREE's runtime segfaulted on ImVoxelNet's module and took autoexport down with it; verification runs it in
    a child process, so the death (here a real SIGSEGV sent to that child) becomes failed checks with the reason."""
    import functools
    import os
    import signal

    from autoexport.backends.runner import RunnerCrashed, SubprocessRunner
    from autoexport.verify import Comparator, Tolerance

    vmfb, feed, expected, _, _ = fpn_build
    runner = SubprocessRunner(functools.partial(_fpn_iree_runner, vmfb), "iree-llvm-cpu", FPN_INPUTS, ["out"])
    np.testing.assert_allclose(runner.infer(feed)["out"], expected["out"], rtol=1e-5, atol=FP32_LIMIT / 10)
    assert runner._process.pid != os.getpid()

    feeds = {"sample_0": feed, "sample_1": feed}
    report = Comparator(Tolerance(atol=FP32_LIMIT, rtol=FP32_LIMIT)).compare(
        [runner], feeds, {"sample_0": expected, "sample_1": expected})
    assert report.passed and len(report.checks) == 2

    os.kill(runner._process.pid, signal.SIGSEGV)
    runner._process.join(timeout=10)
    report = Comparator(Tolerance(atol=FP32_LIMIT, rtol=FP32_LIMIT)).compare(
        [runner], feeds, {"sample_0": expected, "sample_1": expected})
    assert not report.passed and [c.sample for c in report.checks] == ["sample_0"]  # a dead runner runs no more
    assert "iree-llvm-cpu crashed" in report.checks[0].note and report.checks[0].max_abs == float("inf")
    with pytest.raises(RunnerCrashed, match="crashed on an earlier input"):
        runner.infer(feed)
    runner.close()

    # Waiting for an answer from a child that died: the signal is named.
    runner = SubprocessRunner(functools.partial(_fpn_iree_runner, vmfb), "iree-llvm-cpu", FPN_INPUTS, ["out"])
    os.kill(runner._process.pid, signal.SIGSEGV)
    with pytest.raises(RunnerCrashed, match=r"iree-llvm-cpu crashed while running \(SIGSEGV\)"):
        runner._receive("running")
    runner.close()


def test_a_compiler_crash_names_the_innermost_pass_of_its_backtrace():
    from autoexport.backends.iree import _crashed_pass

    backtrace = ("#13 0x7f mlir::iree_compiler::(anonymous namespace)::materializeFuncOpEncodings(...) "
                 "MaterializeEncoding.cpp:0\n#14 0x7f mlir::iree_compiler::(anonymous namespace)::"
                 "MaterializeDeviceEncodingPass::runOnOperation() MaterializeEncoding.cpp:0:0\n#25 0x7f mlir::"
                 "iree_compiler::IREE::HAL::(anonymous namespace)::ConfigureTargetExecutableVariantsPass::"
                 "runOnOperation() ConfigureExecutables.cpp:0:0\n")
    assert _crashed_pass(backtrace) == "MaterializeDeviceEncodingPass"
    assert _crashed_pass("Please report issues to https://github.com/iree-org/iree/issues") == ""


class _PointSample(torch.nn.Module):
    """mmdet3d's point_sample in miniature: image features sampled at projected points, some off the image."""

    def forward(self, features, grid):
        nearest = torch.nn.functional.grid_sample(features, grid, mode="nearest", padding_mode="zeros",
                                                  align_corners=True)
        bilinear = torch.nn.functional.grid_sample(features, grid, mode="bilinear", padding_mode="zeros",
                                                   align_corners=False)
        return nearest, bilinear


def _iree_outputs(module: torch.nn.Module, inputs: tuple, directory: Path, variant: str) -> list[np.ndarray]:
    from autoexport.backends.iree import IreeBackend, import_onnx
    from autoexport.export import export_onnx
    from autoexport.patches import substituted_functions

    with substituted_functions(variant) as used, torch.no_grad():
        program = torch.export.export(module, inputs, strict=False)
    assert [p.target for p in used] == (["torch.nn.functional.grid_sample"] if variant == "iree" else [])
    export_onnx(program, ["features", "grid"], ["nearest", "bilinear"], directory / f"{variant}.onnx")
    import_onnx(directory / f"{variant}.onnx", directory / f"{variant}.mlir")
    IreeBackend._compile_llvm_cpu(directory / f"{variant}.mlir", directory / f"{variant}.vmfb")
    runner = IreeRunner(directory / f"{variant}.vmfb", "local-task", ["features", "grid"], ["nearest", "bilinear"])
    outputs = runner.infer({"features": inputs[0].numpy(), "grid": inputs[1].numpy()})
    return [outputs["nearest"], outputs["bilinear"]]


def test_grid_sample_is_gathered_for_iree_whose_gridsample_reads_outside_the_map(tmp_path: Path):
    generator = torch.Generator().manual_seed(11)
    inputs = (torch.randn(1, 16, 12, 20, generator=generator),
              torch.rand(1, 1, 500, 2, generator=generator) * 2.8 - 1.4)  # ~30% of the points off the map
    with torch.no_grad():
        nearest, bilinear = (x.numpy() for x in _PointSample()(*inputs))
    assert (nearest == 0).all(axis=1).mean() > 0.2  # zeros padding is exercised

    # IREE's own GridSample gets the off-map points wrong (the bug the substitution works around).
    iree_nearest, _ = _iree_outputs(_PointSample(), inputs, tmp_path, "default")
    # What it reads off the map is whatever memory holds, NaN at times, for which `max() > 1e-3` was False: some
    # element differs by more than 1e-3 (a NaN counts).
    assert not np.allclose(iree_nearest, nearest, rtol=0, atol=1e-3)

    gathered_nearest, gathered_bilinear = _iree_outputs(_PointSample(), inputs, tmp_path, "iree")
    np.testing.assert_array_equal(gathered_nearest, nearest)
    np.testing.assert_allclose(gathered_bilinear, bilinear, rtol=1e-5, atol=1e-6)
