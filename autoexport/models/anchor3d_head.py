"""Anchor3DHead and its variants (PointPillars, SECOND, RegNet, free-anchor, shape-aware heads): output names
per level, the head's own decoding for fidelity reports, its score threshold key."""

from __future__ import annotations

from ..boundaries import level_suffixed
from ..knowledge import register

_ANCHOR_OUTPUTS = ("cls_score", "bbox_pred", "dir_cls_pred")


register("Anchor3DHead", output_namer=level_suffixed(_ANCHOR_OUTPUTS),
         decoder=lambda head, outs, metas: head.predict_by_feat(*outs, batch_input_metas=metas),
         score_threshold_key="score_thr")
register("FreeAnchor3DHead", output_namer=level_suffixed(_ANCHOR_OUTPUTS))
register("ShapeAwareHead", output_namer=level_suffixed(_ANCHOR_OUTPUTS))
