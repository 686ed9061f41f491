"""Fidelity of a reduced-precision export (INT8, FP16) against FP32, on held-out samples: raw outputs (cosine,
errors) and detections after the model's own host-side decoding (boxes matched at BEV IoU, precision/recall of
the reduced-precision detections with FP32 as the reference)."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .manifest import Manifest
from .knowledge import KNOWLEDGE
from .verify import cosine

# ---- decoding ------------------------------------------------------------------------------------

# How a head turns its raw forward outputs (the exported graph's outputs, nested back) into boxes, and where it keeps
# its score threshold: ClassKnowledge.decoder and .score_threshold_key, registered in autoexport/models/.
Decoder = Callable[[Any, Any, list[dict]], list[Any]]


@dataclass
class Detections:
    boxes: np.ndarray  # (N, 7): x, y, z, x_size, y_size, z_size, yaw (LiDAR frame)
    scores: np.ndarray
    labels: np.ndarray


def nest_outputs(manifest: Manifest, flat: dict[str, np.ndarray]) -> Any:
    """The head's output structure (tuples/lists by index, dicts by key) rebuilt from the flat named outputs."""
    root: dict = {}
    for spec in manifest.outputs:
        node = root
        for key in spec.index_path[:-1]:
            node = node.setdefault(key, {})
        node[spec.index_path[-1]] = torch.from_numpy(np.array(flat[spec.name], copy=True))

    def build(node: Any) -> Any:
        if isinstance(node, dict) and node and all(isinstance(k, int) for k in node):
            return [build(node[i]) for i in sorted(node)]
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        return node

    return build(root)


@contextmanager
def _score_threshold(head: Any, value: float | None) -> Iterator[None]:
    if value is None:
        yield
        return
    key = KNOWLEDGE.lookup(head, "score_threshold_key")
    if key is None:
        raise ValueError(f"no score threshold key known for {type(head).__name__}")
    saved = copy.deepcopy(head.test_cfg)
    head.test_cfg[key[1]] = value
    try:
        yield
    finally:
        head.test_cfg = saved


class DetectionDecoder:
    """Runs the model's own head decoding (anchors/heatmaps, score threshold, NMS) on exported outputs."""

    def __init__(self, head: Any, manifest: Manifest, score_thr: float | None = None) -> None:
        found = KNOWLEDGE.lookup(head, "decoder")
        if found is None:
            raise LookupError(f"no detection decoder registered for {type(head).__name__}")
        self.head, self.decode_fn, self.manifest, self.score_thr = head, found[1], manifest, score_thr
        key = KNOWLEDGE.lookup(head, "score_threshold_key")
        self.effective_score_thr = score_thr if score_thr is not None else (
            head.test_cfg.get(key[1]) if key else None)

    def __call__(self, flat: dict[str, np.ndarray], metas: list[dict]) -> list[Detections]:
        with torch.no_grad(), _score_threshold(self.head, self.score_thr):
            results = self.decode_fn(self.head, nest_outputs(self.manifest, flat), metas)
        out = []
        for result in results:
            boxes = result.bboxes_3d.tensor[:, :7].detach().cpu().numpy() if len(result.scores_3d) else np.zeros((0, 7))
            out.append(Detections(boxes.astype(np.float64), result.scores_3d.detach().cpu().numpy(),
                                  result.labels_3d.detach().cpu().numpy()))
        return out


# ---- matching ------------------------------------------------------------------------------------

def bev_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact rotated BEV IoU in float64 (autoexport.ops.nms), for detection parity and detection agreement. Not
    mmcv's box_iou_rotated: on near-identical boxes it is wrong (5.9e-6 for two 17.8 m x 0.33 m boxes 1e-5 m apart,
    0.33 for a cyclist box and its 1.3e-6 m-shifted twin), which would unmatch equal boxes."""
    from .ops.nms import rotated_iou_matrix

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    both = torch.from_numpy(np.concatenate([a, b])[:, [0, 1, 3, 4, 6]].astype(np.float64))
    return rotated_iou_matrix(both)[:len(a), len(a):].numpy()


def mmdet3d_detections(model: Any, points: np.ndarray, data_samples: list, device: str) -> Detections:
    """mmdet3d's own inference on the test pipeline's output for one sample (what inference_detector does after
    its pipeline): the data preprocessor's voxelization and model.predict, decoding and NMS included, with mmcv's
    kernels (the op library only where mmcv has no kernel on this device)."""
    from .patches import eager_substitutions

    batch = {"inputs": {"points": [torch.from_numpy(np.ascontiguousarray(points)).to(device)]},
             "data_samples": copy.deepcopy(data_samples)}
    with eager_substitutions(device), torch.no_grad():
        result = model.test_step(batch)[0]
    instances = result.pred_instances_3d
    return Detections(instances.bboxes_3d.tensor.cpu().numpy().astype(np.float64),
                      instances.scores_3d.cpu().numpy().astype(np.float64),
                      instances.labels_3d.cpu().numpy().astype(np.int64))


@dataclass
class MatchCounts:
    reference: int = 0  # FP32 boxes
    candidate: int = 0  # reduced-precision boxes
    matched: int = 0
    iou_sum: float = 0.0

    def add(self, other: "MatchCounts") -> None:
        self.reference += other.reference
        self.candidate += other.candidate
        self.matched += other.matched
        self.iou_sum += other.iou_sum

    @property
    def precision(self) -> float | None:
        return self.matched / self.candidate if self.candidate else None

    @property
    def recall(self) -> float | None:
        return self.matched / self.reference if self.reference else None

    @classmethod
    def of(cls, reference: Detections, candidate: Detections, pairs: list[tuple[int, int, float]]) -> MatchCounts:
        """The counts of one sample's matched_pairs."""
        return cls(len(reference.boxes), len(candidate.boxes), len(pairs), sum(iou for _, _, iou in pairs))

    def summary(self, per_sample: list[dict], decoder: str, score_threshold: float | None,
                iou_threshold: float) -> dict:
        """The detection_agreement record of fidelity reports (quant_report.json)."""
        return {"decoder": decoder, "score_threshold": score_threshold, "iou_threshold": iou_threshold,
                "samples": len(per_sample), "reference_boxes": self.reference, "candidate_boxes": self.candidate,
                "matched": self.matched, "precision": self.precision, "recall": self.recall,
                "mean_matched_iou": self.iou_sum / self.matched if self.matched else None, "per_sample": per_sample}


def matched_pairs(reference: Detections, candidate: Detections, iou_threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching, candidate boxes in descending score order, each to the unmatched reference
    box of the same label with the highest BEV IoU, if that IoU reaches the threshold: (candidate, reference, IoU)."""
    ious = bev_iou(candidate.boxes, reference.boxes)
    taken = np.zeros(len(reference.boxes), bool)
    pairs = []
    for i in np.argsort(-candidate.scores, kind="stable"):
        allowed = (reference.labels == candidate.labels[i]) & ~taken
        if not allowed.any():
            continue
        row = np.where(allowed, ious[i], -1.0)
        j = int(np.argmax(row))
        if row[j] >= iou_threshold:
            taken[j] = True
            pairs.append((int(i), j, float(row[j])))
    return pairs


def match_detections(reference: Detections, candidate: Detections, iou_threshold: float = 0.5) -> MatchCounts:
    """Counts of matched_pairs."""
    return MatchCounts.of(reference, candidate, matched_pairs(reference, candidate, iou_threshold))


# ---- report --------------------------------------------------------------------------------------

@dataclass
class OutputFidelity:
    output: str
    min_cosine: float
    mean_cosine: float
    max_abs: float
    mean_abs: float
    reference_absmax: float  # scale of the FP32 output, to read max_abs against


@dataclass
class FidelityReport:
    precision: str  # int8 or fp16
    candidate: str  # what ran the reduced-precision model (e.g. onnxruntime)
    reference: str  # what produced FP32 outputs
    samples: list[str]
    min_cosine_target: float
    outputs: list[OutputFidelity] = field(default_factory=list)
    detection: dict | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # quantization recipe, sensitivity profile, ...

    @property
    def passed(self) -> bool:
        return all(o.min_cosine >= self.min_cosine_target for o in self.outputs)

    def to_json(self) -> dict:
        return {"passed": self.passed, "precision": self.precision, "candidate": self.candidate,
                "reference": self.reference, "held_out_samples": len(self.samples), "sample_names": self.samples,
                "min_cosine_target": self.min_cosine_target, "outputs": [asdict(o) for o in self.outputs],
                "detection_agreement": self.detection, "notes": self.notes, **self.extra}

    def to_markdown(self, title: str) -> str:
        lines = [f"# {title}", "",
                 f"{self.precision.upper()} ({self.candidate}) against FP32 ({self.reference}) on "
                 f"{len(self.samples)} held-out samples (none used for calibration). "
                 f"Target: cosine >= {self.min_cosine_target:g} on every output of every sample: "
                 f"**{'PASSED' if self.passed else 'FAILED'}**.", "",
                 "| output | min cosine | mean cosine | max abs err | mean abs err | FP32 max abs |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {o.output} | {o.min_cosine:.6f} | {o.mean_cosine:.6f} | {o.max_abs:.4g} | {o.mean_abs:.3g} | "
                  f"{o.reference_absmax:.4g} |" for o in self.outputs]
        if self.detection:
            d = self.detection
            lines += ["", "## Detection agreement", "",
                      f"Boxes decoded by the model's own head ({d['decoder']}, score threshold {d['score_threshold']}, "
                      f"its NMS), matched one-to-one at BEV IoU >= {d['iou_threshold']} with the same label; FP32 is "
                      "the reference.", "",
                      "| samples | FP32 boxes | " + f"{self.precision.upper()} boxes | matched | precision | recall | "
                      "mean IoU of matches |", "|---|---|---|---|---|---|---|",
                      f"| {d['samples']} | {d['reference_boxes']} | {d['candidate_boxes']} | {d['matched']} | "
                      f"{_fmt(d['precision'])} | {_fmt(d['recall'])} | {_fmt(d['mean_matched_iou'])} |"]
        sensitivity = self.extra.get("sensitivity")
        if sensitivity:
            lines += ["", "## Per-layer sensitivity (one layer quantized at a time)", "",
                      "| layer | kind | 1 - cosine | max abs err |", "|---|---|---|---|"]
            lines += [f"| {r['layer']} | {r['kind']} | {r['one_minus_cosine']:.3e} | {r['max_abs']:.4g} |"
                      for r in sensitivity[:15]]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def compare_outputs(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]],
                    names: list[str]) -> list[OutputFidelity]:
    rows = []
    for name in names:
        pairs = [(r[name], c[name]) for r, c in zip(reference, candidate)]
        cosines = [cosine(r, c) for r, c in pairs]
        errors = [np.abs(r.astype(np.float64) - c.astype(np.float64)) for r, c in pairs]
        rows.append(OutputFidelity(name, min(cosines), float(np.mean(cosines)),
                                   max(float(e.max()) if e.size else 0.0 for e in errors),
                                   float(np.mean([e.mean() if e.size else 0.0 for e in errors])),
                                   max(float(np.abs(r).max()) if r.size else 0.0 for r, _ in pairs)))
    return rows


def detection_agreement(decoder: DetectionDecoder, reference: list[dict[str, np.ndarray]],
                        candidate: list[dict[str, np.ndarray]], metas: list[list[dict]],
                        iou_threshold: float = 0.5) -> dict:
    total = MatchCounts()
    per_sample = []
    for ref, cand, meta in zip(reference, candidate, metas):
        sample_counts = MatchCounts()
        for ref_det, cand_det in zip(decoder(ref, meta), decoder(cand, meta)):
            sample_counts.add(match_detections(ref_det, cand_det, iou_threshold))
        per_sample.append(asdict(sample_counts))
        total.add(sample_counts)
    return total.summary(per_sample, f"{type(decoder.head).__name__}.predict_by_feat", decoder.effective_score_thr,
                         iou_threshold)


def compare_detection_outputs(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]],
                              score_threshold: float | None, iou_threshold: float = 0.5) -> tuple[list[OutputFidelity], dict]:
    """A --scope detections graph against FP32: its rows are a selection (a near-tied score may add, drop or reorder
    a box), so boxes_3d and scores_3d are compared over the boxes matched one-to-one (label, BEV IoU), and the
    unmatched ones count in the detection agreement, computed from the graph's own decoding and NMS."""
    from .detection_parity import detections_from_outputs

    total, per_sample = MatchCounts(), []
    matched_rows: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"boxes_3d": [], "scores_3d": []}
    for ref_out, cand_out in zip(reference, candidate):
        ref, cand = detections_from_outputs(ref_out), detections_from_outputs(cand_out)
        pairs = matched_pairs(ref, cand, iou_threshold)
        counts = MatchCounts.of(ref, cand, pairs)
        per_sample.append(asdict(counts))
        total.add(counts)
        c_idx, r_idx = [c for c, _, _ in pairs], [r for _, r, _ in pairs]
        matched_rows["boxes_3d"].append((ref.boxes[r_idx], cand.boxes[c_idx]))
        matched_rows["scores_3d"].append((ref.scores[r_idx], cand.scores[c_idx]))
    rows = []
    for name, pairs_of_samples in matched_rows.items():
        usable = [(r, c) for r, c in pairs_of_samples if r.size]
        if not usable:  # nothing matched: agreement only if neither side kept a box
            agree = 1.0 if total.reference + total.candidate == 0 else 0.0
            rows.append(OutputFidelity(f"{name} (matched boxes)", agree, agree, 0.0, 0.0, 0.0))
            continue
        cosines = [cosine(r, c) for r, c in usable]
        errors = [np.abs(r - c) for r, c in usable]
        rows.append(OutputFidelity(f"{name} (matched boxes)", min(cosines), float(np.mean(cosines)),
                                   max(float(e.max()) for e in errors), float(np.mean([e.mean() for e in errors])),
                                   max(float(np.abs(r).max()) for r, _ in usable)))
    return rows, total.summary(per_sample, "in the exported graph", score_threshold, iou_threshold)
