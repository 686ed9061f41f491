"""Inductor: torch.compile of model.pt2's ExportedProgram, moved to the target device, compiled just in time.

No file is written besides model.pt2: Inductor compiles on the first call of each input shape (Triton kernels on
CUDA, C++ on the CPU) and caches its kernels on disk. On CUDA the mode is max-autotune, which also captures the
compiled graph as a CUDA graph; static shapes (dynamic=False) keep that capture possible, at the cost of one
compilation per distinct input shape. This is the GPU path that needs no toolchain at export time: model.pt2 is
device-portable (autoexport.portable), so the same file made on a CPU machine compiles here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..manifest import Manifest
from .runner import Runner
from . import Backend, BackendSpec, LoweredArtifact, LoweringSource, artifact_inputs, register_backend

log = logging.getLogger("autoexport")

# Per target: max-autotune searches GEMM/conv configurations and replays CUDA graphs; on the CPU its search only
# costs compile time, so the CPU keeps the default mode.
MODES = {"cpu": "default", "cuda": "max-autotune"}


def load_module(path: Path, device: str) -> torch.nn.Module:
    """model.pt2 as a module on `device`: move_to_device_pass moves weights, lifted constants and device kwargs."""
    program = torch.export.load(str(path))
    if device != "cpu":
        from torch.export.passes import move_to_device_pass  # not imported by `import torch` before 2.12

        program = move_to_device_pass(program, device)
    return program.module()


@register_backend
class InductorBackend(Backend):
    kind = "inductor"
    targets = ("cpu", "cuda")
    default_target = "cpu"

    def missing_dependency(self, spec: BackendSpec) -> str | None:
        if spec.target == "cuda" and not torch.cuda.is_available():
            return ("inductor:cuda compiles Triton kernels for a GPU and runs them there; this machine has no CUDA "
                    "device. Run `autoexport verify OUT_DIR --backend inductor:cuda` on a GPU machine, or use "
                    "inductor:cpu here")
        return None

    def artifact_of_export(self, spec: BackendSpec, manifest: Manifest) -> LoweredArtifact:
        # Nothing to build ahead of time: the artifact is model.pt2 itself, compiled when a runner first runs it.
        return LoweredArtifact(backend=spec.name, spec=str(spec), path="model.pt2", precision="fp32",
                               device=spec.target, inputs=artifact_inputs(manifest.input_names, manifest, None),
                               details={"torch": torch.__version__, "mode": MODES[spec.target],
                                        "dynamic": False, "compiled": "on first call, per input shape"})

    def lower(self, spec: BackendSpec, source: LoweringSource) -> LoweredArtifact:
        return self.artifact_of_export(spec, source.manifest)

    def runner(self, artifact: LoweredArtifact, output_dir: Path, manifest: Manifest) -> Runner:
        return InductorRunner(output_dir / artifact.path, manifest.input_names, manifest.output_names,
                              artifact.device, mode=artifact.details.get("mode", MODES[artifact.device]),
                              name=artifact.backend)


class InductorRunner(Runner):
    def __init__(self, path: Path, input_names: Sequence[str], output_names: Sequence[str], device: str = "cpu",
                 mode: str = "default", name: str = "inductor") -> None:
        super().__init__(input_names, output_names)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        self.name = name
        self.device = device
        self.model = torch.compile(load_module(path, device), mode=mode, dynamic=False, fullgraph=True)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        args = [torch.from_numpy(np.array(feed[n], copy=True)).to(self.device) for n in self.input_names]
        with torch.no_grad():
            return self._named(self.model(*args))
