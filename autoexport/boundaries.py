"""Where the exported graph starts and ends, and how its outputs are named: the mechanism.

The boundary is the model's tensor path: preprocessed inputs in, raw head outputs out. Each detector's boundary is
registered by its module in autoexport.models (ClassKnowledge.boundary); heads register their output namers there.
Decoding boxes (anchors, NMS) stays on the host and is described in metadata.json instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .knowledge import KNOWLEDGE
from .manifest import InputMeaning

TensorForward = Callable[[Any, dict, list], Any]  # (model, inputs, data_samples) -> raw outputs
HostInputs = Callable[[Any, dict, list, int], dict]  # (model, inputs, data_samples, ordinal) -> the graph's inputs


@dataclass(frozen=True)
class TensorBoundary:
    forward: TensorForward
    head_attrs: tuple[str, ...]  # attributes of the detector holding the dense head(s), for naming/metadata
    # For models whose inference starts with host-side work the graph should not hold: the data preprocessor's
    # inputs turned into the graph's.
    host_inputs: HostInputs | None = None
    host_side: str = ""  # what the host does around the graph, for metadata.json
    # Non-empty for detectors whose one graph is only their first stage (a host-side NMS feeds the second): why;
    # the pipeline then always runs the split export (the class's split plan), which carries the whole model.
    split_required: str = ""
    # Where the manifest's generic meaning of an input is wrong for this model, e.g. MinkUNet's voxels.voxels holds
    # one point per voxel, not every point.
    input_meanings: tuple[InputMeaning, ...] = ()
    # Output names where the head's own namer does not apply (the detections scope names its outputs itself).
    output_namer: Callable[[tuple], str] | None = None
    # Keyword arguments the generated wrapper passes to autoexport.runtime.tensor_forward (the scope and its
    # constants); empty for the network scope, whose path is looked up by the model's class.
    forward_options: dict[str, Any] = field(default_factory=dict)
    # Outputs whose rows form one unordered set (verify.Comparator.row_sets), e.g. the detections scope's boxes.
    row_sets: tuple[tuple[str, ...], ...] = ()

    @property
    def forward_name(self) -> str:
        return self.forward.__name__


def tensor_mode_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """mmengine's own tensor mode: backbone + neck + head forward, no post-processing."""
    return model(inputs, data_samples, mode="tensor")


def predict_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """mmengine's predict mode: the whole model, post-processing included (not exportable; eager runs only)."""
    return model(inputs, data_samples, mode="predict")


def nms_between_stages(detector: str) -> str:
    """Why a two-stage detector's one graph is only its first stage (TensorBoundary.split_required)."""
    return (f"{detector}'s RoI head runs on proposals chosen by an NMS on the host, so the model is two graphs with "
            "host steps between them")


# Not an mmdet3d detector: mmengine's tensor mode, which every BaseModel has.
_FALLBACK = TensorBoundary(tensor_mode_forward, ())


def boundary_for(model: Any) -> tuple[TensorBoundary, TensorForward]:
    boundary = KNOWLEDGE.value(model, "boundary", _FALLBACK)
    return boundary, boundary.forward


def describe_boundary(model: Any) -> str:
    """The model class, its tensor path and the class it is registered for, for error messages."""
    found = KNOWLEDGE.lookup(model, "boundary")
    forward = found[1].forward_name if found else _FALLBACK.forward_name
    entry = f"registered for {found[0]}" if found else "mmengine's tensor mode, no entry in autoexport/models/"
    return f"{type(model).__name__} (tensor path {forward}, {entry})"


def heads_of(model: Any, boundary: TensorBoundary) -> list[Any]:
    return [h for attr in boundary.head_attrs if (h := getattr(model, attr, None)) is not None]


# ---- output naming ------------------------------------------------------------------------------

OutputNamer = Callable[[tuple], str]


def level_suffixed(names: tuple[str, ...]) -> OutputNamer:
    """Heads returning (per-kind lists over FPN levels): path (kind, level) -> f'{kind}_{level}'."""

    def name(path: tuple) -> str:
        if len(path) == 2 and isinstance(path[0], int) and path[0] < len(names):
            return f"{names[path[0]]}_{path[1]}"
        return default_output_name(path)

    return name


def dict_key_name(path: tuple) -> str:
    """Heads whose outputs autoexport's boundaries return as a dict of named tensors: the keys."""
    return path[0] if len(path) == 1 and isinstance(path[0], str) else default_output_name(path)


def default_output_name(path: tuple) -> str:
    return "out_" + "_".join(str(p) for p in path) if path else "out"


def output_namer_for(model: Any, boundary: TensorBoundary) -> OutputNamer:
    if boundary.output_namer is not None:
        return boundary.output_namer
    heads = heads_of(model, boundary)
    if len(heads) == 1:
        return KNOWLEDGE.value(heads[0], "output_namer", default_output_name)
    return default_output_name
