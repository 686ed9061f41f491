"""Where the exported graph starts and ends for each detector family, and how its outputs are named.

The boundary is the model's tensor path: voxelized/preprocessed inputs in, raw head outputs out.
Decoding boxes (anchors, NMS) stays on the host and is described in metadata.json instead.
Generated wrappers import the forward functions below by name, so keep them stable.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import ExportFailedError
from .manifest import InputMeaning
from .registry import ClassRegistry

TensorForward = Callable[[Any, dict, list], Any]


@dataclass(frozen=True)
class TensorBoundary:
    forward_name: str  # name of a function in this module: (model, inputs, data_samples) -> raw outputs
    head_attrs: tuple[str, ...]  # attributes of the detector holding the dense head(s), for naming/metadata
    # Name of a function in this module turning the data preprocessor's inputs into the graph's, for models whose
    # inference starts with host-side work the graph should not hold: (model, inputs, data_samples, ordinal) -> inputs.
    host_inputs: str = ""
    host_side: str = ""  # what the host does around the graph, for metadata.json
    # Non-empty for detectors whose one graph is only their first stage (a host-side NMS feeds the second): why;
    # the pipeline then always runs the split export (split.py's SPLITS entry), which carries the whole model.
    split_required: str = ""
    # Where the manifest's generic meaning of an input is wrong for this model, e.g. MinkUNet's voxels.voxels holds
    # one point per voxel, not every point.
    input_meanings: tuple[InputMeaning, ...] = ()


def tensor_mode_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """mmengine's own tensor mode: backbone + neck + head forward, no post-processing."""
    return model(inputs, data_samples, mode="tensor")


def predict_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """mmengine's predict mode: the whole model, post-processing included (not exportable; eager runs only)."""
    return model(inputs, data_samples, mode="predict")


def mono3d_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """SingleStageMono3DDetector's tensor mode, except that a head whose forward takes the image metas
    (HEADS_TAKING_METAS) gets them: mmdet3d's `_forward` calls `bbox_head(x)` and never passes them."""
    if not HEADS_TAKING_METAS.lookup(model.bbox_head):
        return tensor_mode_forward(model, inputs, data_samples)
    return model.bbox_head(model.extract_feat(inputs), [sample.metainfo for sample in data_samples])


def mvx_two_stage_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """MVXTwoStageDetector (CenterPoint, MVX-Net) leaves `_forward` unimplemented; this is its tensor path."""
    metas = [sample.metainfo for sample in data_samples]
    img_feats, pts_feats = model.extract_feat(inputs, metas)
    outputs: dict[str, Any] = {}
    if pts_feats is not None and model.with_pts_bbox:
        outputs["pts"] = model.pts_bbox_head(pts_feats)
    if img_feats is not None and getattr(model, "with_img_bbox", False):
        outputs["img"] = model.img_bbox_head(img_feats)
    # A single branch is returned bare so output names stay short.
    return outputs["pts"] if list(outputs) == ["pts"] else outputs


def sliding_patches(model: Any, inputs: dict, data_samples: list, ordinal: int) -> dict:
    """EncoderDecoder3D's slide inference cuts the cloud into overlapping blocks of test_cfg.num_points points
    (random fill, so the RNG is seeded per sample) and runs the network on batches of them. The graph takes a
    batch of patches; sample k carries 2 + k of them, so the patch count is a dynamic dim (the host sends up to
    test_cfg.batch_size at once). Whole-scene mode passes the cloud as one patch."""
    points = inputs["points"]
    cfg = model.test_cfg
    if cfg.get("mode") != "slide":
        return {"patches": torch.stack(points)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ordinal)
        patches, _ = model._sliding_patch_generation(points[0], cfg.num_points, cfg.block_size, cfg.sample_rate,
                                                     cfg.use_normalized_coord)
    patches = patches.view(-1, cfg.num_points, patches.shape[-1])
    count = min(2 + ordinal, patches.shape[0])
    return {"patches": patches[:count].contiguous()}


def segmentor_patch_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """EncoderDecoder3D's network on a batch of patches (B, num_points, C): per-point class logits (B, K, N)."""
    # The decode heads ignore the metas; one per patch would turn the dynamic patch count into a Python int.
    return model.encode_decode(inputs["patches"], [sample.metainfo for sample in data_samples])


def point_to_voxel_map(model: Any, inputs: dict, data_samples: list, ordinal: int) -> dict:
    """Voxel segmentors (Cylinder3D): the data preprocessor maps each point to its voxel (point2voxel_map, on the
    data sample). The graph takes that map as an input, so it can return per-point logits as predict does."""
    if len(data_samples) != 1:
        raise ExportFailedError(f"{type(model).__name__}: one scene per batch only (predict maps points per sample)")
    # The raw cloud is not passed: the network reads only how many clouds there are, and voxels.voxels holds the
    # points already.
    return {"voxels": inputs["voxels"], "point2voxel_map": data_samples[0].point2voxel_map}


def voxel_segmentor_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """Cylinder3D's and MinkUNet's extract_feat and decode head: voxel logits (M, K) gathered to per-point logits
    (N, K), the logits their decode_head.predict returns for a one-scene batch."""
    voxels = dict(inputs["voxels"])  # extract_feat writes voxel_coors into it
    features = model.extract_feat({"points": [None], "voxels": voxels})  # points: only its length (batch) is read
    logits = model.decode_head.forward(features)
    logits = getattr(logits, "features", logits)  # Cylinder3D's head returns a sparse tensor, MinkUNet's a tensor
    return logits[inputs["point2voxel_map"].long()]


def h3dnet_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """H3DNet.predict up to its final NMS. Its proposals are the vote head's boxes decoded without NMS
    (test_cfg.rpn.use_nms=False), so RPN, primitive heads and refinement are one graph. Outputs: the vote head's
    predictions and the refinement head's (*_optimized), what H3DBboxHead.predict_by_feat decodes."""
    if model.test_cfg.rpn.get("use_nms", True):
        raise ExportFailedError("H3DNet with test_cfg.rpn.use_nms=True has an NMS between its stages; the tensor "
                                "boundary covers use_nms=False (the shipped configs)")
    feats = model.extract_feat(inputs)
    # As H3DNet.predict: the refinement reads the last decoder level of the first backbone.
    feats["fp_xyz"] = [feats["fp_xyz_net0"][-1]]
    feats["fp_features"] = [feats["hd_feature"]]
    feats["fp_indices"] = [feats["fp_indices_net0"][-1]]
    rpn_preds = model.rpn_head(feats)
    feats.update(rpn_preds)
    metas = [sample.metainfo for sample in data_samples]
    feats["rpn_proposals"] = model.rpn_head.predict_by_feat(inputs["points"], rpn_preds, metas, use_nms=False)
    roi_head = model.roi_head
    for primitive in (roi_head.primitive_z, roi_head.primitive_xy, roi_head.primitive_line):
        feats.update(primitive(feats))
    refined = roi_head.bbox_head(feats)
    return {**rpn_preds, **refined}


def point_rcnn_rpn_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """PointRCNN's first stage, as TwoStage3DDetector.predict runs it up to the proposals: the PointNet++ backbone
    and FP neck, then PointRPNHead's per-point box and class predictions. mmdet3d's own tensor mode cannot run it
    (`_forward` reads a 'neck_feats' key extract_feat never returns)."""
    # PointRCNN.extract_feat's steps on the detector's parts, so the split's stage module (parts only) runs it too.
    features = model.backbone(torch.stack(inputs["points"]))
    if getattr(model, "neck", None) is not None:
        features = model.neck(features)
    feats = {"fp_features": features["fp_features"], "fp_points": features["fp_xyz"]}
    bbox_preds, cls_preds = model.rpn_head(feats)
    return {**feats, "bbox_preds": bbox_preds, "cls_preds": cls_preds}


def _anchor_rpn_levels(head_outputs: tuple) -> dict:
    """An anchor RPN head's (cls_scores, bbox_preds, dir_cls_preds), one tensor per level, as flat named outputs."""
    outputs = {}
    for kind, levels in zip(("cls_score", "bbox_pred", "dir_cls_pred"), head_outputs):
        outputs.update({f"{kind}_{level}": t for level, t in enumerate(levels)})
    return outputs


def part_a2_first_stage(model: Any, voxels: dict, batch_size: int) -> dict:
    """PartA2's first stage, as PartA2.extract_feat and the RPN head's forward run it: voxel encoder, SparseUNet
    (the BEV map for the RPN and per-voxel features, seg_features, for the RoI head), BEV backbone and neck, the
    anchor RPN head's raw outputs. mmdet3d's tensor mode runs the RPN's NMS, which no graph can hold."""
    features = model.voxel_encoder(voxels["voxels"], voxels["num_points"], voxels["coors"])
    # PartA2.extract_feat reads the batch size with coors[-1, 0].item() + 1; it is static here.
    feats = model.middle_encoder(features, voxels["coors"], batch_size)
    x = model.backbone(feats["spatial_features"])
    if getattr(model, "neck", None) is not None:
        x = model.neck(x)
    outputs = _anchor_rpn_levels(model.rpn_head(x))
    return {**outputs, "seg_features": feats["seg_features"]}


def part_a2_rpn_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """part_a2_first_stage on the data preprocessor's hard voxels."""
    return part_a2_first_stage(model, inputs["voxels"], len(data_samples))


def pv_rcnn_first_stage(model: Any, voxels: dict, points: list[torch.Tensor], batch_size: int) -> dict:
    """PV-RCNN's first stage, as PointVoxelRCNN.predict runs it up to the proposals, and its keypoint features:
    voxel encoder, SparseEncoder (the BEV map and its multi-scale sparse features), BEV backbone and neck, the
    anchor RPN head's raw outputs, then VoxelSetAbstraction (furthest-point keypoints of each cloud, their features
    pooled from the raw points, each sparse level and the BEV map). The set abstraction never reads the proposals,
    so it belongs to this graph; only the RoI head waits for the host's NMS."""
    features = model.voxel_encoder(voxels["voxels"], voxels["num_points"], voxels["coors"])
    # PointVoxelRCNN.extract_feat reads the batch size with coors[-1, 0].item() + 1; it is static here.
    spatial, multi_scale = model.middle_encoder(features, voxels["coors"], batch_size)
    x = model.backbone(spatial)
    if getattr(model, "neck", None) is not None:
        x = model.neck(x)
    outputs = _anchor_rpn_levels(model.rpn_head(x))
    keypoints = model.points_encoder({"points": points, "voxels": voxels},
                                     {"spatial_feats": spatial, "multi_scale_3d_feats": multi_scale}, None)
    return {**outputs, **keypoints}


def pv_rcnn_rpn_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """pv_rcnn_first_stage on the data preprocessor's hard voxels and the raw clouds."""
    return pv_rcnn_first_stage(model, inputs["voxels"], list(inputs["points"]), len(data_samples))


def imvotenet_first_stage(model: Any, imgs: torch.Tensor, points: list[torch.Tensor] | None) -> dict:
    """ImVoteNet's first stage, as ImVoteNet.predict runs it up to the image RPN's proposals: the image backbone and
    FPN (their levels feed the RoI head too) and the RPN head's raw outputs; with a point branch (stage-2 configs),
    also the PointNet++ backbone's seeds, which never wait for the 2D detections. mmdet3d gives ImVoteNet no
    tensor forward (`_forward` is a stub)."""
    x = model.img_backbone(imgs)
    if getattr(model, "img_neck", None) is not None:
        x = model.img_neck(x)
    cls_scores, bbox_preds = model.img_rpn_head(x)
    outputs = {f"img_feature_{i}": f for i, f in enumerate(x)}
    outputs.update({f"rpn_cls_score_{i}": t for i, t in enumerate(cls_scores)})
    outputs.update({f"rpn_bbox_pred_{i}": t for i, t in enumerate(bbox_preds)})
    if points is not None and getattr(model, "pts_backbone", None) is not None:
        # ImVoteNet.extract_pts_feat's steps on the detector's parts (the split's stage module holds parts only).
        features = model.pts_backbone(torch.stack(points))
        if getattr(model, "pts_neck", None) is not None:
            features = model.pts_neck(features)
        outputs.update(seeds_3d=features["fp_xyz"][-1], seed_3d_features=features["fp_features"][-1],
                       seed_indices_3d=features["fp_indices"][-1])
    return outputs


def imvotenet_first_stage_forward(model: Any, inputs: dict, data_samples: list) -> Any:
    """imvotenet_first_stage on the data preprocessor's images and, where the pipeline loads them, clouds."""
    points = inputs.get("points")
    return imvotenet_first_stage(model, inputs["imgs"], list(points) if points is not None else None)


_SLIDE_HOST_SIDE = ("cut each cloud into patches with EncoderDecoder3D._sliding_patch_generation(points, "
                    "test_cfg.num_points, block_size, sample_rate, use_normalized_coord), run the graph on up to "
                    "test_cfg.batch_size patches at a time, and average each point's logits over the patches that "
                    "hold it (scatter_add by patch index, divide by bincount), as slide_inference does")

BOUNDARIES: ClassRegistry[TensorBoundary] = ClassRegistry("tensor boundary")
# Dense heads whose forward takes the batch's image metas besides the features. MonoFlexHead reads pad_shape and
# img_shape from them (its edge fusion samples the image border), so in the graph they are constants of the export
# samples' image size.
HEADS_TAKING_METAS: ClassRegistry[bool] = ClassRegistry("head taking image metas")
HEADS_TAKING_METAS.register("MonoFlexHead", True)
BOUNDARIES.register("Base3DDetector", TensorBoundary("tensor_mode_forward", ("bbox_head",)))
BOUNDARIES.register("SingleStageMono3DDetector", TensorBoundary("mono3d_forward", ("bbox_head",)))
BOUNDARIES.register("MVXTwoStageDetector", TensorBoundary("mvx_two_stage_forward", ("pts_bbox_head", "img_bbox_head")))
BOUNDARIES.register("EncoderDecoder3D", TensorBoundary("segmentor_patch_forward", ("decode_head",),
                                                       host_inputs="sliding_patches", host_side=_SLIDE_HOST_SIDE))
BOUNDARIES.register("H3DNet", TensorBoundary(
    "h3dnet_forward", ("rpn_head",),
    host_side="H3DBboxHead.predict_by_feat: decode the *_optimized boxes with the vote head's size/dir classes, "
              "then its multiclass NMS"))
BOUNDARIES.register("Cylinder3D", TensorBoundary(
    "voxel_segmentor_forward", ("decode_head",), host_inputs="point_to_voxel_map",
    host_side="the data preprocessor's cylindrical voxelization gives voxels, coors and point2voxel_map; argmax of "
              "seg_logits over classes is each point's label"))

BOUNDARIES.register("MinkUNet", TensorBoundary(
    "voxel_segmentor_forward", ("decode_head",), host_inputs="point_to_voxel_map",
    host_side="the data preprocessor's minkunet voxelization (rounding to the voxel grid, sparse_quantize) gives "
              "voxels, coors and point2voxel_map; argmax of seg_logits over classes is each point's label",
    input_meanings=(
        (r"voxels\.voxels$", "one point per occupied voxel (num_voxels, point_features), the first of its points "
                             "(the data preprocessor's sparse_quantize)", "num_voxels"),
        (r"voxels\.coors$", "integer voxel coordinates (batch_index, x, y, z) of each voxel, relative to the "
                            "cloud's minimum (minkunet voxelization, batch_first)", "num_voxels"))))


def _nms_between_stages(detector: str) -> str:
    """Why a two-stage detector's one graph is only its first stage (TensorBoundary.split_required)."""
    return (f"{detector}'s RoI head runs on proposals chosen by an NMS on the host, so the model is two graphs with "
            "host steps between them")


BOUNDARIES.register("PointRCNN", TensorBoundary(
    "point_rcnn_rpn_forward", ("rpn_head",),
    host_side="PointRPNHead.predict_by_feat decodes each point's box and runs class-agnostic NMS (test_cfg.nms_cfg): "
              "the proposals (stages.json: proposals) that the RoI head graph (stages.json: roi) refines; "
              "PointRCNNBboxHead.get_results decodes and NMSes its outputs",
    split_required=_nms_between_stages("PointRCNN")))

BOUNDARIES.register("PartA2", TensorBoundary(
    "part_a2_rpn_forward", ("rpn_head",),
    host_side="PartA2RPNHead.predict_by_feat decodes the anchors' boxes and runs its NMS (test_cfg.rpn): the "
              "proposals (stages.json: proposals) whose seg_features the RoI head graph (stages.json: roi) pools; "
              "PartA2BboxHead.get_results decodes and NMSes its outputs",
    split_required=_nms_between_stages("PartA2")))


BOUNDARIES.register("PointVoxelRCNN", TensorBoundary(
    "pv_rcnn_rpn_forward", ("rpn_head",),
    host_side="PartA2RPNHead.predict_by_feat decodes the anchors' boxes and runs its NMS (test_cfg.rpn): the "
              "proposals (stages.json: proposals) around which the RoI head graph (stages.json: roi) pools the "
              "keypoint features; PVRCNNBBoxHead.get_results decodes and NMSes its outputs",
    split_required=_nms_between_stages("PV-RCNN")))


BOUNDARIES.register("ImVoteNet", TensorBoundary(
    "imvotenet_first_stage_forward", ("img_rpn_head",),
    host_side="RPNHead.predict_by_feat decodes the anchors and runs its NMS (test_cfg.img_rpn): the proposals "
              "(stages.json: image_proposals) the RoI head graph (stages.json: image_roi) pools; Shared2FCBBoxHead."
              "predict_by_feat decodes and NMSes its outputs into 2D detections; stage-2 configs then run VoteFusion "
              "and the seed sampling on the host (stages.json: imvotes) before the joint vote head graph "
              "(stages.json: joint_head) and VoteHead.predict_by_feat",
    split_required=_nms_between_stages("ImVoteNet")))


def boundary_for(model: Any) -> tuple[TensorBoundary, TensorForward]:
    found = BOUNDARIES.lookup(model)
    if found is None:
        # Not an mmdet3d detector: fall back to mmengine's tensor mode, which every BaseModel has.
        boundary = TensorBoundary("tensor_mode_forward", ())
    else:
        boundary = found[1]
    return boundary, _function(boundary.forward_name)


def host_inputs_for(boundary: TensorBoundary) -> Callable[[Any, dict, list, int], dict] | None:
    return _function(boundary.host_inputs) if boundary.host_inputs else None


def _function(name: str) -> Callable:
    """A function of this module by name, or of another module by dotted path (a model's module under
    autoexport.models keeps its tensor path beside the rest of what is known about it)."""
    if "." not in name:
        return globals()[name]
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def heads_of(model: Any, boundary: TensorBoundary) -> list[Any]:
    return [h for attr in boundary.head_attrs if (h := getattr(model, attr, None)) is not None]


# ---- output naming ------------------------------------------------------------------------------

OutputNamer = Callable[[tuple], str]
OUTPUT_NAMERS: ClassRegistry[OutputNamer] = ClassRegistry("output namer")


def _level_suffixed(names: tuple[str, ...]) -> OutputNamer:
    """Heads returning (per-kind lists over FPN levels): path (kind, level) -> f'{kind}_{level}'."""

    def name(path: tuple) -> str:
        if len(path) == 2 and isinstance(path[0], int) and path[0] < len(names):
            return f"{names[path[0]]}_{path[1]}"
        return default_output_name(path)

    return name


OUTPUT_NAMERS.register("Anchor3DHead", _level_suffixed(("cls_score", "bbox_pred", "dir_cls_pred")))
OUTPUT_NAMERS.register("FreeAnchor3DHead", _level_suffixed(("cls_score", "bbox_pred", "dir_cls_pred")))
OUTPUT_NAMERS.register("ShapeAwareHead", _level_suffixed(("cls_score", "bbox_pred", "dir_cls_pred")))
# Sigmoid heatmap (clamped to [1e-4, 1 - 1e-4]) and the 8 regression groups concatenated (50 channels).
OUTPUT_NAMERS.register("MonoFlexHead", _level_suffixed(("cls_score", "bbox_pred")))


def _dict_key_name(path: tuple) -> str:
    return path[0] if len(path) == 1 and isinstance(path[0], str) else default_output_name(path)


# Heads whose first stage autoexport's two-stage boundaries return as a dict of named tensors: the keys.
OUTPUT_NAMERS.register("PointRPNHead", _dict_key_name)
OUTPUT_NAMERS.register("PartA2RPNHead", _dict_key_name)
OUTPUT_NAMERS.register("RPNHead", _dict_key_name)  # mmdet's, ImVoteNet's image RPN

# Segmentation decode heads (PointNet2Head, DGCNNHead, PAConvHead): one (B, num_classes, N) tensor.
OUTPUT_NAMERS.register("Base3DDecodeHead", lambda path: "seg_logits" if not path else default_output_name(path))


@OUTPUT_NAMERS.decorator("CenterHead")
def _center_head_name(path: tuple) -> str:
    # CenterHead.forward -> multi_apply over levels of per-task dict lists: path (task, level, key).
    if len(path) == 3 and isinstance(path[2], str):
        task, level, key = path
        return f"{key}_task{task}" + (f"_level{level}" if level else "")
    return default_output_name(path)


def default_output_name(path: tuple) -> str:
    return "out_" + "_".join(str(p) for p in path) if path else "out"


def output_namer_for(model: Any, boundary: TensorBoundary) -> OutputNamer:
    heads = heads_of(model, boundary)
    if len(heads) == 1:
        found = OUTPUT_NAMERS.lookup(heads[0])
        if found is not None:
            return found[1]
    return default_output_name
