"""Base3DDetector: mmengine's own tensor mode is the tensor path of every mmdet3d detector that has one
(VoxelNet, SingleStage3DDetector, ...); the subclasses whose tensor mode cannot run register their own."""

from __future__ import annotations

from ..boundaries import TensorBoundary, tensor_mode_forward
from ..knowledge import register


register("Base3DDetector", boundary=TensorBoundary(tensor_mode_forward, ("bbox_head",)),
         fp16_sections=("backbone", "neck", "bbox_head"))
