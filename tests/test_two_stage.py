"""Two-stage detectors' RoI graphs: a graph exported on one proposal count runs any other."""

from pathlib import Path

import numpy as np
import pytest
import torch

from autoexport.export import export_onnx
from autoexport.patches import PatchContext, eager_substitutions, export_patches
from autoexport.backends.onnxruntime import OnnxRuntimeRunner

PART_A2_CAR = "parta2_hv_secfpn_8xb2-cyclic-80e_kitti-3d-car"


def _pooled_grids(num_rois: int, channels: int, seed: int) -> torch.Tensor:
    """RoI-aware pooled features as PartA2's extractor gives them: most cells empty (exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.rand(num_rois, 14, 14, 14, channels, generator=g)
    occupied = torch.rand(num_rois, 14, 14, 14, 1, generator=g) < 0.04
    return grids * occupied


@pytest.mark.parametrize("export_rois, other_rois", [(6, 3)])
def test_part_a2_bbox_head_graph_takes_any_roi_count(tmp_path: Path, export_rois: int, other_rois: int) -> None:
    """PartA2BboxHead builds sparse tensors from nonzero() of the pooled grids and treats each RoI as a batch entry,
    so its sparse convs see a data-dependent site count and a symbolic batch size. The graph is exported on 6 RoIs
    (at most 8: the proposal count is capped by the RPN's nms_post) and checked on 3, in PT2 and ONNX Runtime."""
    import mmdet3d.models  # noqa: F401  registers the heads
    from mmdet3d.registry import MODELS
    from mmengine.registry import init_default_scope

    from autoexport.analyze import load_config
    from autoexport.configs import resolve_config

    init_default_scope("mmdet3d")
    torch.manual_seed(0)
    head = MODELS.build(load_config(resolve_config(PART_A2_CAR)).model.roi_head.bbox_head).eval()  # the shipped config's head
    head.init_weights()

    def inputs(num_rois: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = _pooled_grids(num_rois, 4, seed)
        seg = torch.randn(num_rois, 14, 14, 14, 16, generator=torch.Generator().manual_seed(seed + 1))
        return seg * (part.sum(-1, keepdim=True) != 0), part

    # BatchNorm statistics from other grids, as autoexport sets them for random weights: with the defaults the
    # head's outputs are ~1e-11 and any tolerance would pass.
    norms = [m for m in head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad(), eager_substitutions("cpu"):  # mmcv's sparse convs have no CPU kernel
        head(*inputs(8, 100))
        head.eval()
        expected = {n: head(*inputs(n, n)) for n in (export_rois, other_rois)}
    rois = torch.export.Dim("num_rois", min=1, max=8)
    with torch.no_grad(), export_patches(head, PatchContext(batch_size=1)):
        program = torch.export.export(head, inputs(export_rois, export_rois),
                                      dynamic_shapes=({0: rois}, {0: rois}))
    onnx_path = tmp_path / "bbox_head.onnx"
    export_onnx(program, ["seg_feats", "part_feats"], ["cls_score", "bbox_pred"], onnx_path)
    runner = OnnxRuntimeRunner(onnx_path, ["seg_feats", "part_feats"], ["cls_score", "bbox_pred"])
    for num_rois, (cls_score, bbox_pred) in expected.items():
        assert cls_score.shape == (num_rois, 1) and bbox_pred.shape == (num_rois, 7)
        seg, part = inputs(num_rois, num_rois)
        got = program.module()(seg, part)
        torch.testing.assert_close(got[0], cls_score, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], bbox_pred, rtol=1e-5, atol=1e-5)
        onnx_out = runner.infer({"seg_feats": seg.numpy(), "part_feats": part.numpy()})
        np.testing.assert_allclose(onnx_out["cls_score"], cls_score.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(onnx_out["bbox_pred"], bbox_pred.numpy(), rtol=1e-4, atol=1e-4)
    # Outputs at the scale of a trained head's, and another RoI's grid gives another score.
    assert float(expected[export_rois][1].abs().mean()) > 1e-3
    assert not torch.allclose(expected[export_rois][0][:other_rois], expected[other_rois][0])
