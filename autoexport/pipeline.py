"""The export pipeline: a list of stages (analyze, wrap, quantize/fp16, export, lower, verify, split, fidelity,
report) over one typed record of the run, writing into a staging directory that is moved into place only when
everything succeeded."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import __version__
from .analyze import Analysis, PreparedSample, analyze, prepare_more_samples
from .split import SplitResult, export_split, split_plan_for
from .configs import resolve_config
from .errors import AutoExportError, ExportFailedError, ParityFailedError, UserInputError, first_line
from .backends import BACKENDS, BackendSpec, LoweredArtifact, LoweringSource, parse_backend
from .detection_parity import near_ties_of
from .fidelity import DetectionDecoder, FidelityReport, compare_detection_outputs, compare_outputs, detection_agreement
from .patches import OpFunctionSubstitution, eager_substitutions
from .export import ExportedArtifacts, export_onnx, export_program, quiet_export_logs, save_pt2
from .manifest import Manifest
from .metadata import ExportMetadata
from .output_dir import OutputDirectory
from .padding import PaddedInputs, PaddingPlan, plan_padding
from .events import emit
from .report import consistency_line, export_info, library_versions, outputs_info, save_npz, write_json
from .result import ExportResult, export_runners, write_reports
from .backends.eager import EagerRunner
from .backends.onnxruntime import onnxruntime_kernels
from .quantize import QuantRecipe, QuantizationResult, freeze_for_export, frozen_quantizers, quantize_model, sensitivity_profile
from .half import HalfResult, to_fp16
from .samples import point_files_in
from .boundaries import heads_of
from .verify import (DEFAULT_TOLERANCES, Comparator, ParityPolicy, ParityReport, SkippedRunner, Tolerance,
                     eager_consistency, measure_against_float64)
from .wrap import build_wrapper, generate_wrapper_source, write_wrapper

log = logging.getLogger("autoexport")

FORMATS = ("pt2", "onnx")


@dataclass
class ExportOptions:
    config: str
    output_dir: Path
    checkpoint: str | None = None
    trust_checkpoint: bool = False  # full unpickle of the checkpoint (may run code): the user's explicit opt-in
    formats: tuple[str, ...] = FORMATS
    device: str = "cpu"
    scope: str = "network"  # network (raw head tensors) or detections (points in, boxes out: detections.py)
    samples: list[Path] = field(default_factory=list)
    data_info: Path | None = None  # an mmdet3d info .pkl whose records are the samples (instead of --sample)
    data_root: Path | None = None  # the folder the info file's paths are relative to (default: its own folder)
    overwrite: bool = False
    seed: int = 0
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    parity: ParityPolicy = field(default_factory=ParityPolicy)  # which compare function decides each output
    backends: tuple[str, ...] = ()  # backend specs (iree, iree:cuda, aoti, tensorrt:fp16, ...)
    # Static padding for backends that use it: dynamic (none), auto (the model's own bound) or N rows. Dynamic is the
    # default: on CPU, padding nuScenes PointPillars' ~17k voxels to 40k made IREE 1.5x slower (benchmarks/RESULTS.md).
    capacity: str = "dynamic"
    # Reduced precision: fp32 (default), int8 (post-training quantization) or fp16.
    precision: str = "fp32"
    quant: QuantRecipe = field(default_factory=QuantRecipe)
    calib_data: Path | None = None  # folder of point cloud files for calibration; synthesized when None
    eval_samples: int = 20  # held-out samples for the fidelity report (never used for calibration)
    agreement_score_thr: float | None = None  # detection agreement at this score threshold (default: test_cfg's)
    sensitivity: bool = False  # int8: per-layer sensitivity profile in the fidelity report
    split: bool = False  # also export named stages (split.py) with per-stage and chained parity
    verbose: bool = False


class StageLog:
    """Per-stage log lines with timings; the timings also go into metadata.json. An unexpected exception inside a
    stage (a bug, not bad input) becomes an ExportFailedError naming the stage and what was being exported."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.timings: dict[str, float] = {}
        self.subject = ""  # the model class and the registry entries used, once known

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.index += 1
        log.info("[%d/%d] %s: %s", self.index, self.total, name, what)
        emit("stage", name=name, status="start")
        start = time.perf_counter()
        try:
            yield
        except AutoExportError:
            raise
        except Exception as err:  # noqa: BLE001 - anything else is a bug: say where, keep the trace as the cause
            subject = f" of {self.subject}" if self.subject else ""
            raise ExportFailedError(f"unexpected {type(err).__name__} in stage {name}{subject}: "
                                    f"{first_line(str(err))[:300]}; this is a bug of autoexport or of that registry "
                                    "entry: rerun with --verbose for the trace and report it") from err
        self.timings[name] = round(time.perf_counter() - start, 3)
        log.info("[%d/%d] %s done in %.1f s", self.index, self.total, name, self.timings[name])
        emit("stage", name=name, status="done", seconds=self.timings[name])


def describe_subject(analysis: Analysis) -> str:
    """The model class and the tensor path registry entry it was exported with, for error messages."""
    from .boundaries import describe_boundary

    return describe_boundary(analysis.model)


def _feed(manifest: Manifest, sample: PreparedSample) -> dict[str, np.ndarray]:
    by_path = sample.tensors()
    return {spec.name: by_path[spec.path].detach().cpu().numpy() for spec in manifest.inputs}


# Backends the detections graph is known not to lower to, and why (docs/guides/deploy-detections.md).
DETECTIONS_SCOPE_UNSUPPORTED = {
    "iree": ("in-graph voxelization groups points with a data-dependent sort, and IREE 3.13's ONNX import lowers "
             "neither onnx.Unique nor a TopK of dynamic k (it asks for an unbounded stack buffer)"),
}


def _check_backends(options: ExportOptions, formats: tuple[str, ...]) -> list[BackendSpec]:
    """Parse --backend values and fail before any work when a backend cannot be used here."""
    specs = list(dict.fromkeys(parse_backend(b) for b in options.backends))
    if any(s.kind == "tensorrt" for s in specs) and "onnx" not in formats:
        raise UserInputError("--backend tensorrt builds from model.onnx: use --format onnx or --format both")
    if options.data_info and options.samples:
        raise UserInputError("--data-info and --sample both name the samples: pass one of them")
    if options.data_root and not options.data_info:
        raise UserInputError("--data-root applies to --data-info: pass the info file too")
    unsupported = [str(s) for s in specs if s.kind in DETECTIONS_SCOPE_UNSUPPORTED]
    if options.scope == "detections" and unsupported:
        kind = unsupported[0].split(":")[0]
        raise UserInputError(f"--backend {unsupported[0]} with --scope detections: {DETECTIONS_SCOPE_UNSUPPORTED[kind]}; "
                             "pt2 and onnxruntime run the detections graph (or export --scope network for this backend)")
    for spec in specs:
        reason = BACKENDS[spec.kind].missing_dependency(spec)
        if reason:
            raise UserInputError(f"--backend {spec}: {reason}")
    if options.capacity not in ("auto", "dynamic") and not (options.capacity.isdigit() and int(options.capacity) > 0):
        raise UserInputError(f"--capacity must be auto, dynamic or a positive integer, not {options.capacity!r}")
    return specs


def _padding_plan(model: torch.nn.Module, manifest: Manifest, capacity: str) -> PaddingPlan | None:
    if capacity == "dynamic":
        return None
    plan = plan_padding(model, manifest, None if capacity == "auto" else int(capacity))
    if plan:
        log.info("  static padding: %s up to %d (%s)", plan.dim, plan.capacity, plan.rule)
    else:
        log.info("  no static padding rule for this model: backends get dynamic shapes")
    return plan


def _variant_exporter(wrapper: torch.nn.Module, model: torch.nn.Module, analysis: Analysis, example_feed: dict[str, np.ndarray],
                      staging: Path, record: dict[str, dict], verbose: bool):  # noqa: ANN202
    """Exports a backend-specific variant of the model to ONNX once, on first request."""
    manifest = analysis.manifest
    cache: dict[tuple[str, int | None], Path] = {}

    def export_variant(variant: str, plan: PaddingPlan | None) -> Path:
        key = (variant, plan.capacity if plan else None)
        if key in cache:
            return cache[key]
        module = PaddedInputs(wrapper, manifest, plan) if plan else wrapper
        feed = plan.pad_feed(example_feed) if plan else example_feed
        names = manifest.input_names + ([plan.count_input] if plan else [])
        example = tuple(torch.from_numpy(np.array(feed[n], copy=True)).to(analysis.device) for n in names)
        log.info("  export variant %r%s", variant, f" with {plan.dim} padded to {plan.capacity}" if plan else "")
        exported = export_program(module, model, manifest, example, verbose, variant=variant, plan=plan)
        path = staging / f".model.{variant}.onnx"
        export_onnx(exported.program, names, manifest.output_names, path, verbose)
        record[variant if not plan else f"{variant}-padded{plan.capacity}"] = {
            "onnx": str(path), "padding": plan.to_json() if plan else None,
            "export_patches": [f"{p.target}.{p.method}" for p in exported.patches]}
        cache[key] = path
        return path

    return export_variant


PRECISIONS = ("fp32", "int8", "fp16")
# Which artifact stands for the reduced-precision model in the fidelity report, first available wins. INT8: ONNX
# Runtime's integer kernels are the deployed form. FP16: model.pt2; ONNX Runtime's CPU FP16 path is no deployment
# target and even slower than torch's.
FIDELITY_RUNTIMES = {"int8": ("onnxruntime", "pt2"), "fp16": ("pt2", "onnxruntime")}
FIDELITY_MIN_COSINE = 0.99  # reduced-precision outputs against FP32, when the precision's tolerance names none


def _check_precision(options: ExportOptions) -> list[Path]:
    """Validate the reduced-precision flags before any work; returns the calibration files (may be empty)."""
    if options.precision not in PRECISIONS:
        raise UserInputError(f"--precision {options.precision!r}: choose from {', '.join(PRECISIONS)}")
    if options.precision != "int8" and (options.calib_data or options.sensitivity or options.quant != QuantRecipe()):
        raise UserInputError("--calib-data, --calib-samples, --calibrator, --amax-method, --skip-layers and "
                             "--sensitivity apply to --precision int8 only")
    if options.precision == "fp32":
        return []
    if options.eval_samples < 1:
        raise UserInputError("--eval-samples must be at least 1")
    options.quant.validate()
    if options.calib_data is None:
        return []
    folder = options.calib_data
    if not folder.is_dir():
        raise UserInputError(f"--calib-data {folder}: not a directory")
    files = point_files_in(folder)
    if not files:
        raise UserInputError(f"--calib-data {folder}: no point cloud files (.bin or .npy) in it; put the dataset's "
                             "own lidar files there (e.g. KITTI velodyne/*.bin)")
    return files


def _reduce_precision(options: ExportOptions, analysis: Analysis, run_factory, calib_files: list[Path]):  # noqa: ANN001, ANN202
    """int8: quantize a copy of the model (calibrating on pipeline samples); fp16: convert a copy."""
    if options.precision == "fp16":
        if options.device == "cpu":
            log.warning("  FP16 on CPU: torch and ONNX Runtime have no fast FP16 kernels for this CPU (PointPillars: "
                        "~40 s per sample vs ~2.5 s in FP32); FP16 is for GPUs (--device cuda, TensorRT)")
        result = to_fp16(analysis.model)
        log.info("  fp16 sections: %s; kept in fp32: %s", ", ".join(result.sections),
                 ", ".join(result.float_sections) or "-")
        return result
    recipe = options.quant
    calib = prepare_more_samples(analysis, "calib", recipe.calib_samples, calib_files, options.seed + 1000)
    origin = f"{min(len(calib_files), len(calib))} files from {options.calib_data}" if calib_files else "synthesized"
    log.info("  calibration samples: %d (%s), %s calibrator%s", len(calib), origin, recipe.calibrator,
             f" with {recipe.amax_method} amax" if recipe.calibrator == "histogram" else "")
    feeds = [_feed(analysis.manifest, s) for s in calib]
    result = quantize_model(analysis.model, recipe, run_factory, feeds)
    result.calibration["origin"] = origin
    log.info("  quantized %d layers (%d kept in float), folded %d BatchNorms, %d shared input quantizers",
             len(result.layers), len(result.float_layers), len(result.folded_batchnorms),
             sum(1 for g in result.shared_groups if len(g["layers"]) > 1 or g["concat"]))
    for path, why in result.float_layers.items():
        log.info("  float: %s (%s)", path, why)
    return result


def _fidelity(options: ExportOptions, analysis: Analysis, fp32_runner: EagerRunner, candidates: list,
              reduced, eval_files: list[Path], staging: Path, run_factory) -> FidelityReport:  # noqa: ANN001
    """Reduced precision against FP32 on held-out samples: raw outputs and decoded detections."""
    manifest = analysis.manifest
    samples = prepare_more_samples(analysis, "heldout", options.eval_samples, eval_files, options.seed + 2000)
    feeds = [_feed(manifest, s) for s in samples]
    by_name = {r.name: r for r in candidates}
    candidate = next(by_name[n] for n in FIDELITY_RUNTIMES[options.precision] if n in by_name)
    log.info("  %d held-out samples: FP32 eager vs %s %s", len(feeds), options.precision.upper(), candidate.name)
    reference, outputs = [], []
    for index, feed in enumerate(feeds):
        reference.append(fp32_runner.infer(feed))
        outputs.append(candidate.infer(feed))
        if (index + 1) % 5 == 0 or index + 1 == len(feeds):
            log.info("  fidelity %d/%d samples", index + 1, len(feeds))
    target = options.tolerances.get(options.precision)
    report = FidelityReport(options.precision, candidate.name, "eager PyTorch FP32 (the FP32 export reproduces it "
                            "to 1e-4)", [s.name for s in samples],
                            (target.min_cosine if target and target.min_cosine else FIDELITY_MIN_COSINE))
    if options.scope == "detections":
        report.outputs, report.detection = compare_detection_outputs(reference, outputs,
                                                                     near_ties_of(analysis.model).score_thr)
        report.notes.append("--scope detections: the outputs are a selection, so boxes_3d and scores_3d are compared "
                            "over the boxes matched one-to-one (same label, BEV IoU >= 0.5); boxes only one side "
                            "kept count in the detection agreement")
    else:
        report.outputs = compare_outputs(reference, outputs, manifest.output_names)
        _add_decoded_agreement(report, options, analysis, samples, reference, outputs)
    if not analysis.checkpoint:
        report.notes.append("random weights (no --checkpoint): scores sit near the classifier prior, so few boxes "
                            "pass the score threshold and they are borderline; detection agreement means more with "
                            "trained weights (benchmarks/train_synthetic.py trains some on synthetic scenes)")
    if isinstance(reduced, QuantizationResult):
        report.extra["quantization"] = reduced.to_json()
        if options.sensitivity:
            run = run_factory(reduced.model)
            profile = sensitivity_profile(reduced.model, run, reference[:2], feeds[:2])
            report.extra["sensitivity"] = profile
            log.info("  most sensitive layers (1 - cosine with only that layer quantized): %s",
                     ", ".join(f"{r['layer']} {r['one_minus_cosine']:.1e}" for r in profile[:5]))
        if candidate.name == "onnxruntime":
            kernels = onnxruntime_kernels(staging / "model.onnx")
            report.extra["onnxruntime_kernels"] = kernels
            integer = {k: v for k, v in kernels.items() if k.startswith("QLinear") or k.endswith("Integer")}
            report.notes.append(f"ONNX Runtime CPU runs {sum(integer.values())} integer kernels "
                                f"({', '.join(f'{k} x{v}' for k, v in integer.items()) or 'none'}); float convs left: "
                                f"{kernels.get('Conv', 0) + kernels.get('FusedConv', 0) + kernels.get('ConvTranspose', 0)}"
                                " (outputs of the graph and transposed convs)")
    else:
        report.extra["fp16"] = reduced.to_json()
    return report


def _add_decoded_agreement(report: FidelityReport, options: ExportOptions, analysis: Analysis, samples: list,
                           reference: list, outputs: list) -> None:
    """Detection agreement of network-scope outputs, decoded by the model's own head."""
    heads = heads_of(analysis.model, analysis.boundary)
    try:
        decoder = DetectionDecoder(heads[0], analysis.manifest, options.agreement_score_thr) if len(heads) == 1 else None
    except LookupError as err:
        decoder = None
        report.notes.append(f"detection agreement not computed: {err}")
    if decoder is not None:
        metas = [[d.metainfo for d in s.data_samples] for s in samples]
        report.detection = detection_agreement(decoder, reference, outputs, metas)


@contextmanager
def float64_points() -> Iterator[None]:
    """mmdet3d's point structures (BasePoints) cast whatever they wrap to float32, which a float64 run cannot pass
    through (MVX-Net's point fusion wraps its points to rotate them back). While the float64 yardstick runs, a
    float64 tensor stays float64, unrounded; restored after."""
    from mmdet3d.structures.points.base_points import BasePoints

    original = BasePoints.__init__

    def init(self: BasePoints, tensor: object, *args: object, **kwargs: object) -> None:
        original(self, tensor, *args, **kwargs)
        if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
            self.tensor = tensor.reshape(self.tensor.shape).clone()

    BasePoints.__init__ = init
    try:
        yield
    finally:
        BasePoints.__init__ = original


def _float64_reference(model: torch.nn.Module, wrapper_path: Path, manifest: Manifest, feeds: dict[str, dict],
                       device: str) -> dict[str, dict[str, np.ndarray]]:
    """Eager outputs of a float64 copy of the model on float64 inputs: the yardstick for fp32 rounding."""
    runner = EagerRunner(build_wrapper(wrapper_path, copy.deepcopy(model).double()), manifest.input_names,
                         manifest.output_names, device)
    with float64_points():
        return {name: runner.infer({k: v.astype(np.float64) if v.dtype == np.float32 else v
                                    for k, v in feed.items()})
                for name, feed in feeds.items()}


def _diagnose_with_float64(parity: ParityReport, comparator: Comparator, model: torch.nn.Module, wrapper_path: Path,
                           manifest: Manifest, feeds: dict[str, dict], expected: dict[str, dict],
                           device: str) -> None:
    # Only failures with outputs to measure: a missing output or a crashed runtime has nothing to compare.
    samples = {sample for _, sample, _ in comparator.failed_outputs}
    if not samples:
        return
    # The float64 rule measures the artifact against eager fp32's own rounding: first, eager must agree with itself.
    eager = EagerRunner(build_wrapper(wrapper_path, model), manifest.input_names, manifest.output_names, device)
    parity.consistency = eager_consistency(eager.infer, {s: feeds[s] for s in samples},
                                           {s: expected[s] for s in samples}, parity.tolerance)
    log.info("  eager self-consistency: %s", consistency_line(parity.consistency))
    try:
        expected64 = _float64_reference(model, wrapper_path, manifest, {s: feeds[s] for s in samples}, device)
    except Exception as exc:  # noqa: BLE001 - models that hard-code float32 cannot run in float64
        log.info("  float64 reference not available (%s: %s); the elementwise verdicts stand", type(exc).__name__,
                 str(exc).splitlines()[0][:160])
        return
    for name, outputs in expected64.items():  # for `autoexport verify`, which has no model to run in float64
        save_npz(wrapper_path.parent / "reference_float64" / f"{name}.npz", outputs)
    measure_against_float64(parity, comparator.failed_outputs, expected, expected64)
    for check in parity.checks:
        if check.float64:
            log.info("  %s %s on %s, %s: %s", check.runtime, check.output, check.sample, check.rule,
                     "pass" if check.passed else "FAIL")
            log.info("    %s", check.note)


def _eager_reference_name(applied: list, in_eager: set[tuple[str, str]]) -> str:
    """What the parity reference ran: mmdet3d's code, except the patches that also ran in eager PyTorch because
    mmcv or mmdet3d cannot run this model's original code on this device (metadata.json: in_eager_reference)."""
    also = sorted({f"{p.target}.{p.method}" for p in applied if (p.target, p.method) in in_eager})
    if not also:
        return "eager PyTorch (the original mmdet3d code through wrapper.py)"
    return (f"eager PyTorch (mmdet3d's code through wrapper.py, with {', '.join(also)} replaced as in the export, "
            "where the original cannot run here; see metadata.json export_patches)")


def _check_split_options(precision: str, formats: tuple[str, ...], who: str) -> None:
    """A split export is FP32 stages checked chained in ONNX Runtime; `who` asked for it (--split or the model)."""
    if precision != "fp32":
        raise UserInputError(f"{who} exports FP32 stages; it cannot be combined with --precision {precision} yet")
    if "onnx" not in formats:
        raise UserInputError(f"{who} checks the stages chained in ONNX Runtime: use --format onnx or both")


@dataclass
class ExportRun:
    """What the stages of one export hand on to each other. Filled in stage order; a stage reads only what the
    stages before it set."""

    options: ExportOptions
    formats: tuple[str, ...]
    specs: list[BackendSpec]
    calib_files: list[Path]
    config_path: Path
    staging: Path
    eager_substituted: list  # patches the eager reference runs too (mmcv has no kernel for them on this device)
    host_calls: dict[str, OpFunctionSubstitution]
    analysis: Analysis | None = None
    split: bool = False  # --split, or a model whose one graph is only its first stage
    wrapper_path: Path | None = None
    fp32_wrapper: torch.nn.Module | None = None
    wrapper: torch.nn.Module | None = None  # what is exported: the FP32 wrapper or the reduced-precision one
    export_model: torch.nn.Module | None = None
    reduced: QuantizationResult | HalfResult | None = None
    feeds: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    expected: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    exported: ExportedArtifacts | None = None  # the program and the patches applied
    artifacts: list[LoweredArtifact] = field(default_factory=list)
    not_built: list[SkippedRunner] = field(default_factory=list)  # backends whose lowering failed
    variants: dict[str, dict] = field(default_factory=dict)
    runners: list = field(default_factory=list)
    parity: ParityReport | None = None
    split_result: SplitResult | None = None
    fidelity: FidelityReport | None = None
    metadata: ExportMetadata | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage and sub-step (metadata.json)

    @property
    def manifest(self) -> Manifest:
        return self.analysis.manifest

    @property
    def in_eager(self) -> set[tuple[str, str]]:
        return {(e.target, e.method) for e in self.eager_substituted}

    @property
    def quantized_reference(self) -> bool:
        """INT8 artifacts are checked against the quantized model in eager PyTorch (its fake quantization): INT8
        error itself is the fidelity report's subject."""
        return self.options.precision == "int8"

    @property
    def passed(self) -> bool:
        return (self.parity.passed and (self.fidelity is None or self.fidelity.passed)
                and (self.split_result is None or self.split_result.passed))

    def run_factory(self, model: torch.nn.Module):  # noqa: ANN201
        """An eager runner's infer over another copy of the model (quantization calibrates and profiles with it)."""
        return EagerRunner(build_wrapper(self.wrapper_path, model), self.manifest.input_names,
                           self.manifest.output_names, self.options.device).infer


def _stage_analyze(run: ExportRun) -> str:
    options = run.options
    run.analysis = analysis = analyze(run.config_path, options.checkpoint, options.device, options.samples,
                                      options.seed, options.verbose, trust_checkpoint=options.trust_checkpoint,
                                      scope=options.scope,
                                      data_info=(options.data_info, options.data_root) if options.data_info else None)
    run.split = options.split or bool(analysis.boundary.split_required)
    if run.split and not options.split:
        # The one graph is only the first stage; the split export carries the rest of the model.
        log.info("  %s: one graph covers its first stage only (%s); the split export runs as with --split",
                 analysis.model_type, analysis.boundary.split_required)
        _check_split_options(options.precision, run.formats, f"{analysis.model_type}'s split export (its one graph "
                             "is only its first stage)")
    if run.split:
        split_plan_for(analysis.model)  # a clear error before any export work when no plan is registered
    for spec in run.manifest.inputs:
        log.info("  input %-20s %-8s %s dynamic %s", spec.name, spec.dtype, spec.shape, spec.dynamic_dims or "-")
    return describe_subject(analysis)


def _stage_wrap(run: ExportRun) -> None:
    analysis = run.analysis
    run.wrapper_path = run.staging / "wrapper.py"
    write_wrapper(run.wrapper_path, generate_wrapper_source(run.manifest, analysis.metainfo,
                                                            analysis.boundary.forward_name, analysis.model_type,
                                                            run.config_path.stem, analysis.boundary.forward_options))
    run.wrapper = run.fp32_wrapper = build_wrapper(run.wrapper_path, analysis.model)
    run.export_model = analysis.model


def _stage_reduce_precision(run: ExportRun) -> None:
    run.reduced = _reduce_precision(run.options, run.analysis, run.run_factory, run.calib_files)
    run.export_model = run.reduced.model
    if isinstance(run.reduced, QuantizationResult):
        freeze_for_export(run.export_model)
    run.wrapper = build_wrapper(run.wrapper_path, run.export_model)


def _reference_outputs(run: ExportRun) -> None:
    """The stored inputs and the eager reference's outputs on them. The reference runs the original mmdet3d code
    (no export patches) through the generated wrapper; INT8 artifacts are checked against the quantized model
    (run.quantized_reference). FP16 artifacts are checked against FP32 with the fp16 tolerance, as TensorRT FP16
    engines are; FP16 eager on CPU is no better defined reference."""
    run.feeds = {s.name: _feed(run.manifest, s) for s in run.analysis.samples}
    for name, feed in run.feeds.items():
        save_npz(run.staging / "inputs" / f"{name}.npz", feed)
    eager = EagerRunner(run.wrapper if run.quantized_reference else run.fp32_wrapper, run.manifest.input_names,
                        run.manifest.output_names, run.options.device)
    with frozen_quantizers() if run.quantized_reference else contextlib.nullcontext():
        run.expected = {name: eager.infer(feed) for name, feed in run.feeds.items()}
    for name, outputs in run.expected.items():
        save_npz(run.staging / "reference" / f"{name}.npz", outputs)


def _stage_export(run: ExportRun) -> None:
    _reference_outputs(run)
    manifest, options = run.manifest, run.options
    with quiet_export_logs(options.verbose):
        example = tuple(torch.from_numpy(run.feeds[run.analysis.export_samples[0].name][n].copy()).to(options.device)
                        for n in manifest.input_names)
        t0 = time.perf_counter()
        run.exported = export_program(run.wrapper, run.export_model, manifest, example, options.verbose)
        save_pt2(run.exported.program, run.staging / "model.pt2")  # also the source of PT2 parity for ONNX only
        run.timings["torch_export_s"] = round(time.perf_counter() - t0, 3)
        if "onnx" in run.formats:
            t0 = time.perf_counter()
            export_onnx(run.exported.program, manifest.input_names, manifest.output_names,
                        run.staging / "model.onnx", options.verbose)
            run.timings["onnx_s"] = round(time.perf_counter() - t0, 3)


def _stage_lower(run: ExportRun) -> None:
    options = run.options
    with quiet_export_logs(options.verbose):
        source = LoweringSource(
            staging=run.staging, manifest=run.manifest, program=run.exported.program,
            onnx_path=run.staging / "model.onnx" if "onnx" in run.formats else None,
            padding=_padding_plan(run.analysis.model, run.manifest, options.capacity),
            export_variant=_variant_exporter(run.wrapper, run.export_model, run.analysis,
                                             run.feeds[run.analysis.export_samples[0].name], run.staging,
                                             run.variants, options.verbose),
            verbose=options.verbose)
        for spec in run.specs:
            try:
                artifact = BACKENDS[spec.kind].lower(spec, source)
            except ExportFailedError as err:
                # One backend's compiler failing says nothing about the others: record it, check the rest.
                log.info("  %s: lowering failed: %s", spec.name, first_line(str(err)))
                run.not_built.append(SkippedRunner(spec.name, str(err)))
                continue
            run.artifacts.append(artifact)
            run.timings[f"lower_{spec.name}_s"] = artifact.compile_s
        for variant in run.variants.values():
            Path(variant.pop("onnx")).unlink(missing_ok=True)  # intermediate: the artifacts are what ship


def _stage_verify(run: ExportRun) -> None:
    options = run.options
    run.runners, skipped = export_runners(run.staging, run.manifest, run.artifacts, options.device,
                                          precision=options.precision)
    for item in skipped:
        log.info("  %s: not run (%s)", item.runtime, item.reason)
    reference_name = (_eager_reference_name(run.exported.patches, run.in_eager) if not run.quantized_reference
                      else "eager PyTorch of the INT8 model (its frozen quantize/dequantize ops, wrapper.py)")
    comparator = Comparator(options.tolerances, policy=options.parity, row_sets=run.analysis.boundary.row_sets)
    run.parity = comparator.compare(run.runners, run.feeds, run.expected,
                                    ParityReport(reference_name, options.tolerances, skipped=skipped,
                                                 not_built=run.not_built))
    if not run.quantized_reference and any(c.precision != "int8" for c in run.parity.failures()):
        _diagnose_with_float64(run.parity, comparator, run.analysis.model, run.wrapper_path, run.manifest,
                               run.feeds, run.expected, options.device)


def _stage_split(run: ExportRun) -> None:
    analysis, options = run.analysis, run.options
    with quiet_export_logs(options.verbose):
        run.split_result = export_split(analysis.model, run.manifest, run.feeds,
                                        [s.name for s in analysis.export_samples], run.expected, run.staging,
                                        options.tolerances["fp32"], options.device, options.verbose,
                                        metainfo={s.name: [dict(d.metainfo) for d in s.data_samples]
                                                  for s in analysis.samples})
    write_json(run.staging / "stages.json", run.split_result.to_json())


def _stage_fidelity(run: ExportRun) -> None:
    options, manifest = run.options, run.manifest
    fp32 = EagerRunner(run.fp32_wrapper, manifest.input_names, manifest.output_names, options.device)
    eval_files = run.calib_files[options.quant.calib_samples:]
    run.fidelity = fidelity = _fidelity(options, run.analysis, fp32, run.runners, run.reduced, eval_files,
                                        run.staging, run.run_factory)
    write_json(run.staging / "quant_report.json", fidelity.to_json())
    (run.staging / "quant_report.md").write_text(fidelity.to_markdown(
        f"{options.precision.upper()} fidelity of {run.config_path.stem}"))
    log.info("  fidelity: %s", ", ".join(f"{o.output} cos {o.min_cosine:.5f}" for o in fidelity.outputs[:4])
             + (" ..." if len(fidelity.outputs) > 4 else ""))
    if fidelity.detection:
        d = fidelity.detection
        log.info("  detections: %d FP32 / %d %s boxes, %d matched (precision %s, recall %s)", d["reference_boxes"],
                 d["candidate_boxes"], options.precision.upper(), d["matched"], d["precision"], d["recall"])


def _stage_detections(run: ExportRun) -> None:
    from .detection_parity import DetectionParity, compare_detections, detections_from_outputs, near_ties_of
    from .fidelity import mmdet3d_detections

    model, samples = run.analysis.model, {s.name: s for s in run.analysis.samples}
    reference = {name: mmdet3d_detections(model, feed["points"], samples[name].data_samples, run.options.device)
                 for name, feed in run.feeds.items()}
    parity = DetectionParity("mmdet3d's own inference on the same test-pipeline output (its data preprocessor, "
                             "network, decoding and NMS: inference_detector after its pipeline)", near_ties_of(model))
    for runner in run.runners:
        for name, feed in run.feeds.items():
            candidate = detections_from_outputs(runner.infer(feed))
            parity.samples.append(compare_detections(name, runner.name, reference[name], candidate, parity.ties))
    for s in parity.samples:
        log.info("  %-12s %-10s %3d mmdet3d / %3d exported boxes, %3d matched, max box diff %.2g  %s", s.runtime,
                 s.sample, s.reference_boxes, s.candidate_boxes, s.matched, s.max_box_diff,
                 "pass" if s.passed else "FAIL: " + "; ".join(s.unexplained[:2]))
    run.parity.detections = parity


def _stage_report(run: ExportRun) -> None:
    if "pt2" not in run.formats:
        (run.staging / "model.pt2").unlink()
    run.metadata = _metadata(run)
    write_json(run.staging / "metadata.json", run.metadata.to_json())
    write_reports(run.parity, run.staging, f"Parity of {run.config_path.stem}")


@dataclass(frozen=True)
class Stage:
    """One numbered step of an export: `run` does it, `describe` is its log line, `applies` says whether this
    export has it (the stage count follows from the list)."""

    name: str
    run: Callable[..., object]
    describe: Callable[[ExportRun], str]
    applies: Callable[[ExportRun], bool] = lambda run: True


def _verify_line(run: ExportRun) -> str:
    runtimes = " vs ".join(run.formats + tuple(a.backend for a in run.artifacts))
    return f"eager vs {runtimes} on {len(run.feeds)} samples ({run.options.tolerances[run.options.precision].describe()})"


STAGES: tuple[Stage, ...] = (
    Stage("analyze", _stage_analyze,
          lambda run: f"build {run.config_path.stem}, run its test pipeline and data preprocessor"),
    Stage("wrap", _stage_wrap, lambda run: "generate wrapper.py"),
    Stage("quantize", _stage_reduce_precision, lambda run: "quantize to INT8 with pytorch-quantization",
          applies=lambda run: run.options.precision == "int8"),
    Stage("fp16", _stage_reduce_precision, lambda run: "convert the dense sections to FP16",
          applies=lambda run: run.options.precision == "fp16"),
    Stage("export", _stage_export, lambda run: f"torch.export{' + ONNX' if 'onnx' in run.formats else ''}"),
    Stage("lower", _stage_lower, lambda run: ", ".join(str(s) for s in run.specs),
          applies=lambda run: bool(run.specs)),
    Stage("verify", _stage_verify, _verify_line),
    # FP32 only: mmdet3d's inference is the FP32 model, and reduced precision moves scores far beyond the near-tie
    # tolerances of this check; INT8/FP16 boxes are compared with the reduced model's own (verify) and FP32 (fidelity).
    Stage("detections", _stage_detections,
          lambda run: "exported boxes against mmdet3d's own inference on every sample",
          applies=lambda run: run.options.scope == "detections" and run.options.precision == "fp32"),
    Stage("split", _stage_split, lambda run: "export named stages, check each alone and chained",
          applies=lambda run: run.split),
    Stage("fidelity", _stage_fidelity,
          lambda run: f"{run.options.precision.upper()} against FP32 on {run.options.eval_samples} held-out samples, "
                      "outputs and decoded detections",
          applies=lambda run: run.options.precision != "fp32"),
    Stage("report", _stage_report, lambda run: "write metadata.json and parity.json/.md/.xml"),
)


def _run_stages(run: ExportRun, stages: StageLog) -> None:
    for stage in STAGES:
        if not stage.applies(run):
            continue
        with stages.stage(stage.name, stage.describe(run)):
            subject = stage.run(run)
        if stage.name == "analyze":
            stages.subject = subject
            stages.total = sum(1 for s in STAGES if s.applies(run))  # a model may need its split export


def _prepare(options: ExportOptions, eager_substituted: list, host_calls: dict) -> tuple[ExportRun, OutputDirectory]:
    """Every check on the options that needs no model, then the claimed output directory."""
    formats = tuple(f for f in FORMATS if f in options.formats)
    if not formats:
        raise UserInputError(f"--format must name at least one of {FORMATS}")
    specs = _check_backends(options, formats)
    calib_files = _check_precision(options)
    if options.split:
        _check_split_options(options.precision, formats, "--split")
    config_path = resolve_config(options.config)
    destination = OutputDirectory(options.output_dir.resolve(), options.overwrite)
    staging = destination.claim()
    run = ExportRun(options, formats, specs, calib_files, config_path, staging, eager_substituted, host_calls,
                    split=options.split)
    return run, destination


def run_export(options: ExportOptions) -> ExportResult:
    # Where mmcv has no kernel for an op on this device (sparse convolution on CPU), the eager reference runs the
    # op library's substitute, which tests/test_ops.py checks against mmcv or a dense reference.
    host_calls: dict[str, OpFunctionSubstitution] = {}
    with eager_substitutions(options.device, calls=host_calls) as substituted:
        for patch in substituted:
            if patch.method and patch.substitutes:
                log.info("  %s has no %s kernel in mmcv here: the eager reference uses autoexport.ops' substitute",
                         patch.substitutes, options.device)
        functions = [p.substitutes.rsplit(".", 1)[-1] for p in substituted if not p.method]
        if functions:  # bound for every model, called by few: the export log names those it called
            log.debug("  mmcv has no %s kernel for %s here: the eager reference calls autoexport.ops' versions",
                     options.device, ", ".join(functions))
        return _run_export(options, substituted, host_calls)


def _run_export(options: ExportOptions, eager_substituted: list,
                host_calls: dict[str, OpFunctionSubstitution]) -> ExportResult:
    run, destination = _prepare(options, eager_substituted, host_calls)
    stages = StageLog(0)
    run.timings = stages.timings  # one dict: the stages' times and their sub-steps'
    stages.total = sum(1 for s in STAGES if s.applies(run))
    try:
        _run_stages(run, stages)
    except BaseException:
        destination.abandon()
        raise
    output_dir = destination.target
    if not run.passed:
        _raise_failure(run, destination.commit(output_dir.parent / f"{output_dir.name}.failed"), output_dir)
    destination.commit()
    log.info("parity:\n%s", run.parity.table())
    return ExportResult(output_dir, run.manifest, run.metadata.to_json(), run.parity)


def _raise_failure(run: ExportRun, failed_dir: Path, output_dir: Path) -> None:
    """The one-paragraph verdict of a failed export, whose artifacts were kept in failed_dir."""
    parity, kept = run.parity, f"were kept in {failed_dir}, not in {output_dir}"
    if run.not_built:
        verdicts = ", ".join(f"{rt} {'passed' if ok else 'FAILED'}" for rt, ok in parity.runtime_verdicts().items())
        raise ExportFailedError("lowering failed: " + "; ".join(f"{b.runtime}: {b.reason}" for b in run.not_built)
                                + f"\nthe other artifacts were checked ({verdicts or 'none'}); they and the "
                                f"parity reports {kept}")
    if parity.passed and run.split_result is not None and not run.split_result.passed:
        result = run.split_result
        bad = [f"  stage {st.name}: max abs {st.worst_max_abs:.3g}" for st in result.stages if not st.parity_passed]
        bad += [f"  chained: {note}" for note in result.chained.get("failures", [])[:4]]
        bad += [f"  chained stages: max abs {result.chained.get('max_abs', float('nan')):.3g}"]
        raise ParityFailedError("split export parity failed:\n" + "\n".join(bad) + f"\nstages.json and the stage "
                                f"graphs {kept}")
    if parity.passed:
        fidelity = run.fidelity
        low = [o for o in fidelity.outputs if o.min_cosine < fidelity.min_cosine_target]
        lines = [f"  {o.output}: min cosine {o.min_cosine:.5f} (max abs err {o.max_abs:.3g})" for o in low[:8]]
        raise ParityFailedError(f"{run.options.precision.upper()} fidelity below cosine "
                                f"{fidelity.min_cosine_target:g} against FP32 on held-out samples:\n" + "\n".join(lines)
                                + "\nkeep sensitive layers in float (--sensitivity lists them, --skip-layers keeps "
                                f"them); the artifacts and quant_report.md {kept}")
    raise ParityFailedError("parity failed:\n" + "\n".join(_worst_checks(parity)) + f"\n{parity.table()}\n"
                            f"the artifacts {kept.replace('were kept', 'were kept for inspection')}")


def _worst_checks(parity: ParityReport) -> list[str]:
    """Up to five failed checks, worst first. A check without output (missing, or the runtime crashed) gives its
    note; a crash fails every output alike, so one line per runtime and sample."""
    worst = sorted(parity.failures(), key=lambda c: -c.mismatched)[:5]
    return list(dict.fromkeys(
        f"  {c.runtime} on {c.sample}: {c.note}" if c.max_abs == float("inf") and c.note.startswith(c.runtime)
        else f"  {c.runtime} {c.output} on {c.sample}: {c.mismatched}/{c.total} elements outside "
        f"{parity.tolerances[c.precision].describe()} (max abs {c.max_abs:.3g}, cosine {c.cosine:.6f}) {c.note}"
        for c in worst))


def _metadata(run: ExportRun) -> ExportMetadata:
    options, analysis, parity, formats = run.options, run.analysis, run.parity, run.formats
    patches = run.exported.patches
    return ExportMetadata(
        status="ok" if parity.passed else "parity_failed",
        model_config=str(run.config_path),
        config_name=run.config_path.stem,
        checkpoint=str(Path(options.checkpoint).resolve()) if options.checkpoint else None,
        weights="checkpoint" if options.checkpoint else f"random (torch.manual_seed({options.seed}), the model's "
                                                        "init_weights(), BatchNorm statistics from the export samples)",
        init_weights_failed=analysis.init_failures,  # their sub-modules were initialised one by one
        model_type=analysis.model_type,
        device=options.device,
        formats=list(formats),
        artifacts={"pt2": "model.pt2" if "pt2" in formats else None,
                   "onnx": "model.onnx" if "onnx" in formats else None, "wrapper": "wrapper.py"},
        export_info=export_info(analysis.manifest),
        outputs=outputs_info(analysis.manifest),
        samples=[{"name": s.name, "role": s.role, "origin": s.origin, "num_points": s.num_points,
                  "inputs": f"inputs/{s.name}.npz", "reference_outputs": f"reference/{s.name}.npz"}
                 for s in analysis.samples],
        export_patches=[{"target": p.target, "method": p.method, "reason": p.reason, "module_paths": list(p.module_paths),
                         "in_eager_reference": (p.target, p.method) in run.in_eager} for p in patches],
        preprocess=analysis.preprocess,
        postprocess=analysis.postprocess,
        tensor_boundary=analysis.boundary.forward_name,
        detections=({"scope": "detections", "point_range": analysis.boundary.forward_options.get("point_range"),
                     "row_sets": [list(g) for g in analysis.boundary.row_sets]}
                    if options.scope == "detections" else None),
        backends=[a.to_json() for a in run.artifacts],  # what each artifact accepts and how it was built
        export_variants=run.variants,
        parity={"passed": parity.passed, "tolerance": parity.tolerance.to_json(),
                "tolerances": {p: t.to_json() for p, t in parity.used_tolerances().items()},
                **{k: v for k, v in parity.to_json().items()
                   if k in ("summary", "skipped", "not_built", "policy", "eager_consistency")}},
        timings_s=dict(run.timings),
        versions=library_versions(),
        # The eager reference's float sums can depend on it (a near-tie flipped between 1 and 2 threads).
        torch_threads=torch.get_num_threads(),
        manifest=analysis.manifest.to_json(),
        precision=options.precision,
        substitutions=_substitutions(run),
        split={"manifest": "stages.json", "passed": run.split_result.passed,
               "stages": [st.name for st in run.split_result.stages]} if run.split_result else None,
        reduced_precision=run.reduced.to_json() if run.reduced is not None else None,
        fidelity=_fidelity_summary(run.fidelity) if run.fidelity is not None else None,
    )


def _substitutions(run: ExportRun) -> list[dict]:
    """mmcv ops the op library replaced: in the graph, and op functions only host-side code called (Cylinder3D's
    data preprocessor maps points to voxels with mmdet3d's binding of a CUDA-only kernel)."""
    patches = run.exported.patches
    in_graph = [{"op": p.substitutes, "by": f"{p.target}.{p.method} (autoexport.ops)" if p.method else p.target,
                 "module_paths": list(p.module_paths), "in_eager_reference": (p.target, p.method) in run.in_eager}
                for p in patches if p.substitutes]
    graph_ops = {p.substitutes for p in patches}
    return in_graph + [
        {"op": path, "by": f"autoexport.ops.{sub.library_module}.{sub.library_function} (autoexport.ops)",
         "module_paths": [], "in_eager_reference": True, "host_side": True, "reason": sub.reason}
        for path, sub in sorted(run.host_calls.items()) if path not in graph_ops]


def _fidelity_summary(fidelity: FidelityReport) -> dict:
    return {"report": "quant_report.json", "passed": fidelity.passed,
            "min_cosine": min(o.min_cosine for o in fidelity.outputs),
            "detection_agreement": {k: v for k, v in (fidelity.detection or {}).items() if k != "per_sample"} or None}


__all__ = ["ExportOptions", "ExportResult", "ExportRun", "STAGES", "run_export", "__version__"]
