"""Stage 2b for --precision fp16: a copy of the model whose dense sections (backbone, neck, head) run in FP16.

Sections are registered per detector class in autoexport/models/ (ClassKnowledge.fp16_sections). Their parameters become FP16; FP32 tensors entering a
section are cast to FP16 and the last section's outputs back to FP32, so the exported graph
keeps FP32 inputs and outputs and the casts are explicit ops in it. Voxel/pillar encoders stay in FP32: they
subtract pillar centres from coordinates of tens of metres, where FP16 keeps only ~3 cm steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserInputError
from .knowledge import KNOWLEDGE

@dataclass
class HalfResult:
    model: torch.nn.Module
    sections: list[str]  # attributes converted, in forward order
    float_sections: list[str]  # the model's other top-level children, kept in FP32

    def to_json(self) -> dict:
        return {"fp16_sections": self.sections, "fp32_sections": self.float_sections}


def _cast(obj: Any, source: torch.dtype, target: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(target) if obj.dtype == source else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(v, source, target) for v in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, source, target) for k, v in obj.items()}
    return obj


def _cast_around_forward(module: torch.nn.Module, cast_outputs: bool) -> None:
    """FP32 tensors entering `module` become FP16; with cast_outputs, its FP16 outputs become FP32. Done on the
    instance's forward, not with hooks: mmdet3d calls some heads as `self.bbox_head.forward(x)`, past the hooks."""
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = original(*_cast(args, torch.float32, torch.float16), **_cast(kwargs, torch.float32, torch.float16))
        return _cast(out, torch.float16, torch.float32) if cast_outputs else out

    module.forward = forward


def to_fp16(model: torch.nn.Module) -> HalfResult:
    found = KNOWLEDGE.lookup(model, "fp16_sections")
    sections = [name for name in (found[1] if found else ()) if getattr(model, name, None) is not None]
    if not sections:
        raise UserInputError(f"no FP16 sections are registered for {type(model).__name__} "
                             "(ClassKnowledge.fp16_sections in autoexport/models/); --precision fp16 does not know what to convert")
    half = copy.deepcopy(model)
    for index, name in enumerate(sections):
        module = getattr(half, name)
        module.half()
        _cast_around_forward(module, cast_outputs=index == len(sections) - 1)
    others = [name for name, _ in half.named_children() if name not in sections]
    return HalfResult(half, sections, others)
