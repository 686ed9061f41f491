"""--split: named stages with a stage manifest, each stage checked alone and the stages chained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from conftest import FUSION_SAMPLE, KITTI_PP, export_to

SEGMENTOR = "pointnet2_ssg_2xb16-cosine-200e_scannet-seg"


def test_pointpillars_split_into_three_stages_that_chain_to_the_model_outputs(tmp_path: Path) -> None:
    out = tmp_path / "split"
    assert export_to(KITTI_PP, out, "--format", "onnx", "--split") == 0
    manifest = json.loads((out / "stages.json").read_text())
    stages = manifest["stages"]
    assert [s["name"] for s in stages] == ["lidar.encoder", "bev.backbone", "head"]
    # How tensors flow: model inputs -> encoder -> canvas -> backbone -> features -> head -> the model's outputs.
    assert [(i["name"], i["source"], i["dynamic_dims"]) for i in stages[0]["inputs"]] == [
        ("voxels_voxels", "model input", {"0": "num_voxels"}), ("voxels_num_points", "model input", {"0": "num_voxels"}),
        ("voxels_coors", "model input", {"0": "num_voxels"})]
    assert [(i["name"], i["source"]) for i in stages[1]["inputs"]] == [("bev_canvas", "lidar.encoder.bev_canvas")]
    assert [(i["name"], i["source"]) for i in stages[2]["inputs"]] == [("bev_features_0", "bev.backbone.bev_features_0")]
    metadata = json.loads((out / "metadata.json").read_text())
    assert [o["name"] for o in stages[2]["outputs"]] == [o["name"] for o in metadata["manifest"]["outputs"]]
    # Each stage within the fp32 tolerance (1e-4 + 1e-4|b|). No absolute 1e-4 on top: on an AVX2 CPU without
    # AVX-512, PyTorch's own fp32 convs put bev.backbone 1.13e-4 from a float64 run (ONNX Runtime 4.6e-5), so the
    # stage differs from eager by 1.19e-4 at |b| = 3.2; it was 8.5e-5 on an AVX-512 CPU.
    assert all(s["parity_passed"] for s in stages), [(s["name"], s["worst_max_abs"]) for s in stages]
    assert stages[0]["worst_max_abs"] <= 1e-4 and stages[2]["worst_max_abs"] <= 1e-4
    assert manifest["chained"]["passed"] and manifest["chained"]["max_abs"] <= 1e-4
    assert metadata["split"] == {"manifest": "stages.json", "passed": True,
                                 "stages": ["lidar.encoder", "bev.backbone", "head"]}

    # Chain the stage graphs by hand, as a deployment would, on the held-out sample.
    feed = dict(np.load(out / "inputs" / "heldout_0.npz"))
    reference = dict(np.load(out / "reference" / "heldout_0.npz"))
    tensors = dict(feed)
    for stage in stages:
        session = ort.InferenceSession(str(out / "stages" / stage["name"] / "model.onnx"))
        names = [o.name for o in session.get_outputs()]
        tensors.update(zip(names, session.run(None, {i["name"]: tensors[i["name"]] for i in stage["inputs"]})))
    for name, expected in reference.items():
        np.testing.assert_allclose(tensors[name], expected, atol=1e-4, rtol=1e-4)
    # Each stage's model.pt2 holds only its own weights (the head's is small) and no example inputs.
    head = torch.export.load(str(out / "stages" / "head" / "model.pt2"))
    assert all(k.startswith("parts.bbox_head.") for k in head.state_dict)
    assert (out / "stages" / "head" / "model.pt2").stat().st_size < 5e6


def test_split_without_a_plan_or_with_int8_exits_2(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    assert export_to(KITTI_PP, tmp_path / "a", "--split", "--precision", "int8") == 2
    assert export_to(KITTI_PP, tmp_path / "b", "--split", "--format", "pt2") == 2
    assert export_to(SEGMENTOR, tmp_path / "c", "--split", "--format", "onnx") == 2
    assert "no split plan is registered for EncoderDecoder3D" in caplog.text
    assert not any((tmp_path / n).exists() for n in "abc")
    assert list(tmp_path.iterdir()) == []  # no hidden staging directory left behind either


def test_camera_lidar_fusion_splits_as_cuda_bevfusion_deploys(tmp_path: Path) -> None:
    """The custom_imports fusion sample registers its split plan from its own project module: camera.backbone,
    camera.vtransform (reads lidar2img, a model input), lidar.encoder, fuser.backbone and head, each checked alone
    and chained in ONNX Runtime to the model's outputs."""
    out = tmp_path / "fusion_split"
    assert export_to(FUSION_SAMPLE, out, "--format", "onnx", "--split") == 0
    manifest = json.loads((out / "stages.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    assert list(stages) == ["camera.backbone", "camera.vtransform", "lidar.encoder", "fuser.backbone", "head"]
    sources = {name: [(i["name"], i["source"]) for i in s["inputs"]] for name, s in stages.items()}
    assert sources["camera.backbone"] == [("imgs", "model input")]
    assert sources["camera.vtransform"] == [("img_features_0", "camera.backbone.img_features_0"),
                                            ("lidar2img", "model input")]
    assert sources["fuser.backbone"] == [("bev_canvas", "lidar.encoder.bev_canvas"),
                                         ("camera_bev", "camera.vtransform.camera_bev")]
    assert all(s["parity_passed"] and s["worst_max_abs"] <= 1e-4 for s in stages.values())
    assert manifest["chained"]["passed"] and manifest["chained"]["max_abs"] <= 1e-4
    # Only the camera stages' weights in their graphs; the lift's graph takes the camera matrix as an input.
    vtransform = torch.export.load(str(out / "stages" / "camera.vtransform" / "model.pt2"))
    assert vtransform.state_dict and all(k.startswith("parts.camera_lift.") for k in vtransform.state_dict)
    session = ort.InferenceSession(str(out / "stages" / "camera.vtransform" / "model.onnx"))
    feed = dict(np.load(out / "inputs" / "sample_0.npz"))
    features = ort.InferenceSession(str(out / "stages" / "camera.backbone" / "model.onnx")).run(
        None, {"imgs": feed["imgs"]})[0]
    base = session.run(None, {"img_features_0": features, "lidar2img": feed["lidar2img"]})[0]
    moved = feed["lidar2img"].copy()
    moved[0] += 40.0 * moved[2]  # another calibration moves the image features on the BEV grid
    assert np.abs(session.run(None, {"img_features_0": features, "lidar2img": moved})[0] - base).max() > 1e-2


# ---- host steps between graphs (two-stage detectors), on a small two-stage network ------------------------------

class TinyTwoStage(torch.nn.Module):
    """A proposal stage scoring points, a host top-k over the scores, a refinement stage on the chosen points."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.rpn = torch.nn.Linear(4, 9)
        self.refine = torch.nn.Linear(8, 2)


def _tiny_rpn(model, t, context):  # noqa: ANN001, ANN202
    out = model.rpn(t["points_0"])
    return {"head_outputs": {"scores": out[:, 0], "features": out[:, 1:]}}


_host_calls: list[str] = []  # [mode, then one entry per call]


def _tiny_select(model, t, context):  # noqa: ANN001, ANN202
    _host_calls.append("call")
    order = torch.argsort(t["scores"], descending=True)
    count = 3 + t["scores"].shape[0] // 100
    # The chained run's calls (after the 3 eager ones) may be told to choose differently, as an NMS can, or to
    # keep the same rows in another order, as an NMS does when kept boxes' scores are near-tied.
    if len(_host_calls) > 4 and _host_calls[0] == "diverge":
        order = order.flip(0)
    if len(_host_calls) > 4 and _host_calls[0] == "reorder":
        order = torch.cat([order[:count].flip(0), order[count:]])
    return {"chosen": order[:count]}


def _tiny_refine(model, t, context):  # noqa: ANN001, ANN202
    return {"refined": model.refine(t["features"][t["chosen"]])}


def _tiny_plan():  # noqa: ANN202
    from autoexport.split import SplitPlan, StageDef

    return SplitPlan((
        StageDef("rpn", _tiny_rpn, "scores and features per point", ("rpn",), ("points_*",)),
        StageDef("select", _tiny_select, "host: top-k", (), ("scores",), host=True, row_sets=(("chosen",),)),
        StageDef("refine", _tiny_refine, "refine the chosen points", ("refine",), ("features", "chosen"),
                 dims=(("chosen", 0, "num_chosen"),), row_sets=(("refined",),)),
    ), model_outputs_stage="rpn")


def _tiny_split(out: Path, chain_mode: str = "same"):  # noqa: ANN202
    from autoexport.manifest import DynamicDim, Manifest, OutputSpec, TensorSpec
    from autoexport.knowledge import KNOWLEDGE
    from autoexport.split import export_split
    from autoexport.verify import Tolerance

    model = TinyTwoStage().eval()
    clouds = {name: np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
              for name, seed, n in (("sample_0", 1, 60), ("sample_1", 2, 80), ("heldout_0", 3, 100))}
    feeds = {name: {"points_0": cloud} for name, cloud in clouds.items()}
    with torch.no_grad():
        expected = {name: {k: v.numpy() for k, v in _tiny_rpn(model, {"points_0": torch.from_numpy(c)}, None)
                           ["head_outputs"].items()} for name, c in clouds.items()}
    manifest = Manifest(
        inputs=[TensorSpec("points_0", "inputs.points.0", [60, 4], "float32", {0: "num_points"})],
        outputs=[OutputSpec("scores", ["scores"], [60], "float32", {0: "num_points"}),
                 OutputSpec("features", ["features"], [60, 8], "float32", {0: "num_points"})],
        dims={"num_points": DynamicDim("num_points", [60, 80])}, structure={})
    _host_calls[:] = [chain_mode]
    with KNOWLEDGE.overridden("TinyTwoStage", split_plan=_tiny_plan()):
        return export_split(model, manifest, feeds, ["sample_0", "sample_1"], expected, out,
                            Tolerance(1e-4, 1e-4, "fp32"), "cpu")


def test_split_runs_host_steps_between_graphs_and_chains_them(tmp_path: Path) -> None:
    result = _tiny_split(tmp_path)
    record = result.to_json()
    stages = {s["name"]: s for s in record["stages"]}
    assert list(stages) == ["rpn", "select", "refine"]
    assert stages["select"]["runs_on"] == "host" and stages["select"]["files"] == []
    assert stages["select"]["host_function"].endswith("_tiny_select")
    assert [(i["name"], i["source"]) for i in stages["refine"]["inputs"]] == [("features", "rpn.features"),
                                                                              ("chosen", "select.chosen")]
    # 3 chosen in both export samples, 4 held out: the plan declares the count dynamic, so the graph takes any.
    assert stages["refine"]["inputs"][1]["dynamic_dims"] == {"0": "num_chosen"}
    assert all(s["parity_passed"] for s in stages.values())
    chained = record["chained"]
    assert chained["passed"] and chained["host_steps_diverged"] == [] and chained["max_abs"] <= 1e-5
    assert chained["rows_reordered"] == []
    assert set(chained["compared"]) == {"scores", "features", "chosen", "refined"}
    refine = ort.InferenceSession(str(tmp_path / "stages" / "refine" / "model.onnx"))
    assert [i.name for i in refine.get_inputs()] == ["features", "chosen"]


def test_a_host_step_choosing_differently_in_the_chain_fails_it_and_is_named(tmp_path: Path) -> None:
    result = _tiny_split(tmp_path, "diverge")
    chained = result.to_json()["chained"]
    assert not chained["passed"] and not result.passed
    assert {d["step"] for d in chained["host_steps_diverged"]} == {"select"}
    assert chained["host_steps_diverged"][0]["inputs_max_abs"] <= 1e-5  # the graphs were not the cause
    assert any("host step select differs from eager's" in note for note in chained["failures"])
    # The refine graph was still checked in the chain, on the eager step's choice: no failure of its own.
    assert not any("refined" in note for note in chained["failures"])


def test_a_host_step_keeping_the_same_rows_in_another_order_passes_as_a_row_set(tmp_path: Path) -> None:
    # select's chosen indices and refine's rows on them are declared row sets: the chained run's reversed choice
    # matches the eager one row for row after matching, and the refine graph's outputs follow it.
    chained = _tiny_split(tmp_path, "reorder").to_json()["chained"]
    assert chained["passed"] and chained["host_steps_diverged"] == [] and chained["max_abs"] <= 1e-5
    moved = {(r["sample"], r["step"]): (r["rows_moved"], r["rows"]) for r in chained["rows_reordered"]}
    # 3 rows reversed (the middle one stays) on the 60- and 80-point samples, 4 on the 100-point one.
    assert moved == {(s, step): (2 if s != "heldout_0" else 4, 3 if s != "heldout_0" else 4)
                     for s in ("sample_0", "sample_1", "heldout_0") for step in ("select", "refine")}
