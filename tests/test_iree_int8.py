"""INT8 graphs for IREE: activation Q/DQ pairs written as float arithmetic, bit for bit what ONNX's Q/DQ computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from autoexport.backends.iree import fake_quantize_activations

SCALE = 0.0625  # a power of two: (k + 0.5) * SCALE / SCALE is exactly a tie in fp32


def _qdq_model(zero_point_type: int = TensorProto.INT8) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(weight through its own Q/DQ) -> Q/DQ -> y: an activation pair on each side of a conv."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    zero = np.zeros((), np.int8 if zero_point_type == TensorProto.INT8 else np.uint8)
    inits = [numpy_helper.from_array(np.array(SCALE, np.float32), "s"), numpy_helper.from_array(zero, "zp"),
             numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "ws", "wzp"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "s", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _input() -> np.ndarray:
    """Values on rounding ties (k + 0.5 scales), beyond the int8 range, and ordinary ones."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, (1, 3, 8, 8)).astype(np.float32)
    x.flat[:40] = (np.arange(-20, 20) + 0.5).astype(np.float32) * np.float32(SCALE)
    x.flat[40:44] = [100.0, -100.0, 6.4, -6.45]
    return x


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as the spec says, no fusion
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def test_activation_pairs_become_float_arithmetic_with_identical_results() -> None:
    model, x = _qdq_model(), _input()
    expected = _run(model, x)
    assert fake_quantize_activations(model) == 2  # the weight pair (a constant input) stays Q/DQ
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("Clip") == 2
    onnx.checker.check_model(model)
    got = _run(model, x)
    assert np.array_equal(got, expected)
    assert len(np.unique(expected)) > 20  # many quantization levels: a real comparison


def test_ties_round_half_to_even() -> None:
    model, x = _qdq_model(), _input()
    fake_quantize_activations(model)
    identity = onnx.helper.make_graph([n for n in model.graph.node if n.output[0].startswith("autoexport_fq0")
                                       or n.op_type == "Mul" and n.input[0] == "autoexport_fq0_rounded"],
                                      "first_pair", model.graph.input,
                                      [helper.make_tensor_value_info("xd", TensorProto.FLOAT, [1, 3, 8, 8])],
                                      list(model.graph.initializer))
    got = _run(helper.make_model(identity, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), x).ravel()
    levels = np.round(got[:40] / np.float32(SCALE)).astype(int)
    assert np.array_equal(levels, np.round(np.arange(-20, 20) + 0.5).astype(int))  # numpy rounds half to even
    assert got[40] == np.float32(127) * np.float32(SCALE) and got[41] == np.float32(-128) * np.float32(SCALE)


def test_uint8_pairs_are_left_alone() -> None:
    model = _qdq_model(TensorProto.UINT8)
    assert fake_quantize_activations(model) == 0


def _iree_run(onnx_path: Path, x: np.ndarray, rewrite: bool) -> np.ndarray:
    import subprocess
    import sys

    import iree.runtime as rt

    from autoexport.backends.iree import LLVM_CPU_FLAGS, compile_vmfb, import_onnx

    mlir, vmfb = onnx_path.with_suffix(f".{rewrite}.mlir"), onnx_path.with_suffix(f".{rewrite}.vmfb")
    if rewrite:
        import_onnx(onnx_path, mlir)  # rewrites the pairs before importing
    else:
        subprocess.run([sys.executable, "-m", "iree.compiler.tools.import_onnx", str(onnx_path), "-o", str(mlir)],
                       check=True)
    compile_vmfb(mlir, vmfb, LLVM_CPU_FLAGS)
    config = rt.Config("local-task")
    context = rt.SystemContext(config=config)
    context.add_vm_module(rt.VmModule.mmap(config.vm_instance, str(vmfb)))
    return np.asarray(context.modules.module["main_graph"](x))  # the ONNX graph's name names the function


def test_iree_runs_the_rewritten_pairs_as_it_runs_q_dq(tmp_path: Path) -> None:
    """IREE must not fold (v + M) - M away: the rewritten graph gives IREE's own Q/DQ results bit for bit."""
    model, x = _qdq_model(), _input()
    onnx.save(model, str(tmp_path / "qdq.onnx"))
    rewritten, original = _iree_run(tmp_path / "qdq.onnx", x, True), _iree_run(tmp_path / "qdq.onnx", x, False)
    assert np.array_equal(rewritten, original)
    # Against ONNX Runtime, a conv sum that lands on a rounding boundary may round to the neighbouring level (the
    # two sum in different orders): measured 1 element of 256, one step apart, with and without the rewrite.
    steps = np.abs(rewritten - _run(model, x)) / SCALE
    assert steps.max() <= 1.0 + 1e-6 and (steps > 0).sum() <= 3
