"""SingleStageMono3DDetector (FCOS3D, PGD, SMOKE, MonoFlex): mmdet3d's tensor mode, except for heads that take
the image metas."""

from __future__ import annotations

from typing import Any

from ..boundaries import TensorBoundary, tensor_mode_forward
from ..knowledge import KNOWLEDGE, register


def mono3d_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """SingleStageMono3DDetector's tensor mode, except that a head whose forward takes the image metas
    (ClassKnowledge.takes_image_metas) gets them: mmdet3d's `_forward` calls `bbox_head(x)` and never passes them."""
    if not KNOWLEDGE.value(model.bbox_head, "takes_image_metas", False):
        return tensor_mode_forward(model, inputs, data_samples)
    return model.bbox_head(model.extract_feat(inputs), [sample.metainfo for sample in data_samples])


register("SingleStageMono3DDetector", boundary=TensorBoundary(mono3d_forward, ("bbox_head",)))
