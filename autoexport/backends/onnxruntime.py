"""model.onnx through ONNX Runtime, and which kernels ONNX Runtime really runs (after its QDQ fusions)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ExportFailedError
from .runner import Feed, Runner


class OnnxRuntimeRunner(Runner):
    """model.onnx through ONNX Runtime (CPU execution provider unless told otherwise)."""

    name = "onnxruntime"

    def __init__(self, path: Path, input_names: Sequence[str], output_names: Sequence[str],
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        super().__init__(input_names, output_names)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as err:  # ORT raises its own pybind Fail/InvalidGraph types
            message = str(err).strip().splitlines()[0][:400]
            raise ExportFailedError(f"ONNX Runtime cannot load {path.name}: {message}\n  what to do: the ONNX graph is "
                                    "invalid for ONNX Runtime (often a shape-inference conflict in one node); "
                                    "--format pt2 still works, and the node named above is where to look") from None
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if graph_inputs != self.input_names:
            raise RuntimeError(f"{path}: graph inputs {graph_inputs} do not match the manifest {self.input_names}")

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        outputs = self.session.run(self.output_names, {n: np.ascontiguousarray(feed[n]) for n in self.input_names})
        return self._named(outputs)


def onnxruntime_kernels(onnx_path: Path) -> dict[str, int]:
    """Op types in the graph ONNX Runtime actually runs (after its QDQ fusions), counted."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
