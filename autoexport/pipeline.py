"""The export pipeline: analyze -> wrap -> export -> verify -> report, writing into a temporary
directory that is moved into place only when everything succeeded."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import __version__
from .analyze import Analysis, PreparedSample, analyze, prepare_more_samples
from .split import SplitResult, export_split, split_plan_for
from .configs import resolve_config
from .errors import AutoExportError, ExportFailedError, ParityFailedError, UserInputError, first_line
from .backends import BACKENDS, BackendSpec, LoweredArtifact, LoweringSource, parse_backend
from .fidelity import DetectionDecoder, FidelityReport, compare_outputs, detection_agreement
from .patches import OpFunctionSubstitution, eager_substitutions
from .export import export_onnx, export_program, quiet_export_logs, save_pt2
from .manifest import Manifest
from .output_dir import OutputDirectory
from .padding import PaddedInputs, PaddingPlan, plan_padding
from .events import emit
from .report import consistency_line, export_info, library_versions, outputs_info, save_npz, write_json
from .result import ExportResult, export_runners, write_reports
from .runners import EagerRunner, onnxruntime_kernels
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
    samples: list[Path] = field(default_factory=list)
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
    from .boundaries import BOUNDARIES

    found = BOUNDARIES.lookup(analysis.model)
    entry = f", registered for {found[0]}" if found else ", mmengine's tensor mode (no registry entry)"
    return f"{analysis.model_type} (tensor path {analysis.boundary.forward_name}{entry})"


def _feed(manifest: Manifest, sample: PreparedSample) -> dict[str, np.ndarray]:
    by_path = sample.tensors()
    return {spec.name: by_path[spec.path].detach().cpu().numpy() for spec in manifest.inputs}


def _metadata(options: ExportOptions, config_path: Path, analysis: Analysis, parity: ParityReport,
              exported: object, timings: dict, formats: tuple[str, ...], artifacts: list[LoweredArtifact],
              variants: dict[str, dict]) -> dict:
    return {
        "status": "ok" if parity.passed else "parity_failed",
        "model_config": str(config_path),
        "config_name": config_path.stem,
        "checkpoint": str(Path(options.checkpoint).resolve()) if options.checkpoint else None,
        "weights": "checkpoint" if options.checkpoint else f"random (torch.manual_seed({options.seed}), the model's init_weights(), "
                                                             "BatchNorm statistics from the export samples)",
        # Modules whose own init_weights() raised; their sub-modules were initialised one by one.
        "init_weights_failed": analysis.init_failures,
        "model_type": analysis.model_type,
        "device": options.device,
        "formats": list(formats),
        "artifacts": {"pt2": "model.pt2" if "pt2" in formats else None,
                      "onnx": "model.onnx" if "onnx" in formats else None, "wrapper": "wrapper.py"},
        "export_info": export_info(analysis.manifest),
        "outputs": outputs_info(analysis.manifest),
        "samples": [{"name": s.name, "role": s.role, "origin": s.origin, "num_points": s.num_points,
                     "inputs": f"inputs/{s.name}.npz", "reference_outputs": f"reference/{s.name}.npz"}
                    for s in analysis.samples],
        "export_patches": [{"target": p.target, "method": p.method, "reason": p.reason,
                            "module_paths": list(p.module_paths)} for p in getattr(exported, "patches", [])],
        "preprocess": analysis.preprocess,
        "postprocess": analysis.postprocess,
        "tensor_boundary": analysis.boundary.forward_name,
        # What each compiled artifact accepts (shapes, padding) and how it was built.
        "backends": [a.to_json() for a in artifacts],
        "export_variants": variants,
        "parity": {"passed": parity.passed, "tolerance": parity.tolerance.to_json(),
                   "tolerances": {p: t.to_json() for p, t in parity.used_tolerances().items()},
                   **{k: v for k, v in parity.to_json().items()
                      if k in ("summary", "skipped", "not_built", "policy", "eager_consistency")}},
        "timings_s": timings,
        "versions": library_versions(),
        # The eager reference's float sums can depend on it (a near-tie flipped between 1 and 2 threads).
        "torch_threads": torch.get_num_threads(),
        "manifest": analysis.manifest.to_json(),
    }


def _check_backends(options: ExportOptions, formats: tuple[str, ...]) -> list[BackendSpec]:
    """Parse --backend values and fail before any work when a backend cannot be used here."""
    specs = list(dict.fromkeys(parse_backend(b) for b in options.backends))
    if any(s.kind == "tensorrt" for s in specs) and "onnx" not in formats:
        raise UserInputError("--backend tensorrt builds from model.onnx: use --format onnx or --format both")
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
                            (target.min_cosine if target and target.min_cosine else FIDELITY_MIN_COSINE),
                            compare_outputs(reference, outputs, manifest.output_names))
    heads = heads_of(analysis.model, analysis.boundary)
    try:
        decoder = DetectionDecoder(heads[0], manifest, options.agreement_score_thr) if len(heads) == 1 else None
    except LookupError as err:
        decoder = None
        report.notes.append(f"detection agreement not computed: {err}")
    if decoder is not None:
        metas = [[d.metainfo for d in s.data_samples] for s in samples]
        report.detection = detection_agreement(decoder, reference, outputs, metas)
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
    formats = tuple(f for f in FORMATS if f in options.formats)
    if not formats:
        raise UserInputError(f"--format must name at least one of {FORMATS}")
    specs = _check_backends(options, formats)
    in_eager = {(e.target, e.method) for e in eager_substituted}  # patches the eager reference runs too
    calib_files = _check_precision(options)
    reduced_precision = options.precision != "fp32"
    if options.split:
        _check_split_options(options.precision, formats, "--split")
    config_path = resolve_config(options.config)
    output_dir = options.output_dir.resolve()
    destination = OutputDirectory(output_dir, options.overwrite)
    staging = destination.claim()
    stages = StageLog(5 + bool(specs) + 2 * reduced_precision + options.split)
    split_result: SplitResult | None = None
    reduced: QuantizationResult | HalfResult | None = None
    fidelity: FidelityReport | None = None
    artifacts: list[LoweredArtifact] = []
    not_built: list[SkippedRunner] = []  # backends whose lowering failed; the others are still verified
    variants: dict[str, dict] = {}
    try:
        with stages.stage("analyze", f"build {config_path.stem}, run its test pipeline and data preprocessor"):
            analysis = analyze(config_path, options.checkpoint, options.device, options.samples, options.seed,
                               options.verbose, trust_checkpoint=options.trust_checkpoint)
            manifest = analysis.manifest
            stages.subject = describe_subject(analysis)
            split = options.split or bool(analysis.boundary.split_required)
            if split and not options.split:
                # The one graph is only the first stage; the split export carries the rest of the model.
                log.info("  %s: one graph covers its first stage only (%s); the split export runs as with --split",
                         analysis.model_type, analysis.boundary.split_required)
                _check_split_options(options.precision, formats, f"{analysis.model_type}'s split export (its one "
                                     "graph is only its first stage)")
                stages.total += 1
            if split:
                split_plan_for(analysis.model)  # a clear error before any export work when no plan is registered
            for spec in manifest.inputs:
                dyn = {i: n for i, n in spec.dynamic_dims.items()}
                log.info("  input %-20s %-8s %s dynamic %s", spec.name, spec.dtype, spec.shape, dyn or "-")
        with stages.stage("wrap", "generate wrapper.py"):
            wrapper_path = staging / "wrapper.py"
            write_wrapper(wrapper_path, generate_wrapper_source(manifest, analysis.metainfo,
                                                                analysis.boundary.forward_name,
                                                                analysis.model_type, config_path.stem))
            wrapper = fp32_wrapper = build_wrapper(wrapper_path, analysis.model)

        def run_factory(model: torch.nn.Module):  # noqa: ANN202
            return EagerRunner(build_wrapper(wrapper_path, model), manifest.input_names, manifest.output_names,
                               options.device).infer

        export_model = analysis.model
        if reduced_precision:
            what = ("quantize to INT8 with pytorch-quantization" if options.precision == "int8"
                    else "convert the dense sections to FP16")
            with stages.stage("quantize" if options.precision == "int8" else "fp16", what):
                reduced = _reduce_precision(options, analysis, run_factory, calib_files)
                export_model = reduced.model
                if isinstance(reduced, QuantizationResult):
                    freeze_for_export(export_model)
                wrapper = build_wrapper(wrapper_path, export_model)
        feeds = {s.name: _feed(manifest, s) for s in analysis.samples}
        for name, feed in feeds.items():
            save_npz(staging / "inputs" / f"{name}.npz", feed)
        # The reference runs the original mmdet3d code (no export patches) through the generated wrapper. INT8
        # artifacts are checked against the quantized model in eager PyTorch (pytorch-quantization's fake
        # quantization): INT8 error itself is the fidelity report's subject. FP16 artifacts are checked against FP32
        # with the fp16 tolerance, as TensorRT FP16 engines are; FP16 eager on CPU is no better defined reference.
        quantized_reference = options.precision == "int8"
        eager = EagerRunner(wrapper if quantized_reference else fp32_wrapper, manifest.input_names,
                            manifest.output_names, options.device)
        with frozen_quantizers() if quantized_reference else contextlib.nullcontext():
            expected = {name: eager.infer(feed) for name, feed in feeds.items()}
        for name, outputs in expected.items():
            save_npz(staging / "reference" / f"{name}.npz", outputs)

        with stages.stage("export", f"torch.export{' + ONNX' if 'onnx' in formats else ''}"), \
                quiet_export_logs(options.verbose):
            example = tuple(torch.from_numpy(feeds[analysis.export_samples[0].name][n].copy()).to(options.device)
                            for n in manifest.input_names)
            t0 = time.perf_counter()
            exported = export_program(wrapper, export_model, manifest, example, options.verbose)
            pt2_path = staging / "model.pt2"
            save_pt2(exported.program, pt2_path)  # also the source of PT2 parity when only ONNX is asked for
            stages.timings["torch_export_s"] = round(time.perf_counter() - t0, 3)
            if "onnx" in formats:
                t0 = time.perf_counter()
                export_onnx(exported.program, manifest.input_names, manifest.output_names, staging / "model.onnx",
                            options.verbose)
                stages.timings["onnx_s"] = round(time.perf_counter() - t0, 3)

        if specs:
            with stages.stage("lower", ", ".join(str(s) for s in specs)), quiet_export_logs(options.verbose):
                plan = _padding_plan(analysis.model, manifest, options.capacity)
                source = LoweringSource(
                    staging=staging, manifest=manifest, program=exported.program,
                    onnx_path=staging / "model.onnx" if "onnx" in formats else None, padding=plan,
                    export_variant=_variant_exporter(wrapper, export_model, analysis, feeds[analysis.export_samples[0].name],
                                                     staging, variants, options.verbose),
                    verbose=options.verbose)
                for spec in specs:
                    try:
                        artifact = BACKENDS[spec.kind].lower(spec, source)
                    except ExportFailedError as err:
                        # One backend's compiler failing says nothing about the others: record it, check the rest.
                        log.info("  %s: lowering failed: %s", spec.name, first_line(str(err)))
                        not_built.append(SkippedRunner(spec.name, str(err)))
                        continue
                    artifacts.append(artifact)
                    stages.timings[f"lower_{spec.name}_s"] = artifact.compile_s
                for variant in variants.values():
                    Path(variant.pop("onnx")).unlink(missing_ok=True)  # intermediate: the artifacts are what ship

        rule = options.tolerances[options.precision]
        with stages.stage("verify", f"eager vs {' vs '.join(formats + tuple(a.backend for a in artifacts))} on "
                                    f"{len(feeds)} samples ({rule.describe()})"):
            runners, skipped = export_runners(staging, manifest, artifacts, options.device, precision=options.precision)
            for item in skipped:
                log.info("  %s: not run (%s)", item.runtime, item.reason)
            reference_name = (_eager_reference_name(exported.patches, in_eager) if not quantized_reference
                              else "eager PyTorch of the INT8 model (its frozen quantize/dequantize ops, wrapper.py)")
            comparator = Comparator(options.tolerances, policy=options.parity)
            parity = comparator.compare(
                runners, feeds, expected, ParityReport(reference_name, options.tolerances, skipped=skipped,
                                                       not_built=not_built))
            if not quantized_reference and any(c.precision != "int8" for c in parity.failures()):
                _diagnose_with_float64(parity, comparator, analysis.model, wrapper_path, manifest, feeds, expected,
                                       options.device)
        if split:
            with stages.stage("split", "export named stages, check each alone and chained"), \
                    quiet_export_logs(options.verbose):
                split_result = export_split(analysis.model, manifest, feeds,
                                            [s.name for s in analysis.export_samples], expected, staging,
                                            options.tolerances["fp32"], options.device, options.verbose,
                                            metainfo={s.name: [dict(d.metainfo) for d in s.data_samples]
                                                      for s in analysis.samples})
                write_json(staging / "stages.json", split_result.to_json())
        if reduced_precision:
            with stages.stage("fidelity", f"{options.precision.upper()} against FP32 on {options.eval_samples} "
                                          "held-out samples, outputs and decoded detections"):
                eval_files = calib_files[options.quant.calib_samples:]
                fidelity = _fidelity(options, analysis, EagerRunner(fp32_wrapper, manifest.input_names,
                                                                    manifest.output_names, options.device),
                                     runners, reduced, eval_files, staging, run_factory)
                write_json(staging / "quant_report.json", fidelity.to_json())
                (staging / "quant_report.md").write_text(fidelity.to_markdown(
                    f"{options.precision.upper()} fidelity of {config_path.stem}"))
                log.info("  fidelity: %s", ", ".join(f"{o.output} cos {o.min_cosine:.5f}" for o in fidelity.outputs[:4])
                         + (" ..." if len(fidelity.outputs) > 4 else ""))
                if fidelity.detection:
                    d = fidelity.detection
                    log.info("  detections: %d FP32 / %d %s boxes, %d matched (precision %s, recall %s)",
                             d["reference_boxes"], d["candidate_boxes"], options.precision.upper(), d["matched"],
                             d["precision"], d["recall"])
        if "pt2" not in formats:
            pt2_path.unlink()

        with stages.stage("report", "write metadata.json and parity.json/.md/.xml"):
            metadata = _metadata(options, config_path, analysis, parity, exported, stages.timings, formats,
                                 artifacts, variants)
            metadata["precision"] = options.precision
            if split_result is not None:
                metadata["split"] = {"manifest": "stages.json", "passed": split_result.passed,
                                     "stages": [st.name for st in split_result.stages]}
            for entry in metadata["export_patches"]:
                entry["in_eager_reference"] = (entry["target"], entry["method"]) in in_eager
            metadata["substitutions"] = [
                {"op": p.substitutes, "by": f"{p.target}.{p.method} (autoexport.ops)" if p.method else p.target,
                 "module_paths": list(p.module_paths), "in_eager_reference": (p.target, p.method) in in_eager}
                for p in exported.patches if p.substitutes]
            # Substituted op functions that only host-side code called (Cylinder3D's data preprocessor maps points
            # to voxels with mmdet3d's binding of a CUDA-only kernel): not in the graph, but in what was run.
            in_graph = {p.substitutes for p in exported.patches}
            metadata["substitutions"] += [
                {"op": path, "by": f"autoexport.ops.{sub.library_module}.{sub.library_function} (autoexport.ops)",
                 "module_paths": [], "in_eager_reference": True, "host_side": True, "reason": sub.reason}
                for path, sub in sorted(host_calls.items()) if path not in in_graph]
            if reduced is not None:
                metadata["reduced_precision"] = reduced.to_json()
                metadata["fidelity"] = {"report": "quant_report.json", "passed": fidelity.passed,
                                        "min_cosine": min(o.min_cosine for o in fidelity.outputs),
                                        "detection_agreement": {k: v for k, v in (fidelity.detection or {}).items()
                                                                if k != "per_sample"} or None}
            write_json(staging / "metadata.json", metadata)
            write_reports(parity, staging, f"Parity of {config_path.stem}")
    except BaseException:
        destination.abandon()
        raise

    if not parity.passed or (fidelity is not None and not fidelity.passed) or \
            (split_result is not None and not split_result.passed):
        failed_dir = destination.commit(output_dir.parent / f"{output_dir.name}.failed")
        if not_built:
            verdicts = ", ".join(f"{rt} {'passed' if ok else 'FAILED'}" for rt, ok in parity.runtime_verdicts().items())
            raise ExportFailedError("lowering failed: " + "; ".join(f"{b.runtime}: {b.reason}" for b in not_built)
                                    + f"\nthe other artifacts were checked ({verdicts or 'none'}); they and the "
                                    f"parity reports were kept in {failed_dir}, not in {output_dir}")
        worst = sorted(parity.failures(), key=lambda c: -c.mismatched)[:5]
        # A check without output (missing, or the runtime crashed) gives its note; a crash fails every output alike,
        # so one line per runtime and sample.
        lines = list(dict.fromkeys(
            f"  {c.runtime} on {c.sample}: {c.note}" if c.max_abs == float("inf") and c.note.startswith(c.runtime)
            else f"  {c.runtime} {c.output} on {c.sample}: {c.mismatched}/{c.total} elements outside "
            f"{parity.tolerances[c.precision].describe()} (max abs {c.max_abs:.3g}, cosine {c.cosine:.6f}) {c.note}"
            for c in worst))
        if parity.passed and split_result is not None and not split_result.passed:
            bad = [f"  stage {st.name}: max abs {st.worst_max_abs:.3g}" for st in split_result.stages if not st.parity_passed]
            bad += [f"  chained: {note}" for note in split_result.chained.get("failures", [])[:4]]
            bad += [f"  chained stages: max abs {split_result.chained.get('max_abs', float('nan')):.3g}"]
            raise ParityFailedError("split export parity failed:\n" + "\n".join(bad) + f"\nstages.json and the stage "
                                    f"graphs were kept in {failed_dir}, not in {output_dir}")
        if parity.passed:
            low = [o for o in fidelity.outputs if o.min_cosine < fidelity.min_cosine_target]
            lines = [f"  {o.output}: min cosine {o.min_cosine:.5f} (max abs err {o.max_abs:.3g})" for o in low[:8]]
            raise ParityFailedError(f"{options.precision.upper()} fidelity below cosine {fidelity.min_cosine_target:g} "
                                    "against FP32 on held-out samples:\n" + "\n".join(lines) + "\nkeep sensitive "
                                    "layers in float (--sensitivity lists them, --skip-layers keeps them); the "
                                    f"artifacts and quant_report.md were kept in {failed_dir}, not in {output_dir}")
        raise ParityFailedError("parity failed:\n" + "\n".join(lines) + f"\n{parity.table()}\n"
                                f"the artifacts were kept for inspection in {failed_dir}, not in {output_dir}")
    destination.commit()
    log.info("parity:\n%s", parity.table())
    return ExportResult(output_dir, manifest, metadata, parity)


__all__ = ["ExportOptions", "ExportResult", "run_export", "__version__"]
