"""The PointPillars weights trained on the synthetic KITTI-format set (benchmarks/weights/) detect what it holds.

The INT8 fidelity numbers mean something only if the FP32 model finds objects: these tests run mmdet3d's own
init_model and inference_detector on held-out scenes of benchmarks/synthetic_kitti.py (frame indices past the
training range) and count the placed objects found. Random weights find none of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "benchmarks" / "weights" / "pointpillars_kitti_synthetic.pth"
CONFIG = "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class"
HELD_OUT = range(3000, 3006)  # benchmarks/synthetic_kitti.py's default --train 3000: these scenes were not trained on
CLASSES = ("Pedestrian", "Cyclist", "Car")  # the config's label order


def _synthetic_kitti():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import synthetic_kitti
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return synthetic_kitti


def _scene(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out frame's cloud and its placed objects: (cloud, boxes [M, 7] lidar frame, label per box)."""
    synthetic_kitti = _synthetic_kitti()
    rng = np.random.default_rng([2026, index])  # the generator's default seed, as write_frame seeds each frame
    objects = synthetic_kitti.place_objects(rng)
    cloud = synthetic_kitti.scene_cloud(rng, objects)
    boxes = np.stack([box for _, box in objects])
    labels = np.array([CLASSES.index(synthetic_kitti.CLASS_OF_KIND[kind]) for kind, _ in objects])
    return cloud, boxes, labels


def _same_class_iou(model, index: int, tmp_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mmdet3d's inference_detector on held-out frame `index`: the BEV IoU of each placed object (rows) with each
    detection of score >= 0.5 (columns), zero across classes; the placed boxes [M, 7], their labels, and the
    detections' boxes [K, 7]."""
    from mmdet3d.apis import inference_detector

    from autoexport.fidelity import bev_iou

    cloud, truth, truth_labels = _scene(index)
    path = tmp_path / f"{index:06d}.bin"
    cloud.astype(np.float32).tofile(path)
    result = inference_detector(model, str(path))[0].pred_instances_3d
    keep = result.scores_3d >= 0.5
    boxes = result.bboxes_3d.tensor[keep, :7].numpy().astype(np.float64)
    labels = result.labels_3d[keep].numpy()
    return bev_iou(truth, boxes) * (truth_labels[:, None] == labels[None, :]), truth, truth_labels, boxes


@pytest.fixture(scope="module")
def detector():
    from mmdet3d.apis import init_model

    from autoexport.configs import resolve_config

    assert WEIGHTS.is_file(), f"{WEIGHTS} is part of the repository"
    return init_model(str(resolve_config(CONFIG)), str(WEIGHTS), device="cpu")


def test_trained_pointpillars_finds_the_held_out_objects(detector, tmp_path: Path) -> None:
    objects = found = cars = cars_tight = confident = hits = 0
    for index in HELD_OUT:
        iou, _, truth_labels, _ = _same_class_iou(detector, index, tmp_path)
        car = truth_labels == 2
        objects, found = objects + len(iou), found + int((iou >= 0.5).any(1).sum())
        cars, cars_tight = cars + int(car.sum()), cars_tight + int((iou[car] >= 0.7).any(1).sum())
        confident, hits = confident + iou.shape[1], hits + int((iou >= 0.5).any(0).sum())
    assert objects >= 30 and cars >= 10
    # Measured: all 44 objects found, all 20 cars at IoU 0.7, all 44 detections on an object.
    assert found / objects >= 0.95, f"{found} of {objects} placed objects found (same class, BEV IoU >= 0.5)"
    assert cars_tight / cars >= 0.9, f"{cars_tight} of {cars} cars found at BEV IoU >= 0.7 (KITTI's car criterion)"
    assert hits / confident >= 0.95, f"{hits} of {confident} detections with score >= 0.5 lie on a placed object"


def test_trained_pointpillars_knows_front_from_back(detector, tmp_path: Path) -> None:
    """The synthetic objects are lower over their front (benchmarks/synthetic_kitti.py): the direction classifier
    can learn the heading, and a flip by pi of near-tied direction scores is rare. A detector that cannot tell front
    from back gets about half of the headings right. Cars only: a pedestrian's 0.8 x 0.6 m footprint hardly shows
    its heading (over frames 3000-3029: cars 130 of 130 right, cyclists 37 of 39, pedestrians 60 of 70)."""
    right = matched = 0
    for index in HELD_OUT:
        iou, truth, truth_labels, boxes = _same_class_iou(detector, index, tmp_path)
        for row in np.flatnonzero((iou >= 0.5).any(1) & (truth_labels == 2)):
            col = int(np.argmax(iou[row]))
            error = (boxes[col, 6] - truth[row, 6] + np.pi) % (2 * np.pi) - np.pi
            matched, right = matched + 1, right + int(abs(error) < np.pi / 4)
    assert matched >= 10
    assert right / matched >= 0.95, f"{right} of {matched} matched cars within 45 degrees of the true heading"


def test_random_weights_find_nothing(tmp_path: Path) -> None:
    """The same check on the same scenes fails without the trained weights: the test above measures the weights."""
    from mmdet3d.apis import init_model

    from autoexport.configs import resolve_config

    torch.manual_seed(0)
    model = init_model(str(resolve_config(CONFIG)), None, device="cpu")
    iou = _same_class_iou(model, HELD_OUT[0], tmp_path)[0]
    assert not (iou >= 0.7).any()


def test_int8_detections_export_of_trained_pointpillars(tmp_path: Path) -> None:
    """Points in, boxes out in INT8 with weights that detect: fidelity against FP32 is judged on matched boxes (a
    detections graph's rows are a selection). Compared in order, this export's boxes_3d had min cosine 0.67."""
    import json

    from conftest import export_to

    out = tmp_path / "pp_int8_detections"
    code = export_to(CONFIG, out, "--checkpoint", str(WEIGHTS), "--scope", "detections", "--precision", "int8",
                     "--format", "onnx", "--calib-samples", "8", "--eval-samples", "6")
    # Exit 1 is the parity of INT8 selections against the quantized PyTorch model: ONNX Runtime's integer kernels
    # move a box by a centimetre, and a neighbour crosses the config's NMS IoU threshold of 0.01; detection-level
    # parity with near-ties at INT8's scale is open (benchmarks/RESULTS.md). The fidelity report is written either way.
    assert code in (0, 1)
    folder = out if code == 0 else out.parent / f"{out.name}.failed"
    report = json.loads((folder / "quant_report.json").read_text())
    outputs = {o["output"]: o for o in report["outputs"]}
    assert set(outputs) == {"boxes_3d (matched boxes)", "scores_3d (matched boxes)"}
    # Measured: matched boxes 0.99964, scores 0.9992; 67 FP32 boxes, 70 INT8, 67 matched.
    assert report["passed"] and min(o["min_cosine"] for o in outputs.values()) >= 0.99
    agreement = report["detection_agreement"]
    assert agreement["reference_boxes"] >= 30  # the trained model finds the synthesized scenes' objects
    assert agreement["precision"] >= 0.9 and agreement["recall"] >= 0.9, agreement
