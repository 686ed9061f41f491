"""mmdet's SingleRoIExtractor (ImVoteNet's image RoI head): every FPN level on every RoI, without nonzero()."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..patches import ExportPatch, PatchContext, register_patch


def _make_single_roi_extractor_forward(context: PatchContext) -> Callable[..., Any]:
    def forward(self: Any, feats: tuple, rois: torch.Tensor, roi_scale_factor: float | None = None) -> torch.Tensor:
        # mmdet pools each FPN level's RoIs by rois[mask.nonzero()] under `if inds.numel() > 0`, a branch on a
        # data-dependent count. Here every level runs on every row, and the rows of other levels are collapsed to
        # an empty box first (their RoIAlign samples nothing), so each RoI is pooled once, from its own level, with
        # mmdet's arithmetic; torch.where keeps its level's result.
        rois = rois.type_as(feats[0])
        out_size = self.roi_layers[0].output_size
        if len(feats) == 1:
            return self.roi_layers[0](feats[0], rois)
        levels = self.map_roi_levels(rois, len(feats))
        if roi_scale_factor is not None:
            rois = self.roi_rescale(rois, roi_scale_factor)
        empty = torch.cat([rois[:, :1], torch.zeros_like(rois[:, 1:])], dim=1)
        roi_feats = feats[0].new_zeros(rois.shape[0], self.out_channels, *out_size)
        for level, layer in enumerate(self.roi_layers[:len(feats)]):
            mine = (levels == level)[:, None]
            pooled = layer(feats[level], torch.where(mine, rois, empty))
            roi_feats = torch.where(mine[:, :, None, None], pooled, roi_feats)
        return roi_feats

    return forward


register_patch(ExportPatch(
    target="SingleRoIExtractor",
    method="forward",
    reason=("pools each FPN level's RoIs through nonzero() under a branch on their count (data-dependent); every "
            "level runs on every RoI with the other levels' rows collapsed to empty boxes, and torch.where keeps "
            "each RoI's own level"),
    make=_make_single_roi_extractor_forward,
))
