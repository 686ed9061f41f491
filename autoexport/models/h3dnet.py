"""H3DNet: RPN, primitive heads and refinement as one graph up to the final NMS."""

from __future__ import annotations

from typing import Any

from ..boundaries import TensorBoundary
from ..errors import ExportFailedError
from ..knowledge import register


def h3dnet_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """H3DNet.predict up to its final NMS. Its proposals are the vote head's boxes decoded without NMS
    (test_cfg.rpn.use_nms=False), so RPN, primitive heads and refinement are one graph. Outputs: the vote head's
    predictions and the refinement head's (*_optimized), what H3DBboxHead.predict_by_feat decodes."""
    if model.test_cfg.rpn.get("use_nms", True):
        raise ExportFailedError("H3DNet with test_cfg.rpn.use_nms=True has an NMS between its stages; the tensor "
                                "boundary covers use_nms=False (the shipped configs)")
    feats = model.extract_feat(inputs)
    # As H3DNet.predict: the refinement reads the last decoder level of the first backbone.
    feats["fp_xyz"] = [feats["fp_xyz_net0"][-1]]
    feats["fp_features"] = [feats["hd_feature"]]
    feats["fp_indices"] = [feats["fp_indices_net0"][-1]]
    rpn_preds = model.rpn_head(feats)
    feats.update(rpn_preds)
    metas = [sample.metainfo for sample in data_samples]
    feats["rpn_proposals"] = model.rpn_head.predict_by_feat(inputs["points"], rpn_preds, metas, use_nms=False)
    roi_head = model.roi_head
    for primitive in (roi_head.primitive_z, roi_head.primitive_xy, roi_head.primitive_line):
        feats.update(primitive(feats))
    refined = roi_head.bbox_head(feats)
    return {**rpn_preds, **refined}


register("H3DNet", boundary=TensorBoundary(
    h3dnet_forward, ("rpn_head",),
    host_side="H3DBboxHead.predict_by_feat: decode the *_optimized boxes with the vote head's size/dir classes, "
              "then its multiclass NMS"))
