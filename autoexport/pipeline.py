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
from .export import export_onnx, export_program, quiet_export_logs, save_pt2
from .manifest import Manifest, iter_tensors
from .report import export_info, library_versions, load_npz, outputs_info, save_npz, write_json
from .runners import EagerRunner, OnnxRuntimeRunner, PT2Runner, Runner
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
    tolerance: Tolerance = DEFAULT_TOLERANCES["fp32"]
    verbose: bool = False


@dataclass
class ExportResult:
    """An export on disk: its manifest, parity, and runners for each artifact."""

    output_dir: Path
    manifest: Manifest
    metadata: dict
    parity: ParityReport | None = None

    @classmethod
    def load(cls, output_dir: Path) -> "ExportResult":
        import json

        metadata = json.loads((output_dir / "metadata.json").read_text())
        return cls(output_dir, Manifest.from_json(metadata["manifest"]), metadata)

    def sample_names(self) -> list[str]:
        return [s["name"] for s in self.metadata["samples"]]

    def inputs(self, sample: str) -> dict[str, np.ndarray]:
        return load_npz(self.output_dir / "inputs" / f"{sample}.npz")

    def reference_outputs(self, sample: str) -> dict[str, np.ndarray]:
        return load_npz(self.output_dir / "reference" / f"{sample}.npz")

    def runners(self, device: str = "cpu") -> list[Runner]:
        names = (self.manifest.input_names, self.manifest.output_names)
        found: list[Runner] = []
        if (self.output_dir / "model.pt2").exists():
            found.append(PT2Runner.from_file(self.output_dir / "model.pt2", *names, device=device))
        if (self.output_dir / "model.onnx").exists():
            found.append(OnnxRuntimeRunner(self.output_dir / "model.onnx", *names))
        return found

    def verify(self, tolerance: Tolerance | None = None) -> ParityReport:
        """Re-run every artifact on the stored inputs against the stored eager reference outputs."""
        tol = tolerance or Tolerance(**{k: v for k, v in self.metadata["parity"]["tolerance"].items() if k != "rule"})
        samples = self.sample_names()
        return Comparator(tol).compare(self.runners(), {s: self.inputs(s) for s in samples},
                                       {s: self.reference_outputs(s) for s in samples})


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
              exported: object, timings: dict, formats: tuple[str, ...]) -> dict:
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
        "parity": {"passed": parity.passed, "tolerance": {"atol": parity.tolerance.atol, "rtol": parity.tolerance.rtol,
                                                          "precision": parity.tolerance.precision,
                                                          "rule": parity.tolerance.describe()},
                   "summary": parity.to_json()["summary"]},
        "timings_s": timings,
        "versions": library_versions(),
        "manifest": analysis.manifest.to_json(),
    }


def run_export(options: ExportOptions) -> ExportResult:
    formats = tuple(f for f in FORMATS if f in options.formats)
    if not formats:
        raise UserInputError(f"--format must name at least one of {FORMATS}")
    config_path = resolve_config(options.config)
    output_dir = options.output_dir.resolve()
    staging = _prepare_output_dir(output_dir, options.overwrite)
    stages = StageLog(5)
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
                export_onnx(exported.program, manifest, staging / "model.onnx", options.verbose)
                stages.timings["onnx_s"] = round(time.perf_counter() - t0, 3)

        with stages.stage("verify", f"eager vs {' vs '.join(formats)} on {len(feeds)} samples "
                                    f"({options.tolerance.describe()})"):
            runners: list[Runner] = [PT2Runner.from_file(pt2_path, manifest.input_names, manifest.output_names,
                                                         options.device)]
            if "onnx" in formats:
                runners.append(OnnxRuntimeRunner(staging / "model.onnx", manifest.input_names, manifest.output_names))
            parity = Comparator(options.tolerance).compare(runners, feeds, expected)
        if "pt2" not in formats:
            pt2_path.unlink()

        with stages.stage("report", "write metadata.json and parity.json"):
            metadata = _metadata(options, config_path, analysis, parity, exported, stages.timings, formats)
            write_json(staging / "metadata.json", metadata)
            write_json(staging / "parity.json", parity.to_json())
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
                 f"{parity.tolerance.describe()} (max abs {c.max_abs:.3g}, cosine {c.cosine:.6f}) {c.note}" for c in worst]
        raise ParityFailedError("parity failed:\n" + "\n".join(lines) + f"\n{parity.table()}\n"
                                f"the artifacts were kept for inspection in {failed_dir}, not in {output_dir}")
    _move_into_place(staging, output_dir)
    log.info("parity:\n%s", parity.table())
    return ExportResult(output_dir, manifest, metadata, parity)


__all__ = ["ExportOptions", "ExportResult", "run_export", "__version__"]
