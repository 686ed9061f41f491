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


def _found(truth: np.ndarray, truth_labels: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
           iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Which truth boxes a same-class detection overlaps at BEV IoU >= threshold, and which detections hit one."""
    from autoexport.detection_parity import bev_iou

    iou = bev_iou(truth, boxes) * (truth_labels[:, None] == labels[None, :])
    return (iou >= iou_threshold).any(1), (iou >= iou_threshold).any(0)


@pytest.fixture(scope="module")
def detector():
    from mmdet3d.apis import init_model

    from autoexport.configs import resolve_config

    assert WEIGHTS.is_file(), f"{WEIGHTS} is part of the repository"
    return init_model(str(resolve_config(CONFIG)), str(WEIGHTS), device="cpu")


def test_trained_pointpillars_finds_the_held_out_objects(detector, tmp_path: Path) -> None:
    from mmdet3d.apis import inference_detector

    objects = found = cars = cars_tight = confident = hits = 0
    for index in HELD_OUT:
        cloud, truth, truth_labels = _scene(index)
        path = tmp_path / f"{index:06d}.bin"
        cloud.astype(np.float32).tofile(path)
        result = inference_detector(detector, str(path))[0].pred_instances_3d
        keep = result.scores_3d >= 0.5
        boxes = result.bboxes_3d.tensor[keep, :7].numpy().astype(np.float64)
        labels = result.labels_3d[keep].numpy()
        found_loose, hit = _found(truth, truth_labels, boxes, labels, iou_threshold=0.5)
        found_tight, _ = _found(truth, truth_labels, boxes, labels, iou_threshold=0.7)
        objects, found = objects + len(truth), found + int(found_loose.sum())
        cars, cars_tight = cars + int((truth_labels == 2).sum()), cars_tight + int(found_tight[truth_labels == 2].sum())
        confident, hits = confident + len(boxes), hits + int(hit.sum())
    assert objects >= 30 and cars >= 10
    # Measured: all 44 objects found, all 20 cars at IoU 0.7, all 44 detections on an object.
    assert found / objects >= 0.95, f"{found} of {objects} placed objects found (same class, BEV IoU >= 0.5)"
    assert cars_tight / cars >= 0.9, f"{cars_tight} of {cars} cars found at BEV IoU >= 0.7 (KITTI's car criterion)"
    assert hits / confident >= 0.95, f"{hits} of {confident} detections with score >= 0.5 lie on a placed object"


def test_random_weights_find_nothing(tmp_path: Path) -> None:
    """The same check on the same scenes fails without the trained weights: the test above measures the weights."""
    from mmdet3d.apis import inference_detector, init_model

    from autoexport.configs import resolve_config

    torch.manual_seed(0)
    model = init_model(str(resolve_config(CONFIG)), None, device="cpu")
    cloud, truth, truth_labels = _scene(HELD_OUT[0])
    path = tmp_path / "scene.bin"
    cloud.astype(np.float32).tofile(path)
    result = inference_detector(model, str(path))[0].pred_instances_3d
    keep = result.scores_3d >= 0.5
    found, _ = _found(truth, truth_labels, result.bboxes_3d.tensor[keep, :7].numpy().astype(np.float64),
                      result.labels_3d[keep].numpy(), iou_threshold=0.7)
    assert found.sum() == 0
