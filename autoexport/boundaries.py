"""Where the exported graph starts and ends for each detector family, and how its outputs are named.

The boundary is the model's tensor path: voxelized/preprocessed inputs in, raw head outputs out.
Decoding boxes (anchors, NMS) stays on the host and is described in metadata.json instead.
Generated wrappers import the forward functions below by name, so keep them stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .registry import ClassRegistry

TensorForward = Callable[[Any, dict, list], Any]


@dataclass(frozen=True)
class TensorBoundary:
    forward_name: str  # name of a function in this module: (model, inputs, data_samples) -> raw outputs
    head_attrs: tuple[str, ...]  # attributes of the detector holding the dense head(s), for naming/metadata


def tensor_mode_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """mmengine's own tensor mode: backbone + neck + head forward, no post-processing."""
    return model(inputs, data_samples, mode="tensor")


def mvx_two_stage_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """MVXTwoStageDetector (CenterPoint, MVX-Net) leaves `_forward` unimplemented; this is its tensor path."""
    metas = [sample.metainfo for sample in data_samples]
    img_feats, pts_feats = model.extract_feat(inputs, metas)
    outputs: dict[str, Any] = {}
    if pts_feats is not None and model.with_pts_bbox:
        outputs["pts"] = model.pts_bbox_head(pts_feats)
    if img_feats is not None and getattr(model, "with_img_bbox", False):
        outputs["img"] = model.img_bbox_head(img_feats)
    # A single branch is returned bare so output names stay short.
    return outputs["pts"] if list(outputs) == ["pts"] else outputs


BOUNDARIES: ClassRegistry[TensorBoundary] = ClassRegistry("tensor boundary")
BOUNDARIES.register("Base3DDetector", TensorBoundary("tensor_mode_forward", ("bbox_head",)))
BOUNDARIES.register("MVXTwoStageDetector", TensorBoundary("mvx_two_stage_forward", ("pts_bbox_head", "img_bbox_head")))


def boundary_for(model: Any) -> tuple[TensorBoundary, TensorForward]:
    found = BOUNDARIES.lookup(model)
    if found is None:
        # Not an mmdet3d detector: fall back to mmengine's tensor mode, which every BaseModel has.
        boundary = TensorBoundary("tensor_mode_forward", ())
    else:
        boundary = found[1]
    return boundary, globals()[boundary.forward_name]


def heads_of(model: Any, boundary: TensorBoundary) -> list[Any]:
    return [h for attr in boundary.head_attrs if (h := getattr(model, attr, None)) is not None]


# ---- output naming ------------------------------------------------------------------------------

OutputNamer = Callable[[tuple], str]
OUTPUT_NAMERS: ClassRegistry[OutputNamer] = ClassRegistry("output namer")


def _level_suffixed(names: tuple[str, ...]) -> OutputNamer:
    """Heads returning (per-kind lists over FPN levels): path (kind, level) -> f'{kind}_{level}'."""

    def name(path: tuple) -> str:
        if len(path) == 2 and isinstance(path[0], int) and path[0] < len(names):
            return f"{names[path[0]]}_{path[1]}"
        return default_output_name(path)

    return name


OUTPUT_NAMERS.register("Anchor3DHead", _level_suffixed(("cls_score", "bbox_pred", "dir_cls_pred")))
OUTPUT_NAMERS.register("FreeAnchor3DHead", _level_suffixed(("cls_score", "bbox_pred", "dir_cls_pred")))
OUTPUT_NAMERS.register("ShapeAwareHead", _level_suffixed(("cls_score", "bbox_pred", "dir_cls_pred")))


@OUTPUT_NAMERS.decorator("CenterHead")
def _center_head_name(path: tuple) -> str:
    # CenterHead.forward -> multi_apply over levels of per-task dict lists: path (task, level, key).
    if len(path) == 3 and isinstance(path[2], str):
        task, level, key = path
        return f"{key}_task{task}" + (f"_level{level}" if level else "")
    return default_output_name(path)


def default_output_name(path: tuple) -> str:
    return "out_" + "_".join(str(p) for p in path) if path else "out"


def output_namer_for(model: Any, boundary: TensorBoundary) -> OutputNamer:
    heads = heads_of(model, boundary)
    if len(heads) == 1:
        found = OUTPUT_NAMERS.lookup(heads[0])
        if found is not None:
            return found[1]
    return default_output_name
