"""Why PointRCNN's chained proposals differ: the rpn stage's PT2 program (equal to eager, stages.json) vs its ONNX
graph in ONNX Runtime on each zoo sample, then PointRPNHead.predict_by_feat (no weights involved) on each.

Usage: python benchmarks/point_rcnn_proposal_ties.py OUTPUT_DIR, the kept output of a PointRCNN export
(`autoexport zoo --family point_rcnn --keep` leaves OUTPUT_DIR as <config>.failed when the chain fails).
Prints one line per sample."""
import sys
import numpy as np
import torch
import onnxruntime as ort
from pathlib import Path
from autoexport.patches import eager_substitutions
from autoexport import analyze as A
from autoexport.configs import resolve_config
from autoexport.models.point_rcnn import POINT_RCNN_PLAN
from autoexport.split import StageContext
from mmdet3d.structures import LiDARInstance3DBoxes

folder = Path(sys.argv[1])
with eager_substitutions("cpu"):
    model = A.build_model(A.load_config(resolve_config("point-rcnn_8xb2_kitti-3d-3class")), "cpu", 0)
    ctx = StageContext(1, ({"box_type_3d": LiDARInstance3DBoxes},))
    prop = POINT_RCNN_PLAN.stages[1]
    prog = torch.export.load(str(folder / "stages/rpn/model.pt2")).module()
    sess = ort.InferenceSession(str(folder / "stages/rpn/model.onnx"))
    names = [o.name for o in sess.get_outputs()]
    for sample in ("sample_0", "sample_1", "heldout_0"):
        feed = dict(np.load(folder / f"inputs/{sample}.npz"))
        with torch.no_grad():
            ref = {n: v.numpy() for n, v in zip(names, prog(torch.from_numpy(feed["points_0"])))}
        got = dict(zip(names, sess.run(None, feed)))
        logit_diff = np.abs(got["cls_preds"] - ref["cls_preds"]).max()
        se = torch.sigmoid(torch.from_numpy(ref["cls_preds"])).max(-1)[0][0].numpy()
        so = torch.sigmoid(torch.from_numpy(got["cls_preds"])).max(-1)[0][0].numpy()
        top = np.sort(se)[::-1][:9000]
        gaps = -np.diff(top)
        order_e = np.argsort(-se, kind="stable")[:9000]
        order_o = np.argsort(-so, kind="stable")[:9000]
        def t(d: dict, feed: dict = feed) -> dict:
            return {"points_0": torch.from_numpy(feed["points_0"]), "bbox_preds": torch.from_numpy(d["bbox_preds"]),
                    "cls_preds": torch.from_numpy(d["cls_preds"])}
        with torch.no_grad():
            re, ro = prop.forward(model, t(ref), ctx)["rois"].numpy(), prop.forward(model, t(got), ctx)["rois"].numpy()
        match = np.abs(re[:, None, :] - ro[None, :, :]).max(-1) < 1e-3
        same = match.diagonal() if len(re) == len(ro) else np.zeros(1, bool)
        print(sample, f"cls logits ORT-eager max {logit_diff:.2e}; objectness {se.min():.4f}..{se.max():.4f}; score diff max "
              f"{np.abs(so - se).max():.2e}; top-9000: span {top[0] - top[-1]:.3f}, neighbour gaps median "
              f"{np.median(gaps):.2e}, {int((gaps < np.abs(so - se).max()).sum())} of 8999 below the score diff; "
              f"{int((order_e != order_o).sum())} ranks differ; proposals eager {len(re)} ORT {len(ro)}, "
              f"{int(match.any(1).sum())} of eager's also kept by ORT; same row order up to {int(np.argmin(same)) if not same.all() else len(same)}")
