"""Device-portable exports and the Inductor backend, on the bundled PointPillars sample config: the saved model.pt2
names no device in any node (it runs on CUDA after move_to_device_pass and compiles with Inductor), ONNX keeps its
parity, and inductor:cpu (torch.compile of model.pt2) matches eager within the fp32 rule."""

import json
from pathlib import Path

import pytest
import torch

from autoexport.portable import device_pinned_nodes, make_device_portable
from conftest import export_to

SAMPLE_PP = str(Path(__file__).resolve().parents[1] / "sample_configs" / "pointpillars_kitti_3class.py")
FP32_LIMIT = 1e-4


@pytest.fixture(scope="module")
def sample_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("portable") / "pp"
    assert export_to(SAMPLE_PP, out, "--format", "both", "--backend", "inductor") == 0
    return out


def test_saved_graph_pins_no_device(sample_export: Path):
    program = torch.export.load(str(sample_export / "model.pt2"))
    assert [n.format_node() for n in device_pinned_nodes(program)] == []
    targets = {n.target for n in program.graph.nodes}
    assert torch.ops.aten._assert_tensor_metadata.default not in targets
    # The pillar encoder's arange(32) padding mask, folded into a lifted constant that moves with the weights.
    constants = list(program.constants.values())
    assert len(constants) == 1 and torch.equal(constants[0], torch.arange(32, dtype=torch.int32))


def test_pt2_and_onnx_keep_their_parity(sample_export: Path):
    parity = json.loads((sample_export / "parity.json").read_text())
    assert parity["passed"]
    for runtime in ("pt2", "onnxruntime"):
        checks = [c for c in parity["checks"] if c["runtime"] == runtime]
        assert len(checks) == 9 and all(c["passed"] and c["max_abs"] < FP32_LIMIT for c in checks), runtime
    # The pass deletes checks and folds a constant: the graph computes exactly what eager does.
    assert max(c["max_abs"] for c in parity["checks"] if c["runtime"] == "pt2") == 0


def test_inductor_cpu_matches_eager_within_the_fp32_rule(sample_export: Path):
    parity = json.loads((sample_export / "parity.json").read_text())
    checks = [c for c in parity["checks"] if c["runtime"] == "inductor-cpu"]
    assert len(checks) == 9 and {c["sample"] for c in checks} == {"sample_0", "sample_1", "heldout_0"}
    assert all(c["passed"] and c["mismatched"] == 0 and c["max_abs"] < FP32_LIMIT for c in checks)
    # Compiled kernels reorder sums: a zero everywhere would mean the uncompiled graph ran.
    assert max(c["max_abs"] for c in checks) > 0
    artifact = next(a for a in json.loads((sample_export / "metadata.json").read_text())["backends"]
                    if a["backend"] == "inductor-cpu")
    assert artifact["path"] == "model.pt2" and artifact["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what verify says on a machine without CUDA")
def test_verify_inductor_cuda_needs_only_model_pt2(sample_export: Path, tmp_path: Path):
    from autoexport.cli import main

    # No inductor-cuda entry in metadata.json: verify makes it from model.pt2, and here it cannot run, which is
    # not a pass.
    assert main(["verify", str(sample_export), "--backend", "inductor:cuda", "--report-dir", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["checks"] == [] and [s["runtime"] for s in report["skipped"]] == ["inductor-cuda"]
    assert "no CUDA device" in report["skipped"][0]["reason"]


class _Casts(torch.nn.Module):
    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(8, dtype=torch.int32, device=x.device)[None, :] < n[:, None].to(torch.int32)
        return x * mask.to(x.dtype)


def test_the_pass_removes_what_tracing_on_cpu_pins():
    x, n = torch.randn(5, 8), torch.tensor([0, 3, 8, 1, 5])
    program = torch.export.export(_Casts(), (x, n), dynamic_shapes=({0: torch.export.Dim("rows")},
                                                                      {0: torch.export.Dim("rows")}))
    pinned = {str(node.target) for node in device_pinned_nodes(program)}
    assert pinned == {"aten.arange.default", "aten._assert_tensor_metadata.default"}
    expected = program.module()(x, n)
    program = make_device_portable(program)
    assert device_pinned_nodes(program) == []
    assert torch.equal(program.module()(x, n), expected)
    x2, n2 = torch.randn(9, 8), torch.randint(0, 9, (9,))
    assert torch.equal(program.module()(x2, n2), _Casts()(x2, n2))


def test_a_factory_tensor_written_in_place_stays_a_computation():
    """A canvas made with zeros() and filled in place (BEVFusion's sparse encoder does so) cannot become a lifted
    constant: torch.onnx refuses a mutated constant. The pass leaves it, and the program still computes the same."""

    class Scatter(torch.nn.Module):
        def forward(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            canvas = torch.zeros(8)
            canvas[index] = values
            return canvas * 2

    values, index = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 5, 7])
    program = make_device_portable(torch.export.export(Scatter(), (values, index)))
    factories = [n for n in program.graph.nodes if n.op == "call_function" and "zeros" in str(n.target)]
    assert len(factories) == 1
    expected = torch.tensor([2.0, 0, 0, 0, 0, 4.0, 0, 6.0])
    assert torch.equal(program.module()(values, index), expected)
