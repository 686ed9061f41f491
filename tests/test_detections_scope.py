"""--scope detections: the raw cloud in, boxes out, checked box by box against mmdet3d's own inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import export_to

KITTI_SCAN = Path("/work/shared/data/mmdet3d-demo/kitti/000008.bin")
KITTI_INFO = KITTI_SCAN.with_suffix(".pkl")  # mmdet3d's own info record of the scan
PP_SAMPLE = str(Path(__file__).resolve().parents[1] / "sample_configs" / "pointpillars_kitti_3class.py")


def _random_bev_boxes(count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(count, 2, generator=g) * 20, torch.rand(count, 2, generator=g) * 3 + 0.5,
                      (torch.rand(count, 1, generator=g) - 0.5) * 6.5], 1)


def test_rotated_iou_matches_mmcv() -> None:
    from mmcv.ops import box_iou_rotated

    from autoexport.ops.nms import rotated_iou_matrix

    boxes = _random_bev_boxes(200, seed=0)
    ours, theirs = rotated_iou_matrix(boxes), box_iou_rotated(boxes, boxes)
    assert (theirs > 0).sum() > 1000  # many overlapping pairs, not a trivially sparse case
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("threshold", [0.01, 0.2, 0.5])
def test_greedy_nms_keeps_what_mmcv_keeps(threshold: float) -> None:
    from mmcv.ops import nms, nms_rotated

    from autoexport.detections import bev_boxes_for_nms
    from autoexport.ops.nms import aligned_iou_matrix, rotated_iou_matrix

    bev = _random_bev_boxes(150, seed=1)
    scores = torch.rand(150, generator=torch.Generator().manual_seed(2))
    order = scores.argsort(descending=True)
    valid = torch.ones(1, 150, dtype=torch.bool)
    rotated = torch.ops.autoexport.greedy_nms_keep((rotated_iou_matrix(bev)[order][:, order] > threshold)[None],
                                                   valid)[0]
    assert sorted(order[rotated].tolist()) == sorted(nms_rotated(bev, scores, threshold)[1].tolist())
    corners = torch.cat([bev[:, :2] - bev[:, 2:4] / 2, bev[:, :2] + bev[:, 2:4] / 2], 1)
    aligned = torch.ops.autoexport.greedy_nms_keep((aligned_iou_matrix(corners)[order][:, order] > threshold)[None],
                                                   valid)[0]
    assert sorted(order[aligned].tolist()) == sorted(nms(corners, scores, threshold)[1].tolist())
    assert bev_boxes_for_nms(torch.zeros(0, 7)).shape == (0, 5)


def test_greedy_nms_onnx_translation_equals_the_kernel(tmp_path: Path) -> None:
    import onnxruntime as ort

    from autoexport.ops import onnx_translation_table
    from autoexport.ops.nms import rotated_iou_matrix

    class Nms(torch.nn.Module):
        def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            order = scores.argsort(descending=True)
            blockers = rotated_iou_matrix(boxes[order]) > 0.2
            return order, torch.ops.autoexport.greedy_nms_keep(blockers[None], (scores[order] > 0.3)[None])[0]

    boxes, scores = _random_bev_boxes(60, seed=3), torch.rand(60, generator=torch.Generator().manual_seed(4))
    expected = Nms()(boxes, scores)
    program = torch.export.export(Nms(), (boxes, scores))
    torch.onnx.export(program, (boxes, scores), dynamo=True, input_names=["boxes", "scores"],
                      custom_translation_table=onnx_translation_table()).save(tmp_path / "nms.onnx")
    order, keep = ort.InferenceSession(str(tmp_path / "nms.onnx")).run(
        None, {"boxes": boxes.numpy(), "scores": scores.numpy()})
    assert np.array_equal(order, expected[0].numpy()) and np.array_equal(keep, expected[1].numpy())
    assert 5 < keep.sum() < 40  # thresholds that both keep and suppress


def _busy_checkpoint(path: Path) -> Path:
    """Random weights whose classifier scores many anchors above the threshold, spread enough to rank them."""
    from autoexport.analyze import build_model, init_random_weights, load_config

    model = build_model(load_config(Path(PP_SAMPLE)), "cpu", 0)
    init_random_weights(model)
    torch.manual_seed(1)
    with torch.no_grad():
        model.bbox_head.conv_cls.weight.normal_(0, 0.05)
        model.bbox_head.conv_cls.bias.fill_(-1.0)
    torch.save({"state_dict": model.state_dict(), "meta": {}}, path)
    return path


@pytest.fixture(scope="module")
def pp_detections(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("detections")
    checkpoint = _busy_checkpoint(work / "busy.pth")
    out = work / "pp"
    assert export_to(PP_SAMPLE, out, "--scope", "detections", "--checkpoint", str(checkpoint),
                     "--data-info", str(KITTI_INFO)) == 0
    return out


def test_detections_match_inference_detector_box_by_box(pp_detections: Path) -> None:
    parity = json.loads((pp_detections / "parity.json").read_text())
    assert parity["passed"]
    samples = parity["detections"]["samples"]
    assert {s["runtime"] for s in samples} == {"pt2", "onnxruntime"}
    for s in samples:
        assert s["reference_boxes"] >= 30  # weights that detect: NMS and max_num do real work
        assert s["candidate_boxes"] == s["reference_boxes"]
        assert s["matched"] >= s["reference_boxes"] - 4 and not s["unexplained"]
        assert s["max_box_diff"] < 1e-4 and s["max_score_diff"] < 1e-5
    metadata = json.loads((pp_detections / "metadata.json").read_text())
    assert metadata["samples"][0]["origin"] == f"{KITTI_INFO} record 0" and metadata["samples"][0]["num_points"] > 15000
    assert [t["name"] for t in metadata["export_info"]["tensor_details"]] == ["points"]
    assert [o["name"] for o in metadata["outputs"]] == ["boxes_3d", "scores_3d", "labels_3d", "num_detections"]


def _onnx_detections(directory: Path, points: np.ndarray):  # noqa: ANN202
    import onnxruntime as ort

    from autoexport.detection_parity import detections_from_outputs

    session = ort.InferenceSession(str(directory / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    return detections_from_outputs(dict(zip(names, session.run(None, {"points": points}))))


def test_raw_scan_file_gives_inference_detectors_boxes(pp_detections: Path) -> None:
    """The whole scan as the loader reads it, points outside the range included: the graph's own range filter."""
    from mmdet3d.apis import inference_detector

    from autoexport.analyze import load_config
    from autoexport.detection_parity import compare_detections, near_ties_of
    from autoexport.fidelity import Detections
    from autoexport.pipeline import analyze

    analysis = analyze(Path(PP_SAMPLE), str(pp_detections.parent / "busy.pth"), "cpu", [KITTI_SCAN], seed=0)
    model = analysis.model
    model.cfg = load_config(Path(PP_SAMPLE))
    result = inference_detector(model, str(KITTI_SCAN))[0].pred_instances_3d
    reference = Detections(result.bboxes_3d.tensor.numpy().astype(np.float64), result.scores_3d.numpy(),
                           result.labels_3d.numpy())
    raw = np.fromfile(KITTI_SCAN, dtype=np.float32).reshape(-1, 4)
    candidate = _onnx_detections(pp_detections, raw)
    parity = compare_detections("000008", "onnxruntime", reference, candidate, near_ties_of(model))
    assert len(reference.scores) >= 30 and parity.passed, parity.unexplained
    assert parity.matched >= len(reference.scores) - 4


def test_empty_and_out_of_range_clouds_give_no_detections(pp_detections: Path) -> None:
    far = np.tile(np.array([[500.0, 500.0, 0.0, 0.5]], np.float32), (100, 1))
    assert len(_onnx_detections(pp_detections, far).scores) == 0
    module = torch.export.load(pp_detections / "model.pt2").module()
    outputs = module(torch.from_numpy(far))
    assert int(outputs[3]) == 0 and (outputs[2] == -1).all()


def test_second_detections_match_inference_detector(tmp_path: Path) -> None:
    """SECOND: sparse convolutions between in-graph voxelization and the head (random weights already give boxes)."""
    out = tmp_path / "second"
    assert export_to("second_hv_secfpn_8xb6-80e_kitti-3d-3class", out, "--scope", "detections",
                     "--sample", str(KITTI_SCAN)) == 0
    samples = json.loads((out / "parity.json").read_text())["detections"]["samples"]
    on_scan = [s for s in samples if s["sample"] == "sample_0"]
    assert len(on_scan) == 2 and all(s["reference_boxes"] >= 20 and s["passed"] for s in on_scan)
    assert all(s["matched"] >= s["reference_boxes"] - 2 for s in samples)


@pytest.mark.parametrize("config, extra, message", [
    (PP_SAMPLE, ("--backend", "iree"), "IREE 3.13's ONNX import lowers neither onnx.Unique"),
    ("3dssd_4xb4_kitti-3d-car", (), "has no in-graph box decoding in autoexport yet (supported heads: Anchor3DHead, CenterHead)"),
])
def test_detections_scope_refuses_what_it_cannot_export(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        config: str, extra: tuple[str, ...], message: str) -> None:
    assert export_to(config, tmp_path / "out", "--scope", "detections", *extra) == 2
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


def test_centerpoint_detections_match_mmdet3d_box_by_box(tmp_path: Path) -> None:
    """CenterHead: six tasks, heatmap peaks, rotated NMS per task, post_max_size each (random weights fill all)."""
    out = tmp_path / "centerpoint"
    assert export_to("centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d", out, "--scope", "detections") == 0
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"]
    for s in parity["detections"]["samples"]:
        assert s["reference_boxes"] >= 300 and s["matched"] == s["reference_boxes"] == s["candidate_boxes"]
        assert s["max_box_diff"] < 0.05 and s["max_score_diff"] < 1e-4


def test_info_files_load_without_running_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import os
    import pickle

    class Payload:
        def __reduce__(self):  # noqa: ANN204 - what a malicious info file would carry
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps({"data_list": [Payload()]}))
    assert export_to(PP_SAMPLE, tmp_path / "out", "--data-info", str(hostile)) == 2
    assert "not an mmdet3d info file that loads without running code" in caplog.text
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()
    assert export_to(PP_SAMPLE, tmp_path / "out", "--data-info", str(KITTI_INFO), "--sample", str(KITTI_SCAN)) == 2
    assert "--data-info and --sample both name the samples" in caplog.text
