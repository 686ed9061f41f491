"""Detection parity: the boxes an exported detections graph returns against mmdet3d's own inference on the same cloud.

Boxes are matched one-to-one by label and BEV IoU (>= 0.5), best scores first. A box without a partner is
acceptable only when the difference is explained by a near-tie that float rounding can flip: its score within
``score_tol`` of the score threshold, an overlap within ``iou_tol`` of the NMS threshold with a same-label box that
scored higher, an overlapping same-label box whose score ties its own within ``score_tol`` (NMS order), or a score
within ``score_tol`` of the last box kept under ``max_num``. Anything else fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .fidelity import Detections, bev_iou

MATCH_IOU = 0.5


@dataclass(frozen=True)
class NearTies:
    """The decision thresholds of the head (its test_cfg) and how close to them rounding can move a value."""

    score_thr: float
    nms_thr: float
    max_num: int
    score_tol: float = 1e-4
    iou_tol: float = 1e-3


@dataclass
class SampleDetectionParity:
    sample: str
    runtime: str
    reference_boxes: int
    candidate_boxes: int
    matched: int
    max_box_diff: float  # largest |difference| of a box parameter over matched pairs (yaw wrapped to [-pi, pi))
    max_score_diff: float
    unexplained: list[str] = field(default_factory=list)
    explained: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.unexplained


def _mmcv_bev_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import torch
    from mmcv.ops import box_iou_rotated

    return box_iou_rotated(*(torch.from_numpy(x[:, [0, 1, 3, 4, 6]]).float() for x in (a, b))).numpy()


def _explain(box: np.ndarray, score: float, label: int, pool: Detections, ties: NearTies) -> str | None:
    """Why a box one side has and the other lacks may be a rounding flip, or None."""
    if abs(score - ties.score_thr) <= ties.score_tol:
        return f"score {score:.6f} within {ties.score_tol:g} of score_thr {ties.score_thr:g}"
    same = (pool.labels == label) & (pool.scores >= score - ties.score_tol)
    if same.any():
        overlaps = bev_iou(box[None], pool.boxes[same])[0]
        near = np.abs(overlaps - ties.nms_thr) <= ties.iou_tol
        if near.any():
            return f"BEV IoU {overlaps[near][0]:.6f} within {ties.iou_tol:g} of nms_thr {ties.nms_thr:g}"
        # Two overlapping boxes whose scores tie within rounding: which one NMS keeps depends on their order.
        rivals = (overlaps > ties.nms_thr) & (np.abs(pool.scores[same] - score) <= ties.score_tol)
        if rivals.any():
            return (f"overlaps (IoU {overlaps[rivals][0]:.3f}) a box whose score {pool.scores[same][rivals][0]:.6f} "
                    f"ties its own within {ties.score_tol:g}: NMS order")
        # mmdet3d's NMS measures overlap with mmcv's box_iou_rotated, which is wrong on some thin near-equal boxes.
        mmcv = _mmcv_bev_iou(box[None], pool.boxes[same])[0]
        wrong = (overlaps > ties.nms_thr) != (mmcv > ties.nms_thr)
        if wrong.any():
            return (f"NMS decided on mmcv's IoU {mmcv[wrong][0]:.3g} where the exact BEV IoU is "
                    f"{overlaps[wrong][0]:.3g} (nms_thr {ties.nms_thr:g})")
    if len(pool.scores) >= ties.max_num and abs(score - float(pool.scores.min())) <= ties.score_tol:
        return f"score {score:.6f} ties the last of max_num={ties.max_num} kept boxes"
    return None


def compare_detections(sample: str, runtime: str, reference: Detections, candidate: Detections,
                       ties: NearTies) -> SampleDetectionParity:
    ious = bev_iou(candidate.boxes, reference.boxes)
    taken = np.zeros(len(reference.boxes), bool)
    pairs: list[tuple[int, int]] = []
    for i in np.argsort(-candidate.scores, kind="stable"):
        row = np.where((reference.labels == candidate.labels[i]) & ~taken, ious[i], -1.0) if len(taken) else []
        if len(row) and row.max() >= MATCH_IOU:
            j = int(np.argmax(row))
            taken[j] = True
            pairs.append((int(i), j))
    result = SampleDetectionParity(sample, runtime, len(reference.boxes), len(candidate.boxes), len(pairs), 0.0, 0.0)
    if pairs:
        cand, ref = (np.array(side) for side in zip(*pairs))
        diff = np.abs(candidate.boxes[cand] - reference.boxes[ref])
        diff[:, 6] = np.abs((candidate.boxes[cand, 6] - reference.boxes[ref, 6] + np.pi) % (2 * np.pi) - np.pi)
        result.max_box_diff = float(diff.max())
        result.max_score_diff = float(np.abs(candidate.scores[cand] - reference.scores[ref]).max())
    matched_candidates = {i for i, _ in pairs}
    for side, dets, pool, matched in (("missing", reference, candidate, set(np.flatnonzero(taken))),
                                      ("extra", candidate, reference, matched_candidates)):
        for k in range(len(dets.scores)):
            if k in matched:
                continue
            what = f"{side} box label {int(dets.labels[k])} score {float(dets.scores[k]):.6f}"
            why = _explain(dets.boxes[k], float(dets.scores[k]), int(dets.labels[k]), pool, ties)
            (result.explained if why else result.unexplained).append(f"{what}: {why}" if why else what)
    return result


@dataclass
class DetectionParity:
    reference: str
    ties: NearTies
    samples: list[SampleDetectionParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.samples) and all(s.passed for s in self.samples)

    def to_json(self) -> dict:
        return {"passed": self.passed, "reference": self.reference, "match_iou": MATCH_IOU,
                "near_ties": asdict(self.ties),
                "samples": [{**asdict(s), "passed": s.passed} for s in self.samples]}

    def markdown_lines(self) -> list[str]:
        lines = ["", "## Detections", "", f"Reference: {self.reference}. Boxes matched one-to-one by label at BEV "
                 f"IoU >= {MATCH_IOU}; an unmatched box passes only when a near-tie explains it.", "",
                 "| runtime | sample | reference | exported | matched | max box diff | max score diff | verdict |",
                 "|---|---|---|---|---|---|---|---|"]
        for s in self.samples:
            lines.append(f"| {s.runtime} | {s.sample} | {s.reference_boxes} | {s.candidate_boxes} | {s.matched} | "
                         f"{s.max_box_diff:.3g} | {s.max_score_diff:.3g} | {'pass' if s.passed else 'FAIL'} |")
        notes = [f"- {s.runtime} {s.sample}: {text}" for s in self.samples for text in s.unexplained + s.explained]
        return lines + ([""] + notes if notes else [])


def near_ties_of(model: Any) -> NearTies:
    """The head's score and NMS thresholds (mmdet3d test_cfg names)."""
    from .detections import detection_head_of

    cfg = detection_head_of(model)[0].test_cfg
    return NearTies(float(cfg.get("score_thr", 0.0)), float(cfg.get("nms_thr", 0.0)), int(cfg.get("max_num", 0)))


def detections_from_outputs(outputs: dict[str, np.ndarray]) -> Detections:
    """The filled rows of a detections graph's outputs."""
    count = int(np.asarray(outputs["num_detections"]).reshape(()))
    return Detections(np.asarray(outputs["boxes_3d"])[:count].astype(np.float64),
                      np.asarray(outputs["scores_3d"])[:count].astype(np.float64),
                      np.asarray(outputs["labels_3d"])[:count].astype(np.int64))
