"""Stage 5, lower: compile an export for a deployment backend and run the result behind the Runner interface.

A backend is named on the command line as `KIND[:TARGET[:ARCH]]`: `iree` (= iree:llvm-cpu), `iree:cuda`,
`iree:cuda:sm_80`, `aoti` (= aoti:cpu), `aoti:cuda`, `inductor` (= inductor:cpu),
`inductor:cuda`, `tensorrt` (= tensorrt:fp32), `tensorrt:fp16`, `tensorrt:int8`.
Each kind is one class in this package, registered in BACKENDS; the pipeline never branches on backend names.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import UserInputError
from ..manifest import Manifest
from ..padding import PaddingPlan
from .runner import Runner


@dataclass(frozen=True)
class BackendSpec:
    kind: str  # iree | aoti | inductor | tensorrt
    target: str  # iree: llvm-cpu | cuda; aoti, inductor: cpu | cuda; tensorrt: fp32 | fp16 | int8
    arch: str | None = None  # GPU architecture for iree:cuda (sm_80, sm_90, ...)

    @property
    def name(self) -> str:
        """Runner and report name, also the artifact's file stem: iree-llvm-cpu, aoti-cuda, tensorrt-fp16."""
        return f"{self.kind}-{self.target}"

    def __str__(self) -> str:
        return ":".join(p for p in (self.kind, self.target, self.arch) if p)


@dataclass
class LoweredArtifact:
    """One compiled artifact in the output directory and everything needed to run it again."""

    backend: str  # BackendSpec.name
    spec: str  # BackendSpec as given
    path: str  # relative to the output directory
    precision: str  # fp32 | fp16 | int8: selects the parity tolerance
    device: str  # cpu | cuda: where it runs
    inputs: list[dict]  # what the artifact accepts: name, shape (None where dynamic), dtype
    padding: dict | None = None  # PaddingPlan.to_json() for static padded artifacts
    compile_s: float = 0.0
    details: dict = field(default_factory=dict)  # flags, versions, notes

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "LoweredArtifact":
        return LoweredArtifact(**data)

    @property
    def padding_plan(self) -> PaddingPlan | None:
        return PaddingPlan.from_json(self.padding) if self.padding else None


@dataclass
class LoweringSource:
    """What a backend may lower from; variants are exported on demand and cached."""

    staging: Path  # the output directory being written
    manifest: Manifest
    program: torch.export.ExportedProgram  # the default (dynamic-shape) export, as in model.pt2
    onnx_path: Path | None  # model.onnx when it was exported
    padding: PaddingPlan | None  # static padding the model supports, if any
    export_variant: Callable[[str, PaddingPlan | None], Path]  # -> ONNX file of a backend-specific export
    verbose: bool = False


class Backend(ABC):
    kind: str = ""
    targets: tuple[str, ...] = ()
    default_target: str = ""
    # Verify this backend's artifacts in a child process (runner.SubprocessRunner): for runtimes known to crash
    # the process on some models rather than raise.
    verify_in_subprocess: bool = False

    def missing_dependency(self, spec: BackendSpec) -> str | None:
        """Why this backend cannot be used at all on this machine (with what to install), or None."""
        return None

    def cannot_run_here(self, spec: BackendSpec) -> str | None:
        """Why an artifact of this spec can be built but not run here (no GPU), or None."""
        return None

    def artifact_of_export(self, spec: BackendSpec, manifest: Manifest) -> LoweredArtifact | None:
        """The artifact, when this backend needs nothing but the export's own files (so `verify --backend` can run
        it on an export made without it), else None."""
        return None

    @abstractmethod
    def lower(self, spec: BackendSpec, source: LoweringSource) -> LoweredArtifact: ...

    @abstractmethod
    def runner(self, artifact: LoweredArtifact, output_dir: Path, manifest: Manifest) -> Runner: ...


BACKENDS: dict[str, Backend] = {}


def register_backend(backend_cls: type[Backend]) -> type[Backend]:
    BACKENDS[backend_cls.kind] = backend_cls()
    return backend_cls


def parse_backend(text: str) -> BackendSpec:
    parts = text.strip().lower().split(":")
    kind = parts[0]
    if kind not in BACKENDS:
        raise UserInputError(f"unknown backend {text!r}; choose from {', '.join(sorted(BACKENDS))} "
                             "(e.g. iree, iree:cuda, aoti, tensorrt:fp16)")
    backend = BACKENDS[kind]
    target = parts[1] if len(parts) > 1 and parts[1] else backend.default_target
    if target not in backend.targets:
        raise UserInputError(f"backend {kind} has no target {target!r}; choose from {', '.join(backend.targets)}")
    arch = parts[2] if len(parts) > 2 else None
    if len(parts) > 3 or (arch and not (kind == "iree" and target == "cuda")):
        raise UserInputError(f"backend {text!r}: only iree:cuda takes an architecture (iree:cuda:sm_80)")
    return BackendSpec(kind, target, arch)


def backend_for(spec: BackendSpec | str) -> Backend:
    return BACKENDS[spec.kind if isinstance(spec, BackendSpec) else parse_backend(spec).kind]


def artifact_inputs(names: Sequence[str], manifest: Manifest, plan: PaddingPlan | None) -> list[dict]:
    """The shapes an artifact accepts: static capacity for padded dims, None for dims that stay dynamic."""
    specs = {t.name: t for t in manifest.inputs}
    accepted = []
    for name in names:
        if plan and name == plan.count_input:
            accepted.append({"name": name, "shape": [], "dtype": "int64",
                             "meaning": f"number of real rows along {plan.dim} (<= {plan.capacity})"})
            continue
        spec = specs[name]
        shape: list[int | None] = list(spec.shape)
        for axis in spec.dynamic_dims:
            shape[axis] = plan.capacity if plan and plan.axes.get(name) == axis else None
        accepted.append({"name": name, "shape": shape, "dtype": spec.dtype})
    return accepted


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(time.perf_counter() - self.start, 3)


class PaddingRunner(Runner):
    """Adapts a runner of a padded artifact to the manifest's unpadded feeds."""

    def __init__(self, inner: Runner, plan: PaddingPlan, input_names: Sequence[str]) -> None:
        super().__init__(input_names, inner.output_names)
        self.inner = inner
        self.plan = plan
        self.name = inner.name

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        return self.inner.infer(self.plan.pad_feed({n: feed[n] for n in self.input_names}))


# Backends register themselves on import.
from . import aoti, inductor, iree  # noqa: E402,F401
from . import tensorrt  # noqa: E402,F401
