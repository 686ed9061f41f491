"""ImVoteNet's image branch (a Faster R-CNN): the RoI extractor patch pools what mmdet pools, and the split export
chains its graphs and host steps to the same 2D detections as mmdet3d's stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoexport.models.single_roi_extractor import _make_single_roi_extractor_forward
from autoexport.patches import PatchContext

IMVOTENET_IMAGE = "imvotenet_faster-rcnn-r50_fpn_4xb2_sunrgbd-3d"
IMVOTENET_STAGE2 = "imvotenet_stage2_8xb16_sunrgbd-3d"


def _roi_extractor() -> torch.nn.Module:
    import mmdet.models  # noqa: F401  registers the extractor
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from autoexport.analyze import load_config
    from autoexport.configs import resolve_config

    init_default_scope("mmdet")
    return MODELS.build(load_config(resolve_config(IMVOTENET_IMAGE)).model.img_roi_head.bbox_roi_extractor).eval()


def _rois(count: int, seed: int, image_size: tuple[int, int] = (480, 640)) -> torch.Tensor:
    """Boxes from 4 to 600 pixels on a side (every FPN level gets some) in a batch of two images."""
    g = torch.Generator().manual_seed(seed)
    sides = torch.exp(torch.empty(count, 2).uniform_(1.4, 6.4, generator=g))
    corners = torch.rand(count, 2, generator=g) * torch.tensor(image_size[::-1], dtype=torch.float32)
    batch = torch.randint(0, 2, (count, 1), generator=g).float()
    return torch.cat([batch, corners, corners + sides], dim=1)


def test_roi_extractor_patch_pools_each_roi_from_its_level_as_mmdet_does() -> None:
    """The patch runs every level on every RoI, with other levels' rows collapsed to empty boxes, and keeps each
    RoI's own level; with mmcv's RoIAlign in both, its features equal mmdet's exactly, a level without RoIs
    included."""
    extractor = _roi_extractor()
    g = torch.Generator().manual_seed(0)
    feats = tuple(torch.randn(2, 256, 480 // s, 640 // s, generator=g) for s in (4, 8, 16, 32))
    rois = _rois(40, 1)
    levels = extractor.map_roi_levels(rois, 4)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    patched = _make_single_roi_extractor_forward(PatchContext(batch_size=2))
    for kept in (rois, rois[levels != 2]):  # the second: no RoI on level 2
        expected = extractor(feats, kept)
        got = patched(extractor, feats, kept)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_image_branch_splits_into_graphs_and_host_steps_that_chain_to_mmdet3ds_detections(tmp_path: Path) -> None:
    """The stage-1 config: backbone + FPN + RPN graph, the RPN's NMS on the host, the RoI head graph (RoIAlign as
    autoexport::roi_align, ONNX RoiAlign), the 2D decoding + NMS on the host; every graph within the fp32
    tolerance of mmdet3d's stage, and the ONNX Runtime chain gives the eager chain's 2D detections."""
    from autoexport.cli import main

    out = tmp_path / "imvotenet"
    # Seed 1 (weights and samples): with seed 0's random weights, one held-out RPN proposal sits at the NMS's IoU
    # threshold, where eager fp32 and float64 keep different boxes too (README, "ImVoteNet").
    assert main(["--config", IMVOTENET_IMAGE, "--seed", "1", "--format", "both", "--output-dir", str(out)]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert [s["name"] for s in stages["stages"]] == ["backbones", "image_proposals", "image_roi", "image_detections"]
    assert [s["runs_on"] for s in stages["stages"]] == ["graph", "host", "graph", "host"]
    roi = stages["stages"][2]
    assert all(s["parity_passed"] for s in stages["stages"])
    assert 0 < roi["worst_max_abs"] < 1e-3
    assert {"name": "image_rois", "shape": roi["inputs"][-1]["shape"], "dtype": "float32",
            "dynamic_dims": {"0": "num_image_rois"}, "source": "image_proposals.image_rois"} == roi["inputs"][-1]
    chained = stages["chained"]
    assert chained["passed"], chained["failures"]
    assert {"bboxes_2d", "scores_2d", "labels_2d"} <= set(chained["compared"])
    assert chained["max_abs"] < 1e-2  # pixel coordinates up to ~730
    metadata = json.loads((out / "metadata.json").read_text())
    assert "mmcv.ops.RoIAlign (roi_align)" in json.dumps(metadata)


@pytest.mark.parametrize("config", [IMVOTENET_IMAGE, IMVOTENET_STAGE2])
def test_split_plan_run_eagerly_gives_imvotenets_own_predictions(config: str) -> None:
    """The plan's stages, run one after the other in eager PyTorch, give exactly what ImVoteNet.predict gives:
    2D detections rescaled to the original image (stage 1), 3D detections after VoteFusion and the seed
    sampling (stage 2, predict drawing its seeds from the same generator seed as the host step)."""
    from autoexport.analyze import analyze
    from autoexport.configs import resolve_config
    from autoexport.patches import eager_substitutions
    from autoexport.pipeline import _feed
    from autoexport.models.imvotenet import IMVOTE_SAMPLING_SEED
    from autoexport.split import StageContext, run_stage, split_plan_for

    with eager_substitutions("cpu"):  # mmcv's point sampling ops are CUDA-only
        analysis = analyze(resolve_config(config), None, "cpu", [], seed=0)
        model, sample = analysis.model, analysis.samples[0]
        plan = split_plan_for(model)
        context = StageContext(1, tuple(dict(d.metainfo) for d in sample.data_samples))
        output_paths = {o.name: o.index_path for o in analysis.manifest.outputs}
        tensors = {n: torch.from_numpy(a) for n, a in _feed(analysis.manifest, sample).items()}
        with torch.no_grad():
            for stage in plan.stages:
                inputs = {n: tensors[n] for n in stage.input_names(list(tensors))}
                tensors.update(run_stage(stage, model, inputs, context,
                                         output_paths if plan.gives_model_outputs(stage) else None))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(IMVOTE_SAMPLING_SEED)
                predicted = model(sample.inputs, sample.data_samples, mode="predict")[0]
    if config == IMVOTENET_IMAGE:
        expected = predicted.pred_instances
        got = {"bboxes": tensors["bboxes_2d"], "scores": tensors["scores_2d"], "labels": tensors["labels_2d"]}
    else:
        expected = predicted.pred_instances_3d
        expected = {"bboxes": expected.bboxes_3d.tensor, "scores": expected.scores_3d, "labels": expected.labels_3d}
        got = {"bboxes": tensors["bboxes_3d"], "scores": tensors["scores_3d"], "labels": tensors["labels_3d"]}
    assert len(got["bboxes"]) > 10
    for key in ("bboxes", "scores", "labels"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
