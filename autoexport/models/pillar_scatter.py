"""PointPillarsScatter: one index_put scatter with a static batch size, and how padded rows are made inert."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..knowledge import register
from ..patches import ExportPatch, PatchContext, register_patch
from ..padding import PaddingRule


def _make_static_batch_scatter(context: PatchContext) -> Callable[..., torch.Tensor]:
    batch_size = context.batch_size
    # Padded exports send inert rows to batch index == batch_size: one spare canvas row, cut off below.
    canvas_rows = batch_size + 1 if context.spare_batch_row else batch_size

    def forward(self: Any, voxel_features: torch.Tensor, coors: torch.Tensor, batch_size_arg: Any = None) -> torch.Tensor:
        # One index_put into a (batch, ny, nx) canvas replaces the per-sample loop with boolean masks.
        # Voxel coordinates are unique per sample, so no two rows land on the same cell.
        coors = coors.long()
        cell = (coors[:, 0] * self.ny + coors[:, 2]) * self.nx + coors[:, 3]
        canvas = voxel_features.new_zeros(canvas_rows * self.ny * self.nx, self.in_channels)
        canvas = canvas.index_put((cell,), voxel_features)[:batch_size * self.ny * self.nx]
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


def _test_max_voxels(model: torch.nn.Module) -> int | None:
    # Hard voxelization never produces more voxels per sample than its test-time max_voxels.
    layer = getattr(getattr(model, "data_preprocessor", None), "voxel_layer", None)
    max_voxels = getattr(layer, "max_voxels", None)
    if isinstance(max_voxels, (tuple, list)) and len(max_voxels) == 2:
        return int(max_voxels[1])
    return int(max_voxels) if isinstance(max_voxels, int) else None


# Pillar models: the voxel encoder works row by row, so a padded row only matters where the scatter writes it.
# num_points=1 keeps the cluster mean finite (0 would give NaN), and batch index == batch_size sends the row to
# a spare canvas row that the patched scatter drops before the backbone.
register("PointPillarsScatter", padding=PaddingRule(
    dim="num_voxels",
    fills={"voxels.voxels": lambda b: 0.0, "voxels.num_points": lambda b: 1, "voxels.coors": lambda b: [b, 0, 0, 0]},
    capacity_from=_test_max_voxels,
    spare_batch_row=True,
    reason="rows >= num_voxels get num_points=1, zero points and batch index = batch size, so they land in a "
           "spare canvas row that is dropped before the backbone",
))
