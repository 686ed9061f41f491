"""--precision int8 / fp16 end to end on real models: PointPillars KITTI and CenterPoint pillar.

Random weights are no stand-in for INT8 behaviour (PointPillars' bbox_pred loses cosine 0.96 with them), so the
INT8 tests first train each model for a few steps on synthetic scenes (benchmarks/train_synthetic.py, ~2-4 min)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import CENTERPOINT_PILLAR, KITTI_PP, export_to

REPO = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 40  # measured: PointPillars INT8 fidelity 0.9994 after 40 steps, 0.99978 after 300


def _train(config: str, out: Path) -> Path:
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_synthetic.py"), "--config", config,
                    "--steps", str(TRAIN_STEPS), "--out", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def pp_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("pp_int8")
    checkpoint = _train(KITTI_PP, work / "pp.pth")
    out = work / "export"
    assert export_to(KITTI_PP, out, "--checkpoint", str(checkpoint), "--precision", "int8", "--calib-samples", "8",
                     "--eval-samples", "20", "--backend", "iree") == 0
    return out


def _conv_quantization(path: Path) -> list[tuple[str, str, str, int, int]]:
    """(conv op, data producer, weight producer, weight axis, scale count) for every conv in the ONNX graph."""
    graph = onnx.load(str(path)).graph
    producers = {out: node for node in graph.node for out in node.output}
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    rows = []
    for conv in (n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")):
        data, weight = producers.get(conv.input[0]), producers.get(conv.input[1])
        axis = next((a.i for a in weight.attribute if a.name == "axis"), 1) if weight is not None else -1
        scales = constants.get(weight.input[1]) if weight is not None else None
        rows.append((conv.op_type, data.op_type if data is not None else "input",
                     weight.op_type if weight is not None else "initializer", axis,
                     int(np.size(scales)) if scales is not None else 0))
    return rows


def test_int8_onnx_has_qdq_on_every_conv_input_and_weight(pp_int8: Path) -> None:
    rows = _conv_quantization(pp_int8 / "model.onnx")
    assert len(rows) == 22  # 16 backbone convs, 3 deblocks, 3 head convs
    for op, data, weight, axis, scales in rows:
        assert (data, weight) == ("DequantizeLinear", "DequantizeLinear"), (op, data, weight)
        assert axis == (1 if op == "ConvTranspose" else 0) and scales > 1  # per output channel
    graph = onnx.load(str(pp_int8 / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 22 and "Clip" not in ops
    # The pillar encoder's linear layer stays float (FLOAT_BY_DEFAULT: metric coordinates).
    producers = {out: node for node in graph.node for out in node.output}
    matmul = next(n for n in graph.node if n.op_type == "MatMul")
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in matmul.input)


def test_int8_pt2_holds_quantize_dequantize_ops_with_constant_scales(pp_int8: Path) -> None:
    program = torch.export.load(str(pp_int8 / "model.pt2"))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("quantized_decomposed.quantize_per_tensor.default") >= 22
    assert targets.count("quantized_decomposed.dequantize_per_channel.default") == 22
    per_tensor = [n for n in program.graph.nodes if str(n.target) == "quantized_decomposed.quantize_per_tensor.default"]
    assert all(isinstance(n.args[1], float) and n.args[1] > 0 for n in per_tensor)  # scale: a constant


def test_int8_fidelity_report_and_detection_agreement(pp_int8: Path) -> None:
    report = json.loads((pp_int8 / "quant_report.json").read_text())
    assert report["passed"] and report["precision"] == "int8" and report["candidate"] == "onnxruntime"
    assert report["held_out_samples"] == 20 and len(set(report["sample_names"])) == 20
    for output in report["outputs"]:
        assert output["min_cosine"] >= 0.99, output
    agreement = report["detection_agreement"]
    assert agreement["samples"] == 20 and agreement["iou_threshold"] == 0.5
    assert agreement["score_threshold"] == 0.1  # the model's own test_cfg
    assert len(agreement["per_sample"]) == 20
    # ONNX Runtime really runs integer convolutions (its optimized graph), not dequantized float ones.
    assert report["onnxruntime_kernels"].get("QLinearConv", 0) >= 14
    quantization = report["quantization"]
    assert len(quantization["folded_batchnorms"]) == 20
    assert list(quantization["float_layers"]) == ["voxel_encoder.pfn_layers.0.linear"]
    head = next(g for g in quantization["shared_input_quantizers"] if "bbox_head.conv_cls" in g["layers"])
    assert head["concat"] and set(head["layers"]) == {"bbox_head.conv_cls", "bbox_head.conv_reg",
                                                      "bbox_head.conv_dir_cls"}
    assert (pp_int8 / "quant_report.md").read_text().count("| cls_score_0 |") == 1
    metadata = json.loads((pp_int8 / "metadata.json").read_text())
    assert metadata["precision"] == "int8" and metadata["fidelity"]["passed"]


def test_int8_parity_of_every_artifact_against_the_quantized_model(pp_int8: Path) -> None:
    parity = json.loads((pp_int8 / "parity.json").read_text())
    assert parity["passed"]
    runtimes = {c["runtime"] for c in parity["checks"]}
    assert runtimes == {"pt2", "onnxruntime", "iree-llvm-cpu"}
    assert all(c["precision"] == "int8" for c in parity["checks"])
    from autoexport.cli import main

    assert main(["verify", str(pp_int8), "--backend", "onnxruntime"]) == 0


@pytest.mark.xfail(strict=True, reason=(
    "CenterPoint INT8 misses cosine 0.99 with the weights this machine can make: after 40 (or 100) synthetic "
    "training steps its outputs reach |60| and ONNX Runtime's Q/DQ arithmetic drifts from torch's by up to 5 "
    "(min cosine 0.97-0.98); a trained nuScenes checkpoint is needed to tell the model from the recipe"))
def test_int8_centerpoint(tmp_path: Path) -> None:
    checkpoint = _train(CENTERPOINT_PILLAR, tmp_path / "cp.pth")
    out = tmp_path / "export"
    assert export_to(CENTERPOINT_PILLAR, out, "--checkpoint", str(checkpoint), "--precision", "int8",
                     "--calib-samples", "4", "--eval-samples", "20", "--format", "onnx") == 0
    report = json.loads((out / "quant_report.json").read_text())
    assert report["passed"] and len(report["outputs"]) == 36 and report["held_out_samples"] == 20
    assert min(o["min_cosine"] for o in report["outputs"]) >= 0.99
    assert report["detection_agreement"]["decoder"] == "CenterHead.predict_by_feat"
    assert report["onnxruntime_kernels"].get("QLinearConv", 0) > 0
    rows = _conv_quantization(out / "model.onnx")
    assert all((data, weight) == ("DequantizeLinear", "DequantizeLinear") for _, data, weight, _, _ in rows)
    # One input quantizer for the 36 task-head convs that all read shared_conv's output.
    shared = report["quantization"]["shared_input_quantizers"]
    assert max(len(g["layers"]) for g in shared) == 36


def test_fp16_export_keeps_fp32_io_and_matches_fp32(tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    # FP16 on this CPU is slow (~30 s per PointPillars forward): PT2 only, one held-out sample.
    assert export_to(KITTI_PP, out, "--precision", "fp16", "--format", "pt2", "--eval-samples", "1") == 0
    program = torch.export.load(str(out / "model.pt2"))
    convs = [n for n in program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert convs and all(n.meta["val"].dtype == torch.float16 for n in convs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name.startswith("voxels")]
    assert {n.meta["val"].dtype for n in placeholders} <= {torch.float32, torch.int32}
    outputs = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    assert all(o.meta["val"].dtype == torch.float32 for o in outputs)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["precision"] for c in parity["checks"]} == {"fp16"}
    assert max(c["max_abs"] for c in parity["checks"]) > 1e-4  # really FP16: not the FP32 graph
    report = json.loads((out / "quant_report.json").read_text())
    assert report["precision"] == "fp16" and report["fp16"]["fp16_sections"] == ["backbone", "neck", "bbox_head"]
    assert min(o["min_cosine"] for o in report["outputs"]) >= 0.999
