"""Every way to execute an export behind one interface: flat numpy inputs in, named numpy outputs out."""

from __future__ import annotations

import multiprocessing
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import ExportFailedError, signal_name

Feed = dict[str, np.ndarray]


class Runner(ABC):
    """Runs one artifact. Inputs are copied for every call, so a model that mutates its inputs cannot
    leak state from one run into the next."""

    name: str = "runner"
    precision: str = "fp32"  # selects the parity tolerance

    def __init__(self, input_names: Sequence[str], output_names: Sequence[str]) -> None:
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    @abstractmethod
    def infer(self, feed: Feed) -> dict[str, np.ndarray]: ...

    def _check_feed(self, feed: Feed) -> None:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise KeyError(f"{self.name}: inputs missing from feed: {missing}")

    def _named(self, outputs: Sequence[torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
        if len(outputs) != len(self.output_names):
            raise RuntimeError(f"{self.name}: {len(outputs)} outputs, expected {len(self.output_names)}")
        return {name: (o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o))
                for name, o in zip(self.output_names, outputs)}


class RunnerCrashed(ExportFailedError):
    """A runner's process died on a signal (a bug of the runtime, not of the model): it gave no outputs."""


def _serve(build: Callable[[], Runner], conn: Any) -> None:
    """Child side of SubprocessRunner: builds the runner, then answers feeds until it receives None."""
    try:
        runner = build()
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it there
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while (feed := conn.recv()) is not None:
        try:
            conn.send(("ok", runner.infer(feed)))
        except Exception as err:  # noqa: BLE001
            conn.send(("error", f"{type(err).__name__}: {err}"))


class SubprocessRunner(Runner):
    """Another runner, built and run in a child process (spawned: no forked torch or runtime state). A runtime that
    segfaults (IREE 3.13's on ImVoxelNet) then fails its checks with RunnerCrashed instead of killing autoexport."""

    def __init__(self, build: Callable[[], Runner], name: str, input_names: Sequence[str],
                 output_names: Sequence[str]) -> None:
        super().__init__(input_names, output_names)
        self.name = name
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve, args=(build, child_conn), daemon=True,
                                        name=f"autoexport-{name}")
        self._process.start()
        child_conn.close()
        self._receive("loading its artifact")

    def _receive(self, doing: str) -> Any:
        try:
            while not self._conn.poll(0.2):
                if not self._process.is_alive():
                    break
            status, value = self._conn.recv()
        except (EOFError, ConnectionError):
            self._process.join(timeout=5)
            code = self._process.exitcode
            how = signal_name(code) if code is not None and code < 0 else f"exit {code}"
            raise RunnerCrashed(f"{self.name} crashed while {doing} ({how}): a bug of the runtime, not of the "
                                "model; its outputs were not produced") from None
        if status == "error":
            raise ExportFailedError(f"{self.name}: {value}")
        return value

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        if not self._process.is_alive():
            raise RunnerCrashed(f"{self.name} crashed on an earlier input; nothing runs it any more")
        self._conn.send({n: feed[n] for n in self.input_names})
        return self._receive("running")

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, ConnectionError):
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
        self._conn.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_process", None) is not None and not self._conn.closed:
                self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the daemon child is killed anyway
            pass


class _TorchRunner(Runner):
    def __init__(self, module: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str],
                 device: str = "cpu") -> None:
        super().__init__(input_names, output_names)
        self.module = module
        self.device = device

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        args = [torch.from_numpy(np.array(feed[n], copy=True)).to(self.device) for n in self.input_names]
        with torch.no_grad():
            outputs = self.module(*args)
        return self._named(outputs)


class EagerRunner(_TorchRunner):
    """The generated wrapper around the original, unpatched mmdet3d model: the parity reference."""

    name = "eager"


class PT2Runner(_TorchRunner):
    """model.pt2 through torch.export.load(...).module()."""

    name = "pt2"

    @classmethod
    def from_file(cls, path: Path, input_names: Sequence[str], output_names: Sequence[str],
                  device: str = "cpu") -> "PT2Runner":
        from . import ops  # noqa: F401 - registers the op library's custom ops, which model.pt2 may call

        program = torch.export.load(str(path))
        if device != "cpu":
            # Moves parameters, buffers and device constants baked into the graph (module.to() misses those).
            from torch.export.passes import move_to_device_pass  # not imported by `import torch` before 2.12

            program = move_to_device_pass(program, device)
        return cls(program.module(), input_names, output_names, device)


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
