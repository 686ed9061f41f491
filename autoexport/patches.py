"""Export patches: replacements for mmdet3d methods that torch.export cannot trace.

Each patch is keyed by the mmdet3d class that defines the method. Patches are applied to that
class only inside `export_patches(...)` and restored on exit, so eager PyTorch (the parity
reference) always runs mmdet3d's original code and parity proves each patch is faithful.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .registry import ClassRegistry


@dataclass(frozen=True)
class PatchContext:
    """Facts fixed for one export that patches may rely on."""

    batch_size: int  # number of samples per call: static in the exported graph


@dataclass(frozen=True)
class ExportPatch:
    target: str  # mmdet3d class that defines `method`
    method: str
    reason: str  # why the original cannot be exported (recorded in metadata.json)
    make: Callable[[PatchContext], Callable[..., Any]]  # builds the replacement method


EXPORT_PATCHES: ClassRegistry[list[ExportPatch]] = ClassRegistry("export patches")


def register_patch(patch: ExportPatch) -> ExportPatch:
    existing = EXPORT_PATCHES.get(patch.target)
    if existing is not None:
        existing.append(patch)
    else:
        EXPORT_PATCHES.register(patch.target, [patch])
    return patch


@dataclass(frozen=True)
class AppliedPatch:
    target: str
    method: str
    reason: str
    module_paths: tuple[str, ...]  # where in the model the patched class is used


def patches_for(model: torch.nn.Module) -> list[tuple[type, ExportPatch, list[str]]]:
    """Every registered patch whose target class appears in the model's module tree (or is the model)."""
    found: dict[tuple[type, str], tuple[type, ExportPatch, list[str]]] = {}
    for module_path, module in model.named_modules():
        for klass in type(module).__mro__:
            for name, patches in EXPORT_PATCHES.items():
                if klass.__name__ != name:
                    continue
                for patch in patches:
                    key = (klass, patch.method)
                    entry = found.setdefault(key, (klass, patch, []))
                    entry[2].append(module_path or "<model>")
    return list(found.values())


@contextmanager
def export_patches(model: torch.nn.Module, context: PatchContext) -> Iterator[list[AppliedPatch]]:
    """Apply every relevant patch to its class for the duration of the block, then restore."""
    saved: list[tuple[type, str, Any]] = []
    applied: list[AppliedPatch] = []
    _missing = object()
    try:
        for klass, patch, module_paths in patches_for(model):
            saved.append((klass, patch.method, klass.__dict__.get(patch.method, _missing)))
            setattr(klass, patch.method, patch.make(context))
            applied.append(AppliedPatch(patch.target, patch.method, patch.reason, tuple(module_paths)))
        yield applied
    finally:
        for klass, method, original in reversed(saved):
            if original is _missing:
                delattr(klass, method)
            else:
                setattr(klass, method, original)


# ---- PointPillarsScatter ------------------------------------------------------------------------

def _make_static_batch_scatter(context: PatchContext) -> Callable[..., torch.Tensor]:
    batch_size = context.batch_size

    def forward(self: Any, voxel_features: torch.Tensor, coors: torch.Tensor, batch_size_arg: Any = None) -> torch.Tensor:
        # One index_put into a (batch, ny, nx) canvas replaces the per-sample loop with boolean masks.
        # Voxel coordinates are unique per sample, so no two rows land on the same cell.
        coors = coors.long()
        cell = (coors[:, 0] * self.ny + coors[:, 2]) * self.nx + coors[:, 3]
        canvas = voxel_features.new_zeros(batch_size * self.ny * self.nx, self.in_channels)
        canvas = canvas.index_put((cell,), voxel_features)
        return canvas.view(batch_size, self.ny, self.nx, self.in_channels).permute(0, 3, 1, 2).contiguous()

    return forward


register_patch(ExportPatch(
    target="PointPillarsScatter",
    method="forward",
    reason=("forward_batch loops over range(batch_size) with boolean masks, and the batch size comes from "
            "coors[-1, 0] (data-dependent: GuardOnDataDependentSymNode); replaced by one index_put scatter "
            "into a canvas with the export's static batch size"),
    make=_make_static_batch_scatter,
))


# ---- VoxelNet -----------------------------------------------------------------------------------

def _make_voxelnet_extract_feat(context: PatchContext) -> Callable[..., Any]:
    batch_size = context.batch_size

    def extract_feat(self: Any, batch_inputs_dict: dict) -> Any:
        voxel_dict = batch_inputs_dict["voxels"]
        voxel_features = self.voxel_encoder(voxel_dict["voxels"], voxel_dict["num_points"], voxel_dict["coors"])
        # The original reads the batch size with coors[-1, 0].item() + 1; it is static here.
        x = self.middle_encoder(voxel_features, voxel_dict["coors"], batch_size)
        x = self.backbone(x)
        if self.with_neck:
            x = self.neck(x)
        return x

    return extract_feat


register_patch(ExportPatch(
    target="VoxelNet",
    method="extract_feat",
    reason="computes the batch size with coors[-1, 0].item() + 1, a data-dependent scalar; the export's batch size is static",
    make=_make_voxelnet_extract_feat,
))
