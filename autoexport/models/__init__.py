"""What autoexport knows about each mmdet3d class, one module per detector or component.

Importing this package imports every module listed in `MODULES`; each registers its classes into
`autoexport.knowledge.KNOWLEDGE`. To support a new class, add a module here (docs/contributing/add-a-model.md).
"""

from __future__ import annotations

import importlib

MODULES: tuple[str, ...] = (
    "base3d_detector",
    "mono3d",
    "monoflex_head",
    "mvx_two_stage",
    "voxelnet",
    "pillar_feature_net",
    "pillar_scatter",
    "anchor3d_head",
    "center_head",
    "segmentors",
    "cylinder3d",
    "minkunet",
    "h3dnet",
    "part_a2_rpn_head",
    "point_rcnn",
    "part_a2",
    "pv_rcnn",
    "imvotenet",
    "single_roi_extractor",
    "mmcv_ops",
    "torch_functions",
    "conv_transpose",
    "tensor_quantizer",
    "conv_module",
    "datasets",
    "bevfusion",
)

for _name in MODULES:
    importlib.import_module(f"{__name__}.{_name}")
