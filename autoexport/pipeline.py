"""The export pipeline: analyze -> wrap -> export -> verify -> report, writing into a temporary
directory that is moved into place only when everything succeeded."""

from __future__ import annotations

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
from .analyze import Analysis, analyze
from .configs import resolve_config
from .errors import ParityFailedError, UserInputError
from .backends import BACKENDS, BackendSpec, LoweredArtifact, LoweringSource, parse_backend
from .export import export_onnx, export_program, quiet_export_logs, save_pt2
from .manifest import Manifest, iter_tensors
from .padding import PaddedInputs, PaddingPlan, plan_padding
from .report import export_info, library_versions, outputs_info, save_npz, write_json
from .result import ExportResult, export_runners, write_reports
from .runners import EagerRunner
from .verify import DEFAULT_TOLERANCES, Comparator, ParityReport, Tolerance
from .wrap import build_wrapper, generate_wrapper_source, write_wrapper

log = logging.getLogger("autoexport")

FORMATS = ("pt2", "onnx")


@dataclass
class ExportOptions:
    config: str
    output_dir: Path
    checkpoint: str | None = None
    formats: tuple[str, ...] = FORMATS
    device: str = "cpu"
    samples: list[Path] = field(default_factory=list)
    overwrite: bool = False
    seed: int = 0
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    backends: tuple[str, ...] = ()  # backend specs (iree, iree:cuda, aoti, tensorrt:fp16, ...)
    # Static padding for backends that use it: dynamic (none), auto (the model's own bound) or N rows. Dynamic is the
    # default: on CPU, padding nuScenes PointPillars' ~17k voxels to 40k made IREE 1.5x slower (benchmarks/RESULTS.md).
    capacity: str = "dynamic"
    verbose: bool = False


class StageLog:
    """Per-stage log lines with timings; the timings also go into metadata.json."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.index += 1
        log.info("[%d/%d] %s: %s", self.index, self.total, name, what)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        log.info("[%d/%d] %s done in %.1f s", self.index, self.total, name, self.timings[name])


def _feed(manifest: Manifest, inputs: dict) -> dict[str, np.ndarray]:
    by_path = {"inputs." + ".".join(str(p) for p in path): t for path, t in iter_tensors(inputs)}
    return {spec.name: by_path[spec.path].detach().cpu().numpy() for spec in manifest.inputs}


def _prepare_output_dir(output_dir: Path, overwrite: bool) -> Path:
    if output_dir.exists() and not output_dir.is_dir():
        raise UserInputError(f"output path {output_dir} exists and is not a directory")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise UserInputError(f"output directory {output_dir} already exists; pass --overwrite to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _move_into_place(staging: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)


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
                   **{k: v for k, v in parity.to_json().items() if k in ("summary", "skipped")}},
        "timings_s": timings,
        "versions": library_versions(),
        "manifest": analysis.manifest.to_json(),
    }


def _check_backends(options: ExportOptions, formats: tuple[str, ...]) -> list[BackendSpec]:
    """Parse --backend values and fail before any work when a backend cannot be used here."""
    specs = list(dict.fromkeys(parse_backend(b) for b in options.backends))
    for spec in specs:
        reason = BACKENDS[spec.kind].missing_dependency(spec)
        if reason:
            raise UserInputError(f"--backend {spec}: {reason}")
    if any(s.kind == "tensorrt" for s in specs) and "onnx" not in formats:
        raise UserInputError("--backend tensorrt builds from model.onnx: use --format onnx or --format both")
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


def _variant_exporter(wrapper: torch.nn.Module, analysis: Analysis, example_feed: dict[str, np.ndarray],
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
        exported = export_program(module, analysis.model, manifest, example, verbose, variant=variant, plan=plan)
        path = staging / f".model.{variant}.onnx"
        export_onnx(exported.program, names, manifest.output_names, path, verbose)
        record[variant if not plan else f"{variant}-padded{plan.capacity}"] = {
            "onnx": str(path), "padding": plan.to_json() if plan else None,
            "export_patches": [f"{p.target}.{p.method}" for p in exported.patches]}
        cache[key] = path
        return path

    return export_variant


def run_export(options: ExportOptions) -> ExportResult:
    formats = tuple(f for f in FORMATS if f in options.formats)
    if not formats:
        raise UserInputError(f"--format must name at least one of {FORMATS}")
    specs = _check_backends(options, formats)
    config_path = resolve_config(options.config)
    output_dir = options.output_dir.resolve()
    staging = _prepare_output_dir(output_dir, options.overwrite)
    stages = StageLog(6 if specs else 5)
    artifacts: list[LoweredArtifact] = []
    variants: dict[str, dict] = {}
    try:
        with stages.stage("analyze", f"build {config_path.stem}, run its test pipeline and data preprocessor"):
            analysis = analyze(config_path, options.checkpoint, options.device, options.samples, options.seed,
                               options.verbose)
            manifest = analysis.manifest
            for spec in manifest.inputs:
                dyn = {i: n for i, n in spec.dynamic_dims.items()}
                log.info("  input %-20s %-8s %s dynamic %s", spec.name, spec.dtype, spec.shape, dyn or "-")
        with stages.stage("wrap", "generate wrapper.py"):
            wrapper_path = staging / "wrapper.py"
            write_wrapper(wrapper_path, generate_wrapper_source(manifest, analysis.metainfo,
                                                                analysis.boundary.forward_name,
                                                                analysis.model_type, config_path.stem))
            wrapper = build_wrapper(wrapper_path, analysis.model)
        feeds = {s.name: _feed(manifest, s.inputs) for s in analysis.samples}
        for name, feed in feeds.items():
            save_npz(staging / "inputs" / f"{name}.npz", feed)
        # The reference runs the original mmdet3d code (no export patches) through the generated wrapper.
        eager = EagerRunner(wrapper, manifest.input_names, manifest.output_names, options.device)
        expected = {name: eager.infer(feed) for name, feed in feeds.items()}
        for name, outputs in expected.items():
            save_npz(staging / "reference" / f"{name}.npz", outputs)

        with stages.stage("export", f"torch.export{' + ONNX' if 'onnx' in formats else ''}"), \
                quiet_export_logs(options.verbose):
            example = tuple(torch.from_numpy(feeds[analysis.export_samples[0].name][n].copy()).to(options.device)
                            for n in manifest.input_names)
            t0 = time.perf_counter()
            exported = export_program(wrapper, analysis.model, manifest, example, options.verbose)
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
                    export_variant=_variant_exporter(wrapper, analysis, feeds[analysis.export_samples[0].name],
                                                     staging, variants, options.verbose),
                    verbose=options.verbose)
                for spec in specs:
                    artifact = BACKENDS[spec.kind].lower(spec, source)
                    artifacts.append(artifact)
                    stages.timings[f"lower_{spec.name}_s"] = artifact.compile_s
                for variant in variants.values():
                    Path(variant.pop("onnx")).unlink(missing_ok=True)  # intermediate: the artifacts are what ship

        fp32 = options.tolerances["fp32"]
        with stages.stage("verify", f"eager vs {' vs '.join(formats + tuple(a.backend for a in artifacts))} on "
                                    f"{len(feeds)} samples ({fp32.describe()})"):
            runners, skipped = export_runners(staging, manifest, artifacts, options.device)
            for item in skipped:
                log.info("  %s: not run (%s)", item.runtime, item.reason)
            parity = Comparator(options.tolerances).compare(
                runners, feeds, expected,
                ParityReport("eager PyTorch (the original mmdet3d code through wrapper.py)", options.tolerances,
                             skipped=skipped))
        if "pt2" not in formats:
            pt2_path.unlink()

        with stages.stage("report", "write metadata.json and parity.json/.md/.xml"):
            metadata = _metadata(options, config_path, analysis, parity, exported, stages.timings, formats,
                                 artifacts, variants)
            write_json(staging / "metadata.json", metadata)
            write_reports(parity, staging, f"Parity of {config_path.stem}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    if not parity.passed:
        failed_dir = output_dir.parent / f"{output_dir.name}.failed"
        if failed_dir.exists():
            shutil.rmtree(failed_dir)
        staging.rename(failed_dir)
        worst = sorted(parity.failures(), key=lambda c: -c.mismatched)[:5]
        lines = [f"  {c.runtime} {c.output} on {c.sample}: {c.mismatched}/{c.total} elements outside "
                 f"{parity.tolerances[c.precision].describe()} (max abs {c.max_abs:.3g}, cosine {c.cosine:.6f}) {c.note}" for c in worst]
        raise ParityFailedError("parity failed:\n" + "\n".join(lines) + f"\n{parity.table()}\n"
                                f"the artifacts were kept for inspection in {failed_dir}, not in {output_dir}")
    _move_into_place(staging, output_dir)
    log.info("parity:\n%s", parity.table())
    return ExportResult(output_dir, manifest, metadata, parity)


__all__ = ["ExportOptions", "ExportResult", "run_export", "__version__"]
