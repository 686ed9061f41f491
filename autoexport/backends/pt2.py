"""model.pt2: the ExportedProgram through torch.export.load(...).module(), on any torch device."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .eager import TorchModuleRunner


class PT2Runner(TorchModuleRunner):
    """model.pt2 through torch.export.load(...).module()."""

    name = "pt2"

    @classmethod
    def from_file(cls, path: Path, input_names: Sequence[str], output_names: Sequence[str],
                  device: str = "cpu") -> "PT2Runner":
        from .. import ops  # noqa: F401 - registers the op library's custom ops, which model.pt2 may call

        program = torch.export.load(str(path))
        if device != "cpu":
            # Moves parameters, buffers and device constants baked into the graph (module.to() misses those).
            from torch.export.passes import move_to_device_pass  # not imported by `import torch` before 2.12

            program = move_to_device_pass(program, device)
        return cls(program.module(), input_names, output_names, device)
