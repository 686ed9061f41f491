"""TensorRT: build a serialized engine from the dynamic-shape model.onnx and run it on an NVIDIA GPU.

UNTESTED ON THESE MACHINES. TensorRT cannot be installed anywhere in this project's environment (the registry's
tensorrt-cu12/cu13 packages are stubs that download from NVIDIA's index, which is unreachable; see
../shared/ENVIRONMENT.md), so this module is written against the documented TensorRT 10/11 Python API and has never
built or run an engine. Only the pure-Python parts (profile_shapes, version parsing, ONNX checks) are exercised here.

Precision by TensorRT version:
- TensorRT 11 networks are always strongly typed: tensor types come from the ONNX. fp16 needs an ONNX that carries
  fp16 types, int8 needs Q/DQ nodes; the FP16/INT8 builder flags no longer exist.
- TensorRT 10 networks are weakly typed here: BuilderFlag.FP16 lets the builder pick fp16 kernels, and int8 sets
  BuilderFlag.INT8 for an ONNX with Q/DQ nodes (explicit quantization; implicit calibration is deprecated in 10).
fp32 engines clear BuilderFlag.TF32 (on by default), so that fp32 means fp32 and parity tolerances stay tight.

Dynamic dimensions become one optimization profile whose bounds come from the manifest (see profile_shapes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..errors import ExportFailedError, UserInputError
from ..manifest import Manifest
from .runner import Runner
from . import Backend, BackendSpec, LoweredArtifact, LoweringSource, Timer, artifact_inputs, register_backend

log = logging.getLogger("autoexport")

# A dynamic dim without a declared maximum gets this many times its largest observed value, rounded up to a multiple
# of MAX_ROUNDING: headroom for larger scenes than the analysis samples without making every buffer huge.
DEFAULT_MAX_FACTOR = 4
MAX_ROUNDING = 64
# Upper bound on the builder's scratch memory; it is a limit, not an allocation.
WORKSPACE_BYTES = 4 << 30

Shape = tuple[int, ...]

# TensorRT DataType member names -> torch dtypes, for the tensors the runner allocates.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
    "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool,
}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def profile_shapes(manifest: Manifest) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shapes of every input with dynamic dims, for one TensorRT optimization profile.

    Per dynamic dim: min = DynamicDim.min (at least 1); opt = the largest observed value, which TensorRT tunes
    kernels for; max = DynamicDim.max, or DEFAULT_MAX_FACTOR x the largest observed value rounded up to a multiple
    of MAX_ROUNDING when the model declares none; clamped so that min <= opt <= max, as TensorRT requires.
    Static dims keep the manifest's shape in all three.
    """
    profiles: dict[str, tuple[Shape, Shape, Shape]] = {}
    for spec in manifest.inputs:
        if not spec.dynamic_dims:
            continue
        low, opt, high = list(spec.shape), list(spec.shape), list(spec.shape)
        for axis, dim_name in spec.dynamic_dims.items():
            dim = manifest.dims[dim_name]
            largest = max(dim.observed or [spec.shape[axis]])
            opt[axis] = max(largest, 1)
            low[axis] = min(max(dim.min, 1), opt[axis])
            declared = dim.max if dim.max is not None else _round_up(DEFAULT_MAX_FACTOR * opt[axis], MAX_ROUNDING)
            high[axis] = max(declared, opt[axis])
        profiles[spec.name] = (tuple(low), tuple(opt), tuple(high))
    return profiles


def trt_major(version: str) -> int:
    """'10.13.3.9' -> 10."""
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise UserInputError(f"cannot read the TensorRT version {version!r}") from None


def _onnx_quantized_and_fp16(path: Path) -> tuple[bool, bool]:
    """Whether the ONNX has QuantizeLinear nodes, and whether it carries fp16 types (inputs, weights or casts)."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    fp16 = onnx.TensorProto.FLOAT16
    quantized = any(n.op_type == "QuantizeLinear" for n in nodes)
    carries_fp16 = (
        any(i.type.tensor_type.elem_type == fp16 for i in model.graph.input)
        or any(t.data_type == fp16 for t in model.graph.initializer)
        or any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute) for n in nodes)
    )
    return quantized, carries_fp16


def _make_logger(trt: Any, verbose: bool) -> Any:
    """A TensorRT logger that forwards to the autoexport log and keeps error messages for our exceptions."""

    class ForwardingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            # Info and verbose messages cost a Python call each during builds: only pass them through for --verbose.
            self.threshold = int(trt.ILogger.Severity.INFO if verbose else trt.ILogger.Severity.WARNING)

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if int(severity) <= self.threshold:
                log.debug("  [TensorRT] %s", msg)

    return ForwardingLogger()


def _parser_failure(parser: Any, model: onnx.ModelProto, path: Path) -> ExportFailedError:
    """Name the first failing node and op; parser errors carry the node's index in the top-level graph."""
    messages, first = [], ""
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        index = error.node()
        where = ""
        if 0 <= index < len(model.graph.node):
            node = model.graph.node[index]
            where = f"node {node.name or index} ({node.op_type})"
            first = first or where
        messages.append(f"{where + ': ' if where else ''}{error.desc()}")
    head = f" at {first}" if first else ""
    return ExportFailedError(
        f"TensorRT could not parse {path.name}{head}:\n  " + "\n  ".join(messages or ["(no parser error recorded)"])
        + "\n  what to do: register an export patch that replaces the op with ones TensorRT supports, "
          "or use another backend (onnxruntime, iree, aoti)")


def _check_onnx_for(spec: BackendSpec, version: str, source: LoweringSource) -> bool:
    """Refuses what this TensorRT cannot build from this ONNX; returns whether its networks are strongly typed."""
    if source.onnx_path is None:
        raise UserInputError("the tensorrt backend builds from model.onnx: export with `--format onnx` or "
                             "`--format both`")
    major = trt_major(version)
    if major < 10:
        raise UserInputError(f"TensorRT {version} is too old: the tensorrt backend needs TensorRT 10 or 11")
    strongly_typed = major >= 11
    quantized, carries_fp16 = _onnx_quantized_and_fp16(source.onnx_path)
    if spec.target == "int8" and not quantized:
        raise UserInputError(
            f"tensorrt:int8 needs an ONNX with Q/DQ (QuantizeLinear/DequantizeLinear) nodes, and "
            f"{source.onnx_path.name} has none: export with `--precision int8`. TensorRT 10's implicit INT8 "
            "calibration is deprecated and TensorRT 11 removed it")
    if spec.target == "fp16" and strongly_typed and not carries_fp16:
        raise UserInputError(
            f"tensorrt:fp16 with TensorRT {version}: TensorRT 11 networks are strongly typed, so the "
            f"precision comes from the ONNX, and {source.onnx_path.name} is fp32. Export with `--precision fp16` "
            "to get an fp16 ONNX, or use tensorrt:fp32")
    return strongly_typed


def _builder_config(trt: Any, builder: Any, network: Any, spec: BackendSpec, strongly_typed: bool,
                    manifest: Manifest) -> tuple[Any, dict]:
    """The builder config: workspace, precision flags, and one optimization profile over the manifest's dims."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if spec.target == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16 if spec.target == "fp16" else trt.BuilderFlag.INT8)
    shapes = profile_shapes(manifest)
    uncovered = [network.get_input(i).name for i in range(network.num_inputs)
                 if -1 in tuple(network.get_input(i).shape) and network.get_input(i).name not in shapes]
    if uncovered:
        raise ExportFailedError(f"TensorRT: ONNX inputs {uncovered} have dynamic dims the manifest does not "
                                "declare, so no optimization profile can cover them")
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    return config, shapes


def _write_engine(engine_path: Path, serialized: Any, rel: str) -> None:
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with Timer() as t_write:
        engine_path.write_bytes(bytes(serialized))
    log.info("  tensorrt: serialized %s (%.1f MB) in %.1f s", rel, engine_path.stat().st_size / 1e6, t_write.seconds)


@register_backend
class TensorRTBackend(Backend):
    kind = "tensorrt"
    targets = ("fp32", "fp16", "int8")
    default_target = "fp32"

    def missing_dependency(self, spec: BackendSpec) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except (ImportError, OSError):
            return ("TensorRT is not installed (the Python module `tensorrt` cannot be imported). It needs a machine "
                    "with an NVIDIA GPU and driver; install it with `pip install tensorrt-cu12` or "
                    "`pip install tensorrt-cu13` (matching your CUDA major version) from NVIDIA's package index "
                    "(--extra-index-url https://pypi.nvidia.com), or from the TensorRT tarball by pip-installing the "
                    "wheel in its python/ folder. The other backends (iree, aoti, onnxruntime) work without it")
        return None

    def cannot_run_here(self, spec: BackendSpec) -> str | None:
        if not torch.cuda.is_available():
            return "TensorRT engines need an NVIDIA GPU, and torch sees no CUDA device on this machine"
        return None

    def lower(self, spec: BackendSpec, source: LoweringSource) -> LoweredArtifact:
        import tensorrt as trt

        strongly_typed = _check_onnx_for(spec, trt.__version__, source)
        logger = _make_logger(trt, source.verbose)
        builder = trt.Builder(logger)
        # STRONGLY_TYPED is the only mode in 11 (the flag is kept there for compatibility); 10 builds weakly typed
        # so that the FP16/INT8 flags apply. Explicit batch is the default since 10.
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)

        with Timer() as total:
            with Timer() as t_parse:
                parsed = parser.parse_from_file(str(source.onnx_path))
            if not parsed:
                raise _parser_failure(parser, onnx.load(str(source.onnx_path), load_external_data=False),
                                      source.onnx_path)
            log.info("  tensorrt: parsed %s (%d layers) in %.1f s", source.onnx_path.name, network.num_layers,
                     t_parse.seconds)
            config, shapes = _builder_config(trt, builder, network, spec, strongly_typed, source.manifest)
            log.info("  tensorrt: building the %s engine (TensorRT %s; kernel timing takes minutes on large models)",
                     spec.target, trt.__version__)
            with Timer() as t_build:
                serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                detail = "\n  ".join(logger.errors) or "(TensorRT logged no error)"
                raise ExportFailedError(f"TensorRT could not build an engine for {spec}:\n  {detail}")
            log.info("  tensorrt: built in %.1f s", t_build.seconds)
            rel = f"tensorrt/model.{spec.target}.engine"
            _write_engine(source.staging / rel, serialized, rel)

        return LoweredArtifact(
            backend=spec.name, spec=str(spec), path=rel, precision=spec.target, device="cuda",
            inputs=artifact_inputs(source.manifest.input_names, source.manifest, None), compile_s=total.seconds,
            details={
                "tensorrt_version": trt.__version__,
                "strongly_typed": strongly_typed,
                "profiles": {name: {"min": list(low), "opt": list(opt), "max": list(high)}
                             for name, (low, opt, high) in shapes.items()},
                "workspace_bytes": WORKSPACE_BYTES,
            },
        )

    def runner(self, artifact: LoweredArtifact, output_dir: Path, manifest: Manifest) -> Runner:
        return TensorRTRunner(output_dir / artifact.path, manifest, name=artifact.backend)


class TensorRTRunner(Runner):
    """Runs a serialized engine on the current CUDA device through torch-allocated buffers."""

    def __init__(self, engine_path: Path, manifest: Manifest, name: str = "tensorrt") -> None:
        import tensorrt as trt

        super().__init__(manifest.input_names, manifest.output_names)
        self.name = name
        if not engine_path.is_file():
            raise UserInputError(f"{engine_path} is missing: lower the export again with --backend tensorrt")
        self.logger = _make_logger(trt, verbose=False)  # must outlive the runtime and engine
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            detail = "; ".join(self.logger.errors)
            raise UserInputError(f"{engine_path} cannot be loaded by TensorRT {trt.__version__} on this GPU "
                                 f"({detail or 'no detail'}); engines are tied to the TensorRT version and GPU that "
                                 "built them: build it again here")
        io_names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = {n for n in io_names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        if inputs != set(self.input_names) or set(io_names) - inputs != set(self.output_names):
            raise RuntimeError(f"{engine_path}: engine tensors {io_names} do not match the manifest's inputs "
                               f"{self.input_names} and outputs {self.output_names}")
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in io_names}
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        self.logger.errors.clear()
        with torch.cuda.stream(self.stream):
            # .to("cuda") copies, so the caller's arrays are never touched; these lists keep the device buffers
            # alive until the stream has finished with them.
            inputs = [torch.from_numpy(np.ascontiguousarray(feed[n])).to("cuda", self.dtypes[n])
                      for n in self.input_names]
            for name, tensor in zip(self.input_names, inputs):
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = []
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{self.name}: output {name} has a data-dependent shape {shape}, which this "
                                       "runner does not support (it would need an IOutputAllocator)")
                tensor = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
                self.context.set_tensor_address(name, tensor.data_ptr())
                outputs.append(tensor)
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        if not ok:
            detail = "; ".join(self.logger.errors) or "no detail"
            raise RuntimeError(f"{self.name}: TensorRT execution failed: {detail}")
        return self._named(outputs)
