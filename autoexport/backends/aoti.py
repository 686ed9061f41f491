"""AOTInductor: compile model.pt2's ExportedProgram ahead of time into a .pt2 package of native code
(torch._inductor.aoti_compile_and_package), loaded back with torch._inductor.aoti_load_package.

The package keeps the export's dynamic dimensions. CPU packages are built here with the system C++ compiler;
CUDA packages need a GPU and its toolchain at compile time, so they are built on the GPU machine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ExportFailedError
from ..manifest import Manifest
from .runner import Runner
from . import Backend, BackendSpec, LoweredArtifact, LoweringSource, Timer, artifact_inputs, register_backend

log = logging.getLogger("autoexport")


def compile_package(program: torch.export.ExportedProgram, package_path: Path, device: str,
                    options: dict | None = None) -> None:
    import torch._inductor

    if device != "cpu":
        # AOTInductor compares devices literally: "cuda" != "cuda:0".
        device = str(torch.device(device)) if torch.device(device).index is not None else f"{device}:0"
        from torch.export.passes import move_to_device_pass  # not imported by `import torch` before 2.12

        program = move_to_device_pass(program, device)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(package_path), inductor_configs=options)
    except Exception as err:
        raise ExportFailedError(f"AOTInductor compilation failed: {type(err).__name__}: "
                                f"{str(err).strip().splitlines()[0][:400] if str(err).strip() else ''}") from err


@register_backend
class AotiBackend(Backend):
    kind = "aoti"
    targets = ("cpu", "cuda")
    default_target = "cpu"

    def missing_dependency(self, spec: BackendSpec) -> str | None:
        if spec.target == "cuda" and not torch.cuda.is_available():
            return ("aoti:cuda compiles CUDA kernels and needs a GPU with its toolchain at compile time; this machine "
                    "has none. Build it on a GPU machine from model.pt2 (benchmarks/bench_gpu.py does), "
                    "or use aoti:cpu here")
        return None

    def lower(self, spec: BackendSpec, source: LoweringSource) -> LoweredArtifact:
        rel = f"aoti/model.{spec.target}.pt2"
        log.info("  AOTInductor compile for %s (C++ codegen and build: takes a minute or two)", spec.target)
        with Timer() as timer:
            compile_package(source.program, source.staging / rel, spec.target)
        log.info("  %s: %s in %.1f s", spec.name, rel, timer.seconds)
        return LoweredArtifact(backend=spec.name, spec=str(spec), path=rel, precision="fp32", device=spec.target,
                               inputs=artifact_inputs(source.manifest.input_names, source.manifest, None),
                               compile_s=timer.seconds, details={"torch": torch.__version__,
                                                                 "source": "model.pt2 (default export variant)"})

    def runner(self, artifact: LoweredArtifact, output_dir: Path, manifest: Manifest) -> Runner:
        return AotiRunner(output_dir / artifact.path, manifest.input_names, manifest.output_names,
                          artifact.device, name=artifact.backend)


class AotiRunner(Runner):
    def __init__(self, package: Path, input_names: Sequence[str], output_names: Sequence[str], device: str = "cpu",
                 name: str = "aoti") -> None:
        import torch._inductor

        super().__init__(input_names, output_names)
        self.name = name
        self.device = device
        if not package.is_file():
            raise FileNotFoundError(f"{package} is missing")
        self.model = torch._inductor.aoti_load_package(str(package))

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        args = [torch.from_numpy(np.array(feed[n], copy=True)).to(self.device) for n in self.input_names]
        with torch.no_grad():
            return self._named(self.model(*args))
