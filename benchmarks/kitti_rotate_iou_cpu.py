"""KITTI evaluation's rotated-box overlap on a CPU, for machines without a GPU.

mmdet3d's KITTI evaluation (mmdet3d.evaluation.functional.kitti_utils) computes BEV IoUs and 3D box intersections
with `rotate_iou_gpu_eval`, a numba.cuda kernel. Without a GPU, numba's CUDA simulator runs that kernel one Python
thread per CUDA thread: about 8 minutes of metric for 250 frames. This module computes the same matrix with
shapely's vectorized polygon intersection: the same corners (mmdet3d's `rbbox_to_corners`, clockwise rotation),
the same criteria, the same layout (rows: `boxes`, columns: `query_boxes`, criterion 0 dividing by the query box's
area as the kernel does). Only the arithmetic differs: float64 here, float32 in the kernel
(tests/test_kitti_rotate_iou_cpu.py compares the two).

    import kitti_rotate_iou_cpu; kitti_rotate_iou_cpu.install()   # before KittiMetric evaluates
"""

from __future__ import annotations

import numpy as np


def box_polygons(boxes: np.ndarray):
    """[N, 5] (center x, center y, x size, y size, angle) -> N shapely polygons, corners as rbbox_to_corners."""
    import shapely

    x_d, y_d = boxes[:, 2:3] / 2, boxes[:, 3:4] / 2
    local_x = np.concatenate([-x_d, -x_d, x_d, x_d], axis=1)
    local_y = np.concatenate([-y_d, y_d, y_d, -y_d], axis=1)
    cos, sin = np.cos(boxes[:, 4:5]), np.sin(boxes[:, 4:5])
    corners_x = cos * local_x + sin * local_y + boxes[:, 0:1]
    corners_y = -sin * local_x + cos * local_y + boxes[:, 1:2]
    return shapely.polygons(np.stack([corners_x, corners_y], axis=-1))


def rotate_iou_cpu(boxes: np.ndarray, query_boxes: np.ndarray, criterion: int = -1, device_id: int = 0) -> np.ndarray:
    """Drop-in for kitti_utils.rotate_iou.rotate_iou_gpu_eval (same signature, same float32 result)."""
    import shapely

    boxes = np.asarray(boxes, np.float32).astype(np.float64)
    query_boxes = np.asarray(query_boxes, np.float32).astype(np.float64)
    if len(boxes) == 0 or len(query_boxes) == 0:
        return np.zeros((len(boxes), len(query_boxes)), np.float32)
    box_polys, query_polys = box_polygons(boxes), box_polygons(query_boxes)
    inter = shapely.area(shapely.intersection(box_polys[:, None], query_polys[None, :]))
    box_area = (boxes[:, 2] * boxes[:, 3])[:, None]
    query_area = (query_boxes[:, 2] * query_boxes[:, 3])[None, :]
    if criterion == -1:
        overlap = inter / (query_area + box_area - inter)
    elif criterion == 0:
        overlap = inter / query_area
    elif criterion == 1:
        overlap = inter / box_area
    else:
        overlap = inter
    return overlap.astype(np.float32)


def install() -> None:
    """Make mmdet3d's KITTI evaluation use rotate_iou_cpu (eval.py imports the kernel at each call)."""
    from mmdet3d.evaluation.functional.kitti_utils import rotate_iou

    rotate_iou.rotate_iou_gpu_eval = rotate_iou_cpu
