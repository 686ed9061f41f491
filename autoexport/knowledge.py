"""What autoexport knows about mmdet3d classes, by class name.

Each module of `autoexport.models` registers what it knows about one mmdet3d class (or one component family):
its tensor path, output names, export patches, split plan, static padding rule, detection decoder, FP16
sections, ... as one `ClassKnowledge` entry. Lookups walk the class's MRO, so an entry for `Anchor3DHead` also
covers its subclasses unless a subclass sets the same field itself. The pipeline never branches on model names.

Adding support for a class means adding one module under autoexport/models/ (docs/contributing/add-a-model.md).
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator

# A split plan entry that says "this class has no plan", so that a base class's plan is not inherited
# (DynamicMVXFasterRCNN's dynamic voxels do not fit MVXTwoStageDetector's hard-voxel plan).
NO_SPLIT_PLAN = "no split plan"


@dataclass(frozen=True)
class ClassKnowledge:
    """Everything autoexport knows about one class. Fields left at their default say nothing (the MRO decides)."""

    # Detectors: where the exported graph starts and ends (boundaries.TensorBoundary).
    boundary: Any = None
    # Heads: how the flat outputs are named, path -> name (boundaries.OutputNamer).
    output_namer: Callable[[tuple], str] | None = None
    # Dense heads whose forward takes the batch's image metas besides the features.
    takes_image_metas: bool | None = None
    # Methods replaced while exporting (patching.ExportPatch), restored afterwards.
    patches: tuple[Any, ...] = ()
    # Detectors: the stages of a split export (plan.SplitPlan, a function of the model giving one, or NO_SPLIT_PLAN).
    split_plan: Any = None
    # Modules consuming padded rows: how rows past the count are made inert (padding.PaddingRule).
    padding: Any = None
    # Heads: raw outputs -> boxes with the head's own decoding, and the test_cfg key of its score threshold.
    decoder: Callable[[Any, Any, list[dict]], list[Any]] | None = None
    score_threshold_key: str | None = None
    # Detectors: the dense sections (attribute names, in forward order) that --precision fp16 converts.
    fp16_sections: tuple[str, ...] | None = None
    # Modules whose layers stay float under --precision int8 unless the user says otherwise: why.
    keep_float_in_int8: str | None = None
    # Modules holding a layer followed by its norm: module -> (layer attribute, norm attribute) or None.
    batchnorm_pair: Callable[[Any], tuple[str, str] | None] | None = None
    # Dataset classes: the camera rig of synthesized camera samples (camera.CameraRig).
    camera_rig: Any = None
    # Heads: the points-in, boxes-out detection graph (detections.DetectionHead).
    detection_head: Any = None

    def merged(self, other: "ClassKnowledge", class_name: str) -> "ClassKnowledge":
        """Both entries' fields; a field set by both is an error, except patches, which add up."""
        changes = {}
        for field in fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if field.name == "patches":
                changes["patches"] = mine + theirs
            elif _is_set(theirs):
                if _is_set(mine):
                    raise ValueError(f"{class_name}: {field.name} registered twice")
                changes[field.name] = theirs
        return replace(self, **changes)


def _is_set(value: Any) -> bool:
    return value is not None and value != ()


class KnowledgeRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, ClassKnowledge] = {}
        self._homes: dict[str, list[str]] = {}  # class name -> the modules that registered it
        self._loaded = False

    def register(self, class_name: str, *, home: str | None = None, **knowledge: Any) -> ClassKnowledge:
        """Adds knowledge about `class_name`; `home` is the registering module (the caller's, by default)."""
        home = home or sys._getframe(1).f_globals.get("__name__", "?")
        if home not in self._homes.setdefault(class_name, []):
            self._homes[class_name].append(home)
        entry = ClassKnowledge(**knowledge)
        existing = self._entries.get(class_name)
        self._entries[class_name] = existing.merged(entry, class_name) if existing else entry
        return self._entries[class_name]

    def load(self) -> None:
        if not self._loaded:
            self._loaded = True  # set first: the modules' own imports may look things up
            try:
                importlib.import_module("autoexport.models")  # each module registers its classes on import
            except BaseException:
                self._loaded = False
                raise

    def lookup(self, obj_or_cls: object, field: str) -> tuple[str, Any] | None:
        """(class name, value) of `field` for the nearest class in the MRO that sets it, or None."""
        self.load()
        cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
        for klass in cls.__mro__:
            entry = self._entries.get(klass.__name__)
            if entry is not None and _is_set(getattr(entry, field)):
                return klass.__name__, getattr(entry, field)
        return None

    def value(self, obj_or_cls: object, field: str, default: Any = None) -> Any:
        found = self.lookup(obj_or_cls, field)
        return found[1] if found else default

    @contextmanager
    def overridden(self, class_name: str, entry: ClassKnowledge | None = None, **knowledge: Any) -> Iterator[None]:
        """Within the block, `class_name` has exactly this knowledge (an empty entry when none is given); the
        previous entry comes back after. For tests, and for trying a registration before adding a module."""
        self.load()
        previous = self._entries.get(class_name)
        self._entries[class_name] = entry if entry is not None else ClassKnowledge(**knowledge)
        try:
            yield
        finally:
            if previous is None:
                del self._entries[class_name]
            else:
                self._entries[class_name] = previous

    def homes(self, class_name: str) -> list[str]:
        """The modules that registered knowledge about `class_name`: one, in autoexport/models/, for mmdet3d's."""
        self.load()
        return list(self._homes.get(class_name, []))

    def get(self, class_name: str) -> ClassKnowledge | None:
        self.load()
        return self._entries.get(class_name)

    def with_field(self, field: str) -> Iterator[tuple[str, Any]]:
        """(class name, value) of every class that sets `field`."""
        self.load()
        for name, entry in list(self._entries.items()):
            if _is_set(getattr(entry, field)):
                yield name, getattr(entry, field)

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)


KNOWLEDGE = KnowledgeRegistry()
register = KNOWLEDGE.register

__all__ = ["ClassKnowledge", "KNOWLEDGE", "KnowledgeRegistry", "NO_SPLIT_PLAN", "register"]
