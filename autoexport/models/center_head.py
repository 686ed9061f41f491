"""CenterHead (CenterPoint): output names per task, the head's own decoding, its score threshold key."""

from __future__ import annotations

from ..boundaries import default_output_name
from ..knowledge import register


def center_head_output_name(path: tuple) -> str:
    # CenterHead.forward -> multi_apply over levels of per-task dict lists: path (task, level, key).
    if len(path) == 3 and isinstance(path[2], str):
        task, level, key = path
        return f"{key}_task{task}" + (f"_level{level}" if level else "")
    return default_output_name(path)


register("CenterHead", output_namer=center_head_output_name,
         decoder=lambda head, outs, metas: head.predict_by_feat(outs, metas), score_threshold_key="score_threshold")
