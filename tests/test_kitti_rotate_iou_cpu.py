"""benchmarks/kitti_rotate_iou_cpu.py computes what mmdet3d's KITTI evaluation kernel computes.

The reference is mmdet3d's own numba.cuda kernel (kitti_utils/rotate_iou.py) run by numba's CUDA simulator in a
child process (the simulator must be chosen before numba is imported). The file is loaded by path: importing the
mmdet3d.evaluation package would need the Lyft and nuScenes SDKs of benchmarks/setup_metrics.sh.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = """
import importlib.util, sys, warnings
import numpy as np
from pathlib import Path
import mmdet3d
path = Path(mmdet3d.__file__).parent / "evaluation/functional/kitti_utils/rotate_iou.py"
spec = importlib.util.spec_from_file_location("kitti_rotate_iou", path)
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
# The simulator iterates the module's globals from many threads; a first warning would add __warningregistry__.
module.__dict__.setdefault("__warningregistry__", {}); warnings.simplefilter("ignore")
data = np.load(sys.argv[1])
np.savez(sys.argv[2], **{f"c{c}": module.rotate_iou_gpu_eval(data["boxes"], data["query"], c) for c in (-1, 0, 1, 2)})
"""


def _rotate_iou_cpu():
    """benchmarks/kitti_rotate_iou_cpu.rotate_iou_cpu (benchmarks/ is not a package)."""
    pytest.importorskip("shapely")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from kitti_rotate_iou_cpu import rotate_iou_cpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return rotate_iou_cpu


def random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    centers = rng.uniform(0, 6, (count, 2))  # a small area: most pairs overlap
    sizes = rng.uniform(0.5, 4, (count, 2))
    return np.concatenate([centers, sizes, rng.uniform(-np.pi, np.pi, (count, 1))], axis=1)


def test_matches_mmdet3d_kernel(tmp_path: Path) -> None:
    rotate_iou_cpu = _rotate_iou_cpu()
    rng = np.random.default_rng(0)
    boxes, query = random_boxes(rng, 70), random_boxes(rng, 40)
    query[:10] = boxes[:10] + rng.normal(0, 0.05, (10, 5))  # near-duplicates, as detections of a ground truth are
    np.savez(tmp_path / "in.npz", boxes=boxes, query=query)
    subprocess.run([sys.executable, "-c", REFERENCE, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   check=True, env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}, timeout=600)
    reference = np.load(tmp_path / "out.npz")
    for criterion in (-1, 0, 1):  # IoU, intersection over the query's area, over the box's area
        expected = reference[f"c{criterion}"]
        assert (expected > 0.5).sum() >= 10  # the near-duplicates overlap well
        np.testing.assert_allclose(rotate_iou_cpu(boxes, query, criterion), expected, rtol=0, atol=2e-5)
    # criterion 2 (used for 3D boxes): the intersection area itself, float32 arithmetic in the kernel
    np.testing.assert_allclose(rotate_iou_cpu(boxes, query, 2), reference["c2"], rtol=1e-5, atol=1e-4)


def test_criteria_on_known_boxes() -> None:
    rotate_iou_cpu = _rotate_iou_cpu()
    box = np.array([[0.0, 0.0, 4.0, 2.0, 0.0]])
    shifted = np.array([[1.0, 0.0, 4.0, 2.0, 0.0], [0.0, 0.0, 2.0, 4.0, np.pi / 2], [0.0, 0.0, 2.0, 2.0, 0.3]])
    # half-overlap along x: 3 x 2 shared of 8 + 8; a quarter turn of a 2 x 4 box is the same footprint
    np.testing.assert_allclose(rotate_iou_cpu(box, shifted[:2], -1)[0], [6 / 10, 1.0], atol=1e-6)
    inter = rotate_iou_cpu(box, shifted[2:], 2)[0, 0]  # a 2 x 2 square turned 0.3 rad inside a 4 x 2 box
    assert 3.0 < inter < 4.0
    np.testing.assert_allclose(rotate_iou_cpu(box, shifted[2:], 0)[0, 0], inter / 4.0, rtol=1e-6)  # query's area
    np.testing.assert_allclose(rotate_iou_cpu(box, shifted[2:], 1)[0, 0], inter / 8.0, rtol=1e-6)  # box's area
