"""The tensor manifest: every flat tensor of the model's nested inputs and outputs.

Dataclasses only, plus the helpers that flatten nested structures into (path, tensor) pairs.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch


@dataclass
class DynamicDim:
    """A dimension that varied between the analysis samples; shared by every tensor that carries it."""

    name: str
    observed: list[int]  # the value seen in each analysis sample
    min: int = 1
    max: int | None = None


@dataclass
class TensorSpec:
    """One flat input tensor: its argument name, where it lives in the nested inputs, and what it means."""

    name: str
    path: str
    shape: list[int]
    dtype: str
    dynamic_dims: dict[int, str] = field(default_factory=dict)  # dim index -> DynamicDim name
    description: str = ""
    mutated_by_model: bool = False  # the model writes into it in place; the wrapper copies it first


@dataclass
class OutputSpec:
    """One flat output tensor and its index path inside the model's raw (tensor-mode) outputs."""

    name: str
    index_path: list[int | str]
    shape: list[int]
    dtype: str
    dynamic_dims: dict[int, str] = field(default_factory=dict)


@dataclass
class Manifest:
    inputs: list[TensorSpec]
    outputs: list[OutputSpec]
    dims: dict[str, DynamicDim]
    structure: Any  # nested inputs with each tensor replaced by {"tensor": name}
    unused_inputs: list[str] = field(default_factory=list)  # paths the model never reads: left out
    batch_size: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "Manifest":
        return Manifest(
            inputs=[TensorSpec(**{**t, "dynamic_dims": {int(k): v for k, v in t["dynamic_dims"].items()}})
                    for t in data["inputs"]],
            outputs=[OutputSpec(**{**o, "dynamic_dims": {int(k): v for k, v in o["dynamic_dims"].items()}})
                     for o in data["outputs"]],
            dims={k: DynamicDim(**v) for k, v in data["dims"].items()},
            structure=data["structure"],
            unused_inputs=data.get("unused_inputs", []),
            batch_size=data.get("batch_size", 1),
        )

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]


PathParts = tuple[Any, ...]


def iter_tensors(obj: Any, prefix: PathParts = ()) -> Iterator[tuple[PathParts, torch.Tensor]]:
    """Depth-first (path, tensor) pairs of a nest of dicts, lists and tuples. Other leaves are skipped."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from iter_tensors(value, prefix + (key,))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from iter_tensors(value, prefix + (index,))


def get_by_path(obj: Any, path: PathParts) -> Any:
    for part in path:
        obj = obj[part]
    return obj


def path_to_str(path: PathParts) -> str:
    return ".".join(str(p) for p in path)


def path_to_identifier(path: str) -> str:
    """'inputs.voxels.num_points' -> 'voxels_num_points': a valid, readable Python/ONNX name."""
    if path.startswith("inputs."):
        path = path[len("inputs."):]
    elif (meta := parse_metainfo_path(path)) and meta[0] == 0:  # first batch item: just the key, e.g. lidar2img
        path = meta[1]
    return identifier(path)


def identifier(text: str) -> str:
    """A valid Python/ONNX name from any text: other characters become '_', and a leading digit, an empty result
    or a Python keyword gets a prefix or suffix (the generated wrapper uses these names as parameters)."""
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", str(text)).strip("_")
    name = name if name and not name[0].isdigit() else f"t_{name}"
    return f"{name}_" if keyword.iskeyword(name) or name in ("Tensor", "torch", "self") else name


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# What each input means, by mmdet3d's data preprocessor conventions (first match wins).
# Camera/lidar matrices in Det3DDataSample metainfo that a model may compute with. Those its tensor path reads
# become named inputs (path 'metainfo.<batch index>.<key>'), so one export serves every calibration.
METAINFO_TENSOR_KEYS: dict[str, str] = {
    "lidar2img": "lidar-to-image projection, 4x4 (per camera for multi-view)",
    "cam2img": "camera intrinsics (3x3 or 4x4, per camera for multi-view)",
    "lidar2cam": "lidar-to-camera extrinsics, 4x4",
    "cam2lidar": "camera-to-lidar extrinsics, 4x4",
    "depth2img": "depth-frame-to-image projection, 3x3 (K @ R, as SUN RGB-D's converter writes it)",
    "ego2img": "ego-to-image projection, 4x4",
    "img_aug_matrix": "image augmentation (resize/crop/flip) as a 4x4 matrix",
    "lidar_aug_matrix": "point cloud augmentation as a 4x4 matrix",
}

_INPUT_MEANINGS: list[tuple[str, str]] = [
    (r"voxels\.num_points$", "number of real points in each voxel (the rest of its rows are padding)"),
    (r"voxels\.coors$", "integer voxel coordinates (batch_index, z, y, x) of each voxel, or of each point when "
                        "voxels.voxels holds points (dynamic voxelization)"),
    (r"point2voxel_map$", "each point's row among the voxels (the data preprocessor's point2voxel_map)"),
    (r"voxels\.voxel_centers$", "metric center (x, y, z) of each voxel"),
    (r"points\.\d+$", "raw point cloud of one sample after the test pipeline: (num_points, point_features)"),
    (r"imgs$", "normalized, padded image batch"),
    (r"patches$", "a segmentor's point patches (num_patches, points_per_patch, point_features), cut on the host"),
    (r"img$", "normalized, padded image batch"),
]

# Names for dynamic dims, by (path pattern, dim index).
_DIM_MEANINGS: list[tuple[str, int, str]] = [
    (r"voxels\.(voxels|num_points|coors|voxel_centers)$", 0, "num_voxels"),
    (r"points\.\d+$", 0, "num_points"),
    (r"patches$", 0, "num_patches"),
    (r"point2voxel_map$", 0, "num_points"),
]


def metainfo_path(index: int, key: str) -> str:
    """Where a metainfo matrix input lives: 'metainfo.<batch index>.<key>'."""
    return f"metainfo.{index}.{key}"


def parse_metainfo_path(path: str) -> tuple[int, str] | None:
    """(batch index, key) of a metainfo input path; None for any other path."""
    match = re.fullmatch(r"metainfo\.(\d+)\.(\w+)", path)
    return (int(match.group(1)), match.group(2)) if match else None


# A model's own meaning for an input path, where the generic one is wrong for it (TensorBoundary.input_meanings):
# (path pattern, description, name of its dim 0).
InputMeaning = tuple[str, str, str]


def describe_input(path: str, rank: int | None = None, overrides: tuple[InputMeaning, ...] = ()) -> str:
    if meta := parse_metainfo_path(path):
        return METAINFO_TENSOR_KEYS.get(meta[1], "metainfo value")
    for pattern, meaning, _ in overrides:
        if re.search(pattern, path):
            return meaning
    if re.search(r"voxels\.voxels$", path):  # hard voxels are (voxels, points, features); dynamic ones are points
        return ("one row per point (num_points, point_features); coors gives its voxel (dynamic voxelization)"
                if rank == 2 else
                "points grouped per voxel/pillar (num_voxels, max_points_per_voxel, point_features), zero-padded")
    for pattern, meaning in _INPUT_MEANINGS:
        if re.search(pattern, path):
            return meaning
    return "model input"


def dim_name_for(path: str, dim: int, fallback_name: str, rank: int | None = None,
                 overrides: tuple[InputMeaning, ...] = ()) -> str:
    for pattern, _, dim0_name in overrides:
        if dim == 0 and re.search(pattern, path):
            return dim0_name
    if dim == 0 and rank == 2 and re.search(r"voxels\.voxels$", path):  # dynamic voxelization: one row per point
        return "num_points"
    for pattern, index, name in _DIM_MEANINGS:
        if index == dim and re.search(pattern, path):
            return name
    return f"{fallback_name}_dim{dim}"
