"""An export on disk: its manifest, stored inputs and reference outputs, a runner for every artifact, and the
parity reports. Importing this needs no mmdet3d, so `autoexport verify` runs on machines that only have torch
(the GPU machine) as long as the backend's runtime is there."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import BACKENDS, LoweredArtifact, parse_backend
from .errors import UserInputError
from .manifest import Manifest
from .report import load_npz, write_json
from .backends.onnxruntime import OnnxRuntimeRunner
from .backends.pt2 import PT2Runner
from .backends.runner import Runner, SubprocessRunner
from .verify import (Comparator, ParityPolicy, ParityReport, SkippedRunner, Tolerance, measure_against_float64,
                     tolerances_with)

log = logging.getLogger("autoexport")

REPORT_FILES = ("parity.json", "parity.md", "parity.xml")


def write_reports(report: ParityReport, directory: Path, title: str) -> None:
    """parity.json for machines, parity.md for people, parity.xml (JUnit) for CI systems."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "parity.json", report.to_json())
    (directory / "parity.md").write_text(report.to_markdown(title))
    (directory / "parity.xml").write_text(report.to_junit())


def _backend_runner(kind: str, artifact: LoweredArtifact, output_dir: Path, manifest: Manifest) -> Runner:
    """The backend's own runner; module-level so that a spawned child can unpickle it (SubprocessRunner)."""
    return BACKENDS[kind].runner(artifact, output_dir, manifest)


def artifact_runners(artifacts: list[LoweredArtifact], output_dir: Path, manifest: Manifest,
                     only: set[str] | None = None, precision: str = "fp32") -> tuple[list[Runner], list[SkippedRunner]]:
    """Runners for the lowered artifacts this machine can run; the others come back as skipped, with why."""
    runners: list[Runner] = []
    skipped: list[SkippedRunner] = []
    for artifact in artifacts:
        if only is not None and artifact.backend not in only:
            continue
        spec = parse_backend(artifact.spec)
        backend = BACKENDS[spec.kind]
        reason = backend.missing_dependency(spec) or backend.cannot_run_here(spec)
        if reason:
            skipped.append(SkippedRunner(artifact.backend, reason))
            continue
        if backend.verify_in_subprocess:
            build = functools.partial(_backend_runner, spec.kind, artifact, output_dir, manifest)
            runner = SubprocessRunner(build, artifact.backend, manifest.input_names, manifest.output_names)
        else:
            runner = backend.runner(artifact, output_dir, manifest)
        # A backend that lowers an INT8/FP16 export runs that precision even when its own spec says fp32.
        runner.precision = precision if precision != "fp32" else artifact.precision
        runners.append(runner)
    return runners, skipped


def export_runners(output_dir: Path, manifest: Manifest, artifacts: list[LoweredArtifact], device: str = "cpu",
                   only: set[str] | None = None, precision: str = "fp32") -> tuple[list[Runner], list[SkippedRunner]]:
    """Runners for model.pt2, model.onnx (when present) and the lowered artifacts, optionally only the named ones;
    `precision` (the export's: fp32, int8, fp16) selects their parity tolerance."""
    names = (manifest.input_names, manifest.output_names)
    found: list[Runner] = []
    if (only is None or "pt2" in only) and (output_dir / "model.pt2").exists():
        found.append(PT2Runner.from_file(output_dir / "model.pt2", *names, device=device))
    if (only is None or "onnxruntime" in only) and (output_dir / "model.onnx").exists():
        found.append(OnnxRuntimeRunner(output_dir / "model.onnx", *names))
    for runner in found:
        runner.precision = precision
    lowered, skipped = artifact_runners(artifacts, output_dir, manifest, only, precision)
    return found + lowered, skipped


@dataclass
class ExportResult:
    output_dir: Path
    manifest: Manifest
    metadata: dict
    parity: ParityReport | None = None

    @classmethod
    def load(cls, output_dir: Path) -> "ExportResult":
        path = output_dir / "metadata.json"
        if not path.is_file():
            raise UserInputError(f"{output_dir} is not an autoexport output directory (no metadata.json)")
        metadata = json.loads(path.read_text())
        return cls(output_dir, Manifest.from_json(metadata["manifest"]), metadata)

    def sample_names(self) -> list[str]:
        return [s["name"] for s in self.metadata["samples"]]

    def inputs(self, sample: str) -> dict[str, np.ndarray]:
        return load_npz(self.output_dir / "inputs" / f"{sample}.npz")

    def reference_outputs(self, sample: str) -> dict[str, np.ndarray]:
        return load_npz(self.output_dir / "reference" / f"{sample}.npz")

    @property
    def artifacts(self) -> list[LoweredArtifact]:
        return [LoweredArtifact.from_json(a) for a in self.metadata.get("backends", [])]

    def stored_tolerances(self) -> dict[str, Tolerance]:
        stored = self.metadata["parity"].get("tolerances") or {"fp32": self.metadata["parity"]["tolerance"]}
        return tolerances_with(*(Tolerance.from_json(t) for t in stored.values()))

    def stored_policy(self) -> ParityPolicy:
        """The parity policy of the export; exports older than the float64 rule get today's default."""
        return ParityPolicy.from_json(self.metadata["parity"].get("policy"))

    def reference_float64(self, sample: str) -> dict[str, np.ndarray]:
        """The float64 run's outputs, stored for the samples on which some check needed them (else empty)."""
        path = self.output_dir / "reference_float64" / f"{sample}.npz"
        return load_npz(path) if path.is_file() else {}

    def runners(self, backends: list[str] | None = None, device: str = "cpu") -> tuple[list[Runner], list[SkippedRunner]]:
        """Runners for model.pt2, model.onnx and every lowered artifact (or only the named backends)."""
        only = None
        artifacts = list(self.artifacts)
        if backends:
            only = {parse_backend(b).name if b not in ("pt2", "onnxruntime") else b for b in backends}
            known = {"pt2", "onnxruntime"} | {a.backend for a in artifacts}
            for spec in (parse_backend(b) for b in backends if b not in ("pt2", "onnxruntime")):
                made = spec.name not in known and BACKENDS[spec.kind].artifact_of_export(spec, self.manifest)
                if made:  # e.g. inductor:cuda, which compiles model.pt2 itself on the machine that verifies
                    artifacts.append(made)
                    known.add(made.backend)
            unknown = sorted(only - known)
            if unknown:
                raise UserInputError(f"{self.output_dir} has no {', '.join(unknown)} artifact; it has "
                                     f"{', '.join(sorted(known))}. Export with --backend to add one")
        return export_runners(self.output_dir, self.manifest, artifacts, device, only,
                              self.metadata.get("precision", "fp32"))

    def verify(self, tolerances: dict[str, Tolerance] | None = None, backends: list[str] | None = None,
               device: str = "cpu", policy: ParityPolicy | None = None) -> ParityReport:
        """Re-run every artifact on the stored inputs against the stored eager reference outputs, deciding checks
        outside the elementwise tolerance from the stored float64 outputs where the export stored them."""
        samples = self.sample_names()
        runners, skipped = self.runners(backends, device)
        report = ParityReport("eager (stored reference outputs)", tolerances or self.stored_tolerances(),
                              skipped=skipped)
        row_sets = tuple(tuple(g) for g in (self.metadata.get("detections") or {}).get("row_sets", ()))
        comparator = Comparator(report.tolerances, policy=policy or self.stored_policy(), row_sets=row_sets)
        expected = {s: self.reference_outputs(s) for s in samples}
        comparator.compare(runners, {s: self.inputs(s) for s in samples}, expected, report)
        measure_against_float64(report, comparator.failed_outputs, expected,
                                {s: self.reference_float64(s) for s in samples})
        return report


__all__ = ["ExportResult", "REPORT_FILES", "write_reports", "artifact_runners", "export_runners"]
