"""Where PointRCNN's chained check fails: its stages run eager (the rpn and roi stages' PT2 programs, equal to eager
in stages.json) and chained (their ONNX graphs in ONNX Runtime), with the same host steps (proposals, detections)
between them, on each zoo sample. Prints how far each stage's chained outputs are from eager's and, for the
detections, every eager row that no chained row matches within the fp32 tolerance (box, score, label of both).
Then the same stages in float64 (eager, the model in double; mmdet3d's box structures round RoIs to float32 on the
way, ~2e-5 at 300 m): how far eager fp32 and the chained run each are from it, as the one-graph check's
float64 diagnosis does.

Usage: python benchmarks/point_rcnn_chain_diffs.py OUTPUT_DIR [SAMPLE ...], the kept output of a PointRCNN export
(`autoexport zoo --family point_rcnn --keep` leaves OUTPUT_DIR as <config>.failed when the chain fails).
About 12 minutes on 2 CPU cores (eager PointNet++ and the NMS run three times per sample)."""
import copy
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from mmdet3d.models.layers import box3d_nms
from mmdet3d.structures import LiDARInstance3DBoxes

from autoexport import analyze as A
from autoexport.configs import resolve_config
from autoexport.patches import eager_substitutions
from autoexport.split import POINT_RCNN_PLAN, StageContext
from autoexport.verify import DEFAULT_TOLERANCES, compare_arrays, match_rows


def _nms_rotated_in_boxes_dtype(boxes, scores, thresh, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    # mmcv's CPU nms_rotated asserts equal dtypes; in the float64 chain mmdet3d hands it float64 boxes and scores
    # that went through a float32 box structure. A no-op for the fp32 chains.
    return _nms_rotated(boxes, scores.to(boxes.dtype), thresh, *args, **kwargs)


_nms_rotated = box3d_nms.nms_rotated
box3d_nms.nms_rotated = _nms_rotated_in_boxes_dtype
folder = Path(sys.argv[1])
tol = DEFAULT_TOLERANCES["fp32"]
with eager_substitutions("cpu"):
    model = A.build_model(A.load_config(resolve_config("point-rcnn_8xb2_kitti-3d-3class")), "cpu", 0)
    context = StageContext(1, ({"box_type_3d": LiDARInstance3DBoxes},))
    _, proposals, _, detections = POINT_RCNN_PLAN.stages
    programs = {s: torch.export.load(str(folder / f"stages/{s}/model.pt2")).module() for s in ("rpn", "roi")}
    # The export's weights (random init and BatchNorm statistics calibrated on its samples) from the stage graphs,
    # which hold the detector's parts as parts.<attribute>; the float64 chain runs them in double.
    weights = {k.removeprefix("parts."): v for prog in programs.values() for k, v in prog.state_dict().items()}
    unloaded = model.load_state_dict(weights, strict=False)
    assert not unloaded.missing_keys and not unloaded.unexpected_keys, unloaded
    model64 = copy.deepcopy(model).double()
    sessions = {s: ort.InferenceSession(str(folder / f"stages/{s}/model.onnx")) for s in ("rpn", "roi")}

    def run_graph(stage: str, tensors: dict, chained: bool) -> dict:
        names = [o.name for o in sessions[stage].get_outputs()]
        inputs = [i.name for i in sessions[stage].get_inputs()]
        if chained:
            return dict(zip(names, sessions[stage].run(None, {n: tensors[n] for n in inputs})))
        with torch.no_grad():
            return {n: v.numpy() for n, v in zip(names, programs[stage](*[torch.from_numpy(tensors[n]) for n in inputs]))}

    def run_host(step, tensors: dict, detector=model) -> dict:  # noqa: ANN001
        feed = {n: torch.from_numpy(np.ascontiguousarray(tensors[n])) for n in step.input_names(list(tensors))}
        with torch.no_grad():
            return {k: v.numpy() for k, v in step.forward(detector, feed, context).items()}

    def run_float64(tensors: dict) -> dict:
        """Every stage eager in float64; host steps' float outputs back to float64 (box structures are float32)."""
        t = {n: torch.from_numpy(v).double() if v.dtype == np.float32 else torch.from_numpy(v) for n, v in tensors.items()}
        for stage in POINT_RCNN_PLAN.stages:
            with torch.no_grad():
                out = stage.forward(model64, {n: t[n] for n in stage.input_names(list(t))}, context)
            out = out.get("head_outputs", out)
            t.update({k: v.double() if v.is_floating_point() else v for k, v in out.items()})
        return {k: v.numpy() for k, v in t.items()}

    for sample in sys.argv[2:] or ("sample_0", "sample_1", "heldout_0"):
        chains = {}
        for chained in (False, True):
            t = dict(np.load(folder / f"inputs/{sample}.npz"))
            t.update(run_graph("rpn", t, chained))
            t.update(run_host(proposals, t))
            t.update(run_graph("roi", t, chained))
            t.update(run_host(detections, t))
            chains[chained] = t
        e, o = chains[False], chains[True]
        diffs = ", ".join(f"{n} {np.abs(e[n] - o[n]).max():.2e}" if e[n].shape == o[n].shape else f"{n} shape differs"
                          for n in ("bbox_preds", "cls_preds", "rois", "cls_score", "bbox_pred"))
        roi_scores = torch.sigmoid(torch.from_numpy(e["cls_score"]))
        print(f"{sample}: chained - eager max abs: {diffs}; RoI scores {roi_scores.min():.4f}..{roi_scores.max():.4f}")
        # The roi graph's PT2 program (eager) on the chained run's inputs: tells the ONNX graph's own error from
        # what its inputs' differences do to the RoI pooling.
        same_inputs = run_graph("roi", o, chained=False)
        print("  roi graph on the chained inputs, ONNX Runtime - PT2 max abs: " + ", ".join(
            f"{n} {np.abs(o[n] - same_inputs[n]).max():.2e}" for n in ("cls_score", "bbox_pred")))
        names = ("bboxes_3d", "scores_3d", "labels_3d")
        _, why = match_rows([e[n] for n in names], [o[n] for n in names], tol)
        print(f"  detections: eager {len(e['bboxes_3d'])}, chained {len(o['bboxes_3d'])}; as a row set: {why or 'match'}")
        eb, ob = e["bboxes_3d"], o["bboxes_3d"]
        if not len(eb) or not len(ob):
            continue
        nearest = np.abs(eb[:, None, :] - ob[None, :, :]).max(-1).argmin(1)
        for i, j in enumerate(nearest):
            within = all(compare_arrays(e[n][i], o[n][j], tol)["passed"] for n in names)
            if not within:
                print(f"  eager row {i}: box {np.round(eb[i], 4)} score {e['scores_3d'][i]:.6f} label {e['labels_3d'][i]}"
                      f" | nearest chained row {j}: {np.round(ob[j], 4)} score {o['scores_3d'][j]:.6f} label "
                      f"{o['labels_3d'][j]} | abs diff {np.round(np.abs(eb[i] - ob[j]), 5)}")
        exact = run_float64(dict(np.load(folder / f"inputs/{sample}.npz")))
        for label, run in (("eager fp32", e), ("chained", o)):
            rois = (f"in order max abs {np.abs(run['rois'] - exact['rois']).max():.2e}"
                    if run["rois"].shape == exact["rois"].shape else "shape differs")
            order, rois_why = match_rows([exact["rois"], exact["roi_labels"]], [run["rois"], run["roi_labels"]], tol)
            # The roi graph's rows follow the RoIs: compared under the RoIs' permutation when they matched as a set.
            per_roi = ", ".join(f"{n} {np.abs(run[n][order] - exact[n]).max():.2e}" for n in ("cls_score", "bbox_pred")
                                ) if order is not None else "not compared (RoIs differ)"
            _, why = match_rows([exact[n] for n in names], [run[n] for n in names], tol)
            rpn = ", ".join(f"{n} {np.abs(run[n] - exact[n]).max():.2e}" for n in ("bbox_preds", "cls_preds"))
            print(f"  vs float64: {label}: {rpn}; rois {rois}, as a row set: {rois_why or 'match'}; {per_roi}; detections "
                  f"{len(run['bboxes_3d'])} of float64's {len(exact['bboxes_3d'])}, as a row set: {why or 'match'}")
