"""Cylinder3D: voxel logits gathered to per-point logits, with the point-to-voxel map as an input."""

from __future__ import annotations

from typing import Any

from ..boundaries import TensorBoundary
from ..errors import ExportFailedError
from ..knowledge import register


def point_to_voxel_map(model: Any, inputs: dict, data_samples: list, ordinal: int) -> dict:
    """Voxel segmentors (Cylinder3D): the data preprocessor maps each point to its voxel (point2voxel_map, on the
    data sample). The graph takes that map as an input, so it can return per-point logits as predict does."""
    if len(data_samples) != 1:
        raise ExportFailedError(f"{type(model).__name__}: one scene per batch only (predict maps points per sample)")
    # The raw cloud is not passed: the network reads only how many clouds there are, and voxels.voxels holds the
    # points already.
    return {"voxels": inputs["voxels"], "point2voxel_map": data_samples[0].point2voxel_map}


def voxel_segmentor_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """Cylinder3D's and MinkUNet's extract_feat and decode head: voxel logits (M, K) gathered to per-point logits
    (N, K), the logits their decode_head.predict returns for a one-scene batch."""
    voxels = dict(inputs["voxels"])  # extract_feat writes voxel_coors into it
    features = model.extract_feat({"points": [None], "voxels": voxels})  # points: only its length (batch) is read
    logits = model.decode_head.forward(features)
    logits = getattr(logits, "features", logits)  # Cylinder3D's head returns a sparse tensor, MinkUNet's a tensor
    return logits[inputs["point2voxel_map"].long()]


register("Cylinder3D", boundary=TensorBoundary(
    voxel_segmentor_forward, ("decode_head",), host_inputs=point_to_voxel_map,
    host_side="the data preprocessor's cylindrical voxelization gives voxels, coors and point2voxel_map; argmax of "
              "seg_logits over classes is each point's label"))
