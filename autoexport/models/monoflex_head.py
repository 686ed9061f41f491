"""MonoFlexHead: takes the image metas (its edge fusion samples the image border, reading pad_shape and img_shape,
so in the graph they are constants of the export samples' image size)."""

from __future__ import annotations

from ..boundaries import level_suffixed
from ..knowledge import register


# Sigmoid heatmap (clamped to [1e-4, 1 - 1e-4]) and the 8 regression groups concatenated (50 channels).
register("MonoFlexHead", takes_image_metas=True, output_namer=level_suffixed(("cls_score", "bbox_pred")))
