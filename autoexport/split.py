"""Split export (`--split`): the model as named stages, each its own model.pt2/model.onnx, plus `stages.json`
saying how tensors flow between them, the way CUDA-BEVFusion and CUDA-PointPillars deploy a detector as separate
graphs (voxel encoder + scatter, BEV backbone, head). Each detector class's module in autoexport.models registers
its plan (ClassKnowledge.split_plan); the builders below are shared by those plans.

Every stage is checked on its own (eager stage vs its PT2 and ONNX Runtime graphs, on the tensors the eager model
passes across that boundary) and chained (the ONNX Runtime stages run one after the other from the model's inputs,
compared with the eager model's outputs): a split deployment is exactly as good as the one-graph export.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import UserInputError
from .export import export_onnx, export_program, save_pt2
from .manifest import DynamicDim, Manifest, OutputSpec, TensorSpec, dtype_name, get_by_path
from .knowledge import KNOWLEDGE, NO_SPLIT_PLAN
from .backends.onnxruntime import OnnxRuntimeRunner
from .backends.pt2 import PT2Runner
from .verify import Comparator, ParityReport, Tolerance, compare_arrays, compare_row_set

log = logging.getLogger("autoexport")

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StageContext:
    """What a stage may read besides tensors: the batch size and the samples' constant metainfo (image shapes,
    scale factors; camera matrices that are model inputs come in as tensors)."""

    batch_size: int
    metas: tuple[dict, ...] = ()


StageForward = Callable[[Any, Tensors, StageContext], Tensors]  # (model, named inputs, context) -> named outputs


@dataclass(frozen=True)
class StageDef:
    name: str  # e.g. lidar.encoder
    forward: StageForward
    what: str  # one line for stages.json and logs
    modules: tuple[str, ...]  # detector attributes the stage runs; only their weights go into its graph
    reads: tuple[str, ...]  # tensor names it takes (model inputs or earlier stages' outputs); 'x_*' takes x_0, x_1, ...
    # A host step (NMS, decoding): plain PyTorch run on the host between graphs, not exported; the chained check
    # runs it on the graphs' outputs as a deployment would.
    host: bool = False
    # Dynamic dims the export samples may not show (a proposal count can hit its cap in both): (input, axis, name).
    dims: tuple[tuple[str, int, str], ...] = ()
    # Upper bounds of dims that the model's config caps (a proposal count by its NMS's nms_post): (model, context)
    # -> {dim name: max}. Unbounded, a count derived from one inside the graph (nonzero over every RoI's grid) gets
    # a bound past int64 that torch.onnx cannot write into its runtime assertion.
    dim_bounds: Callable[[Any, StageContext], dict[str, int]] | None = None
    # Outputs whose rows are one unordered set (an NMS's kept boxes with their labels, a per-RoI graph's rows on
    # them): the order is the selection's, which near-tied scores may swap. The chained check matches their rows
    # with the eager chain's (verify.compare_row_set) instead of comparing row by row; values keep the tolerance.
    row_sets: tuple[tuple[str, ...], ...] = ()

    def input_names(self, available: list[str]) -> list[str]:
        names = []
        for pattern in self.reads:
            if pattern.endswith("*"):
                names += sorted((n for n in available if n.startswith(pattern[:-1])), key=lambda n: int(n.rsplit("_", 1)[1]))
            elif pattern in available:
                names.append(pattern)
            else:
                raise UserInputError(f"--split: stage {self.name} reads {pattern}, which neither the model inputs nor an "
                                     f"earlier stage provide (available: {', '.join(available)})")
        return names


@dataclass(frozen=True)
class SplitPlan:
    stages: tuple[StageDef, ...]
    covers_camera: bool = False  # False: a lidar-path plan, refused for a detector with an image branch
    # The stage whose outputs are the one-graph export's (named as there): the last one unless a host step follows
    # the first graph (two-stage detectors, whose one graph is their first stage).
    model_outputs_stage: str = ""

    def gives_model_outputs(self, stage: StageDef) -> bool:
        return stage.name == self.model_outputs_stage if self.model_outputs_stage else stage is self.stages[-1]


# ---- stage builders shared by the plans -------------------------------------------------------------------

def _lidar_encoder(prefix: str, extra_args: bool) -> StageForward:
    def forward(model: Any, t: Tensors, context: StageContext) -> Tensors:
        encoder = getattr(model, f"{prefix}voxel_encoder")
        args = (t["voxels_voxels"], t["voxels_num_points"], t["voxels_coors"])
        features = encoder(*args, None, None) if extra_args else encoder(*args)
        canvas = getattr(model, f"{prefix}middle_encoder")(features, t["voxels_coors"], context.batch_size)
        return {"bev_canvas": canvas}

    return forward


def _backbone_and_neck(model: Any, backbone_attr: str, neck_attr: str, x: torch.Tensor, out_prefix: str) -> Tensors:
    """A backbone and its optional neck: their feature levels as out_prefix_0, _1, ..."""
    features = getattr(model, backbone_attr)(x)
    neck = getattr(model, neck_attr, None)  # absent when the detector has none
    if neck is not None:
        features = neck(features)
    return {f"{out_prefix}_{i}": f for i, f in enumerate(features)}


def _bev_backbone(prefix: str, fuse_camera: bool = False) -> StageForward:
    def forward(model: Any, t: Tensors, context: StageContext) -> Tensors:
        canvas = torch.cat([t["bev_canvas"], t["camera_bev"]], dim=1) if fuse_camera else t["bev_canvas"]
        return _backbone_and_neck(model, f"{prefix}backbone", f"{prefix}neck", canvas, "bev_features")

    return forward


def _dense_head(head_attr: str) -> StageForward:
    def forward(model: Any, t: Tensors, context: StageContext) -> Tensors:
        features = list(t.values())  # bev_features_0, _1, ... in the order StageDef.input_names gives
        return {"head_outputs": getattr(model, head_attr)(features)}  # flattened to the model's output names later

    return forward


def voxel_bev_plan(prefix: str, head_attr: str, extra_args: bool) -> SplitPlan:
    return SplitPlan((
        StageDef("lidar.encoder", _lidar_encoder(prefix, extra_args),
                 "voxel/pillar encoder and BEV scatter (or sparse encoder)",
                 (f"{prefix}voxel_encoder", f"{prefix}middle_encoder"),
                 ("voxels_voxels", "voxels_num_points", "voxels_coors")),
        StageDef("bev.backbone", _bev_backbone(prefix), "2D backbone and neck on the BEV canvas",
                 (f"{prefix}backbone", f"{prefix}neck"), ("bev_canvas",)),
        StageDef("head", _dense_head(head_attr), "dense head: raw outputs, decoded on the host", (head_attr,),
                 ("bev_features_*",)),
    ))


def _camera_backbone(backbone_attr: str, neck_attr: str) -> StageForward:
    def forward(model: Any, t: Tensors, context: StageContext) -> Tensors:
        return _backbone_and_neck(model, backbone_attr, neck_attr, t["imgs"], "img_features")

    return forward


def camera_lidar_fusion_plan(vtransform: StageForward, vtransform_modules: tuple[str, ...], prefix: str = "pts_",
                             head_attr: str = "bbox_head", img_prefix: str = "img_") -> SplitPlan:
    """The stages CUDA-BEVFusion deploys: camera.backbone, camera.vtransform (image features to a BEV map,
    `vtransform` returns {"camera_bev": (B, C, ny, nx)}), lidar.encoder, fuser.backbone (concatenation of both BEV
    maps, then the BEV backbone and neck) and head. For detectors defined outside mmdet3d, registered by their
    project (see sample_configs/custom_modules/tiny_fusion.py)."""
    return SplitPlan((
        StageDef("camera.backbone", _camera_backbone(f"{img_prefix}backbone", f"{img_prefix}neck"),
                 "image backbone (and neck): multi-level image features",
                 (f"{img_prefix}backbone", f"{img_prefix}neck"), ("imgs",)),
        StageDef("camera.vtransform", vtransform, "image features to a BEV map through the camera matrices",
                 vtransform_modules, ("img_features_*", "lidar2img")),
        StageDef("lidar.encoder", _lidar_encoder(prefix, False), "voxel/pillar encoder and BEV scatter",
                 (f"{prefix}voxel_encoder", f"{prefix}middle_encoder"),
                 ("voxels_voxels", "voxels_num_points", "voxels_coors")),
        StageDef("fuser.backbone", _bev_backbone(prefix, fuse_camera=True),
                 "lidar and camera BEV maps concatenated, then the 2D backbone and neck",
                 (f"{prefix}backbone", f"{prefix}neck"), ("bev_canvas", "camera_bev")),
        StageDef("head", _dense_head(head_attr), "dense head: raw outputs, decoded on the host", (head_attr,),
                 ("bev_features_*",)),
    ), covers_camera=True)


def boundary_stage(tensor_forward: Callable[[Any, dict, list], Any], inputs_key: str) -> StageForward:
    """A one-graph tensor path (TensorBoundary.forward) as a stage; its model inputs are `inputs_key`_0, _1, ..."""
    def forward(model: Any, t: Tensors, context: StageContext) -> Tensors:
        return {"head_outputs": tensor_forward(model, {inputs_key: list(t.values())}, [])}

    return forward


def numbered(t: Tensors, prefix: str) -> list[torch.Tensor]:
    """prefix0, prefix1, ... in order (StageDef.input_names sorts numbered inputs)."""
    return [tensor for name, tensor in t.items() if name.startswith(prefix)]


def per_sample(t: Tensors, name: str, rois: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """A per-RoI tensor cut into the per-sample list mmdet3d's heads take (RoIs are grouped by sample)."""
    return list(torch.split(t[name], torch.bincount(rois[:, 0].long(), minlength=batch_size).tolist()))


def detections_of(results: list) -> Tensors:
    """A bbox head's per-sample results (InstanceData) as the detections stage's flat tensors, samples in order."""
    return {"bboxes_3d": torch.cat([r.bboxes_3d.tensor for r in results]),
            "scores_3d": torch.cat([r.scores_3d for r in results]),
            "labels_3d": torch.cat([r.labels_3d for r in results])}


def hard_voxels(t: Tensors) -> Tensors:
    """The data preprocessor's hard voxels, as the first stage's inputs name them, in the dict mmdet3d passes."""
    return {"voxels": t["voxels_voxels"], "num_points": t["voxels_num_points"], "coors": t["voxels_coors"]}


def split_plan_for(model: Any) -> SplitPlan:
    found = KNOWLEDGE.lookup(model, "split_plan")
    if found is None or found[1] == NO_SPLIT_PLAN:
        known = ", ".join(name for name, plan in KNOWLEDGE.with_field("split_plan") if plan != NO_SPLIT_PLAN)
        raise UserInputError(f"--split: no split plan is registered for {type(model).__name__} (plans exist for "
                             f"{known}); register its stages in its module under autoexport/models/, or from the "
                             "model's own project as sample_configs/custom_modules/tiny_fusion.py does")
    plan = found[1] if isinstance(found[1], SplitPlan) else found[1](model)
    if not plan.covers_camera and (getattr(model, "with_img_bbox", False)
                                   or getattr(model, "img_backbone", None) is not None):
        raise UserInputError(f"--split: {type(model).__name__} has an image branch; its split plan covers the lidar "
                             "path only")
    return plan


# ---- running, capturing and exporting stages -----------------------------------------------------

class StageModule(torch.nn.Module):
    """One stage with a flat tensor signature (what torch.export and ONNX need)."""

    def __init__(self, model: torch.nn.Module, stage: StageDef, input_names: list[str], output_names: list[str],
                 output_paths: dict[str, list] | None, context: StageContext) -> None:
        super().__init__()
        # Only the stage's own submodules, so its graph carries only their weights.
        self.parts = torch.nn.Module()
        for attr in stage.modules:
            part = getattr(model, attr, None)
            if part is not None:
                setattr(self.parts, attr, part)
        self.stage = stage
        self.input_names = input_names
        self.output_names = output_names
        self.output_paths = output_paths  # head: model output name -> index path into the head's nested outputs
        self.context = context

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = run_stage(self.stage, self.parts, dict(zip(self.input_names, tensors)), self.context,
                            self.output_paths)
        return tuple(outputs[name] for name in self.output_names)


def run_stage(stage: StageDef, model: Any, tensors: Tensors, context: StageContext,
              output_paths: dict[str, list] | None) -> Tensors:
    """A stage's named outputs; the head's nested outputs under the one-graph export's output names."""
    outputs = stage.forward(model, tensors, context)
    if output_paths is not None:
        return {name: get_by_path(outputs["head_outputs"], path) for name, path in output_paths.items()}
    return outputs


@dataclass
class StageRecord:
    name: str
    what: str
    inputs: list[dict]  # name, shape, dtype, dynamic_dims, source ("model input" or "<stage>.<output>")
    outputs: list[dict]
    files: list[str]
    parity_passed: bool = False  # host steps: True (nothing exported; the chained check covers them)
    worst_max_abs: float = 0.0
    runs_on: str = "graph"  # "graph" (model.pt2 / model.onnx) or "host" (plain PyTorch between graphs)
    host_function: str = ""  # a host step's function in autoexport, for deployments to port


@dataclass
class SplitResult:
    stages: list[StageRecord] = field(default_factory=list)
    chained: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(s.parity_passed for s in self.stages) and bool(self.chained.get("passed"))

    def to_json(self) -> dict:
        return {"passed": self.passed, "stages": [asdict(s) for s in self.stages], "chained": self.chained}


def _stage_manifest(name: str, captured: list[Tensors], input_names: list[str], output_names: list[str],
                    outputs_by_sample: list[Tensors], known_dims: dict[tuple[int, ...], str],
                    batch_size: int, declared: tuple[tuple[str, int, str], ...] = (),
                    bounds: dict[str, int] | None = None) -> Manifest:
    """Inputs/outputs of one stage with dynamic dims found across the export samples; a dim whose values match a
    dim already named (e.g. num_voxels) keeps that name."""
    dims: dict[str, DynamicDim] = {}

    def dynamic(per_sample: list[torch.Tensor], prefix: str) -> dict[int, str]:
        found = {}
        for axis in range(per_sample[0].dim()):
            values = tuple(int(t.shape[axis]) for t in per_sample)
            if len(set(values)) > 1:
                dim_name = known_dims.setdefault(values, f"{prefix}_dim{axis}")
                dims[dim_name] = DynamicDim(dim_name, list(values))
                found[axis] = dim_name
        return found

    def with_declared(tensor_name: str, found: dict[int, str]) -> dict[int, str]:
        for declared_tensor, axis, dim_name in declared:  # named as declared (and bounded) even where it varied
            if declared_tensor == tensor_name:
                values = [int(c[tensor_name].shape[axis]) for c in captured]
                dims[dim_name] = DynamicDim(dim_name, values, max=(bounds or {}).get(dim_name))
                found[axis] = dim_name
        return found

    specs = [TensorSpec(n, f"{name}.{n}", list(captured[0][n].shape), dtype_name(captured[0][n].dtype),
                        with_declared(n, dynamic([c[n] for c in captured], n))) for n in input_names]
    outs = [OutputSpec(n, [n], list(outputs_by_sample[0][n].shape), dtype_name(outputs_by_sample[0][n].dtype),
                       dynamic([o[n] for o in outputs_by_sample], n)) for n in output_names]
    used = {d for s in specs for d in s.dynamic_dims.values()}
    return Manifest(inputs=specs, outputs=outs, dims={k: v for k, v in dims.items() if k in used},
                    structure={}, unused_inputs=[], batch_size=batch_size)


def export_split(model: torch.nn.Module, manifest: Manifest, feeds: dict[str, dict[str, np.ndarray]],
                 export_sample_names: list[str], expected: dict[str, dict[str, np.ndarray]], output_dir: Path,
                 tolerance: Tolerance, device: str, verbose: bool = False,
                 metainfo: dict[str, list[dict]] | None = None) -> SplitResult:
    """`metainfo`: each sample's data-sample metainfo, by sample name."""
    plan = split_plan_for(model)
    batch_size = manifest.batch_size
    # Host steps, which a deployment runs with each frame's own metainfo (its camera calibration), get each
    # sample's; graphs are exported with the first export sample's.
    host_contexts = {name: StageContext(batch_size, tuple(metas)) for name, metas in (metainfo or {}).items()}
    context = host_contexts.get(export_sample_names[0], StageContext(batch_size))
    output_paths = {o.name: o.index_path for o in manifest.outputs}
    # Run the eager stages on every sample, keeping every tensor that crosses a boundary.
    available = {name: {n: torch.from_numpy(a.copy()).to(device) for n, a in feed.items()} for name, feed in feeds.items()}
    sources = {n: "model input" for n in manifest.input_names}
    known_dims = {tuple(d.observed): n for n, d in manifest.dims.items()}
    result = SplitResult()
    stage_io: list[tuple[StageDef, list[str], list[str]]] = []
    for stage in plan.stages:
        is_head = plan.gives_model_outputs(stage)
        input_names = stage.input_names(list(available[export_sample_names[0]]))
        # The eager stage (mmdet3d's own code, unpatched) on every sample. It gets copies: some modules write into
        # their inputs (PillarFeatureNet's legacy mode).
        per_sample_outputs: dict[str, Tensors] = {}
        with torch.no_grad():
            for sample, tensors in available.items():
                per_sample_outputs[sample] = run_stage(stage, model, {n: tensors[n].clone() for n in input_names},
                                                       host_contexts.get(sample, context) if stage.host else context,
                                                       output_paths if is_head else None)
        output_names = list(per_sample_outputs[export_sample_names[0]])
        if stage.host:
            record = host_step_record(stage, input_names, output_names, per_sample_outputs, available, sources)
        else:
            stage_manifest = _stage_manifest(stage.name, [available[s] for s in export_sample_names], input_names,
                                             output_names, [per_sample_outputs[s] for s in export_sample_names], known_dims,
                                             batch_size, declared=stage.dims,
                                             bounds=stage.dim_bounds(model, context) if stage.dim_bounds else None)
            folder = output_dir / "stages" / stage.name
            folder.mkdir(parents=True, exist_ok=True)
            module = StageModule(model, stage, input_names, output_names, output_paths if is_head else None,
                                 context).eval()
            example = tuple(available[export_sample_names[0]][n] for n in input_names)
            log.info("  stage %s: %s -> %s", stage.name, ", ".join(input_names), ", ".join(output_names))
            exported = export_program(module, model, stage_manifest, example, verbose, star_args=True)
            # model.pt2 would otherwise carry the example inputs too: a BEV canvas is tens of MB.
            exported.program.example_inputs = None
            save_pt2(exported.program, folder / "model.pt2")
            export_onnx(exported.program, input_names, output_names, folder / "model.onnx", verbose)
            # Per-stage parity on the tensors the eager model passed across this boundary.
            stage_feeds = {s: {n: available[s][n].detach().cpu().numpy() for n in input_names} for s in available}
            stage_expected = {s: {n: t.detach().cpu().numpy() for n, t in per_sample_outputs[s].items()} for s in available}
            runners = [PT2Runner.from_file(folder / "model.pt2", input_names, output_names, device),
                       OnnxRuntimeRunner(folder / "model.onnx", input_names, output_names)]
            report = Comparator(tolerance, reference=f"eager {stage.name}").compare(
                runners, stage_feeds, stage_expected, ParityReport(f"eager {stage.name}", {tolerance.precision: tolerance}))
            record = StageRecord(
                stage.name, stage.what,
                inputs=[{**_spec_json(t), "source": sources[t.name]} for t in stage_manifest.inputs],
                outputs=[_spec_json(o) for o in stage_manifest.outputs],
                files=[f"stages/{stage.name}/model.pt2", f"stages/{stage.name}/model.onnx"],
                parity_passed=report.passed, worst_max_abs=max(c.max_abs for c in report.checks))
        result.stages.append(record)
        for sample in available:
            available[sample].update(per_sample_outputs[sample])
        for n in output_names:
            sources[n] = f"{stage.name}.{n}"
        stage_io.append((stage, input_names, output_names))
    chain_reference = {sample: {n: t.detach().cpu().numpy() for n, t in tensors.items() if sources.get(n) != "model input"}
                       for sample, tensors in available.items()}
    result.chained = _chained_parity(output_dir, stage_io, feeds, expected, chain_reference, tolerance, model,
                                     {sample: host_contexts.get(sample, context) for sample in feeds})
    return result


def host_step_record(stage: StageDef, input_names: list[str], output_names: list[str],
                     per_sample_outputs: dict[str, Tensors], available: dict[str, Tensors], sources: dict[str, str]
                     ) -> StageRecord:
    """A host step in stages.json: what it runs, what it reads and what it gives."""
    first = next(iter(per_sample_outputs))

    def describe(name: str, tensor: torch.Tensor) -> dict:
        return {"name": name, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), "dynamic_dims": {}}

    log.info("  host step %s: %s -> %s", stage.name, ", ".join(input_names), ", ".join(output_names))
    return StageRecord(
        stage.name, stage.what,
        inputs=[{**describe(n, available[first][n]), "source": sources[n]} for n in input_names],
        outputs=[describe(n, per_sample_outputs[first][n]) for n in output_names],
        files=[], parity_passed=True, runs_on="host",
        host_function=f"{stage.forward.__module__}.{stage.forward.__qualname__}")


def _spec_json(spec: TensorSpec | OutputSpec) -> dict:
    return {"name": spec.name, "shape": spec.shape, "dtype": spec.dtype,
            "dynamic_dims": {str(k): v for k, v in spec.dynamic_dims.items()}}


def _compare_stage_outputs(stage: StageDef, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                           tolerance: Tolerance) -> dict[str, dict]:
    """compare_arrays per output, except a stage's declared row sets, which are matched as sets of rows."""
    results: dict[str, dict] = {}
    for group in stage.row_sets:
        results.update(compare_row_set({n: reference[n] for n in group}, {n: actual[n] for n in group}, tolerance))
    for name in reference:
        if name not in results:
            results[name] = compare_arrays(reference[name], actual[name], tolerance)
    return results


def _chained_parity(output_dir: Path, stage_io: list, feeds: dict, expected: dict, chain_reference: dict,
                    tolerance: Tolerance, model: Any, contexts: dict[str, StageContext]) -> dict:
    """ONNX Runtime stages one after the other, host steps in PyTorch between them, from the model inputs to the
    end, as a deployment runs them. The one-graph outputs are compared with the eager model (wrapper.py), every
    other tensor a host step or the last graph gives with the eager stages' own (mmdet3d's code end to end)."""
    steps = []
    for stage, inputs, outputs in stage_io:
        runner = None if stage.host else OnnxRuntimeRunner(output_dir / "stages" / stage.name / "model.onnx", inputs,
                                                           outputs)
        steps.append((stage, runner, inputs, outputs))
    compared = [n for stage, _, _, outputs in steps for n in outputs
                if stage.host or stage is steps[-1][0] or n in next(iter(expected.values()))]
    worst = 0.0
    passed = True
    notes: list[str] = []
    diverged: list[dict] = []  # host steps whose outputs differ from the eager chain's
    reordered: list[dict] = []  # row sets that matched the eager chain's in another order
    for sample, feed in feeds.items():
        tensors = dict(feed)
        measured: dict[str, dict] = {}  # each stage output's comparison, as it came (row sets matched)
        for stage, runner, inputs, outputs in steps:
            if runner is not None:
                tensors.update(runner.infer({n: tensors[n] for n in inputs}))
            else:
                with torch.no_grad():
                    given = stage.forward(model, {n: torch.from_numpy(np.ascontiguousarray(tensors[n]))
                                                  for n in inputs}, contexts[sample])
                tensors.update({n: t.detach().cpu().numpy() for n, t in given.items()})
            # Every output is measured (a host step's failure names its inputs' differences); the compared ones
            # decide the verdict.
            reference = {n: expected[sample][n] if n in expected[sample] else chain_reference[sample][n] for n in outputs}
            measured.update(_compare_stage_outputs(stage, reference, {n: tensors[n] for n in outputs}, tolerance))
            results = {n: measured[n] for n in outputs if n in compared}
            moved = {n: m["rows_moved"] for n, m in results.items() if m.get("rows_moved") and m["passed"]}
            if moved:
                reordered.append({"sample": sample, "step": stage.name, "outputs": sorted(moved),
                                  "rows_moved": max(moved.values()), "rows": len(tensors[next(iter(moved))])})
            differs = [n for n, m in results.items() if not m["passed"]]
            if stage.host and differs:
                # A selection step (NMS, top-k) fed inputs within tolerance may still choose differently where
                # candidates' scores are closer than those differences, and a decoding step may amplify them (a
                # small coordinate built from large ones). Record it with its inputs' largest difference, fail the
                # chain, and carry on from the eager step's outputs so the later graphs are still checked on
                # chained inputs.
                input_diff = max((measured[n]["max_abs"] for n in inputs if n in measured), default=0.0)
                diverged.append({"sample": sample, "step": stage.name, "outputs": differs,
                                 "inputs_max_abs": input_diff})
                why = "; ".join(sorted({results[n]["note"] for n in differs if results[n].get("note")}))
                notes.append(f"{sample}: host step {stage.name} differs from eager's ({', '.join(differs)}"
                             f"{': ' + why if why else ''}) on inputs within {input_diff:.3g} of the eager "
                             "chain's; continuing from the eager step's outputs")
                for n in outputs:
                    tensors[n] = chain_reference[sample][n]
                passed = False
                continue
            for name, metrics in results.items():
                worst = max(worst, metrics["max_abs"])
                passed = passed and metrics["passed"]
                if not metrics["passed"]:
                    detail = metrics.get("note") or "max abs %.3g" % metrics["max_abs"]
                    notes.append(f"{sample} {name}: {detail}")
    log.info("  chained onnxruntime stages vs eager model: max_abs %.2e  %s", worst, "pass" if passed else "FAIL")
    for entry in reordered:
        log.info("    %s: %s's %s matched the eager chain's as a row set, %d of %d rows in another order",
                 entry["sample"], entry["step"], ", ".join(entry["outputs"]), entry["rows_moved"], entry["rows"])
    for note in notes[:6]:
        log.info("    %s", note)
    return {"runtime": "onnxruntime" + (" + host steps in PyTorch" if any(s.host for s, *_ in steps) else ""),
            "reference": "eager model (wrapper.py) for its outputs, eager stages for the rest",
            "samples": list(feeds), "compared": compared, "max_abs": worst, "passed": passed,
            "host_steps_diverged": diverged, "rows_reordered": reordered, "failures": notes,
            "tolerance": tolerance.describe()}


__all__ = ["SplitPlan", "StageContext", "StageDef", "boundary_stage", "camera_lidar_fusion_plan", "detections_of",
           "export_split", "hard_voxels", "numbered", "per_sample", "split_plan_for", "SplitResult", "voxel_bev_plan"]
