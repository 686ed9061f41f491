"""IREE: ONNX -> MLIR (iree-import-onnx) -> .vmfb (iree-compile) for llvm-cpu or cuda, run with iree.runtime.

IREE gets its own export variant (see patches.py): the PillarFeatureNet column writes become a concat in every
export, and here kernel == stride transposed convs also become a 1x1 conv plus depth-to-space. Where the model
has a static padding rule, the artifact takes fixed-capacity buffers plus a count input.

The llvm-cpu flags were measured on PointPillars KITTI (docs/research/iree_cpu_pointpillars.md): with IREE's
defaults the model ran ~30x slower than ONNX Runtime; host CPU features, channels-last convolutions and data
tiling bring it to parity.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ExportFailedError, signal_name
from ..manifest import Manifest
from .runner import Runner
from . import (Backend, BackendSpec, LoweredArtifact, LoweringSource, PaddingRunner, Timer, artifact_inputs,
               register_backend)

log = logging.getLogger("autoexport")

DATA_TILING_FLAG = "--iree-opt-data-tiling"
LLVM_CPU_FLAGS = [
    "--iree-hal-target-device=local",
    "--iree-hal-local-target-device-backends=llvm-cpu",
    "--iree-llvmcpu-target-cpu=host",  # without it IREE targets generic x86-64 (no AVX): 4x slower
    # NCHW convolutions get slow generic codegen; channels-last alone gave ~4x on PointPillars.
    "--iree-preprocessing-pass-pipeline=builtin.module(util.func(iree-preprocessing-convert-conv-to-channels-last))",
    DATA_TILING_FLAG,
]
# Channels-last convolutions: 383 ms vs 404 ms per PointPillars call on an H200 (benchmarks/RESULTS.md).
CUDA_FLAGS = [
    "--iree-hal-target-device=cuda",
    "--iree-preprocessing-pass-pipeline=builtin.module(util.func(iree-preprocessing-convert-conv-to-channels-last))",
]
DEFAULT_CUDA_ARCH = "sm_90"
# IREE 3.13 has no sm_90 entry in its known-target table (iree-org/iree#22147). sm_80 embeds PTX, which the CUDA
# driver JIT-compiles for newer GPUs, so it is the fallback when the requested architecture is unknown.
CUDA_FALLBACK_ARCH = "sm_80"
ENTRY_FUNCTION = "main_graph"  # the function iree-import-onnx creates


def _iree_version() -> str:
    from importlib.metadata import version

    return version("iree-base-compiler")


class CompilerCrash(ExportFailedError):
    """The tool died on a signal (a compiler bug), as opposed to rejecting the program with an error."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where  # the innermost MLIR pass on the crash backtrace, or "" when it names none


def _crashed_pass(stderr: str) -> str:
    """Innermost `...Pass::runOnOperation` frame of an LLVM crash backtrace (frames run innermost first)."""
    found = re.search(r"(\w+Pass)::runOnOperation", stderr)
    return found.group(1) if found else ""


def _run_tool(args: Sequence[str], what: str) -> None:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if proc.returncode < 0:
        where = _crashed_pass(proc.stderr)
        raise CompilerCrash(f"{what} crashed (exit {proc.returncode}, {signal_name(proc.returncode)})"
                            + (f" in {where}" if where else "") + "; a bug of the tool, not of the model", where)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()] or proc.stderr.splitlines()
        raise ExportFailedError(f"{what} failed (exit {proc.returncode}): {' | '.join(errors[:3])[:800]}")


def _compile_tool() -> str:
    from iree.compiler.tools import binaries

    return binaries.find_tool("iree-compile")


LOOP_CONDITION_TRUE = "autoexport_loop_condition_true"


def make_loops_for_like(model: Any) -> int:  # an onnx.ModelProto
    """Rewrite the graph's ONNX Loops into the form torch-mlir's importer lowers (to torch.prim.Loop).

    Two gaps, both in the FPS translation (autoexport.ops.point_sample): onnxscript leaves the optional loop
    condition empty, which the importer cannot bind (it needs a tensor), and shape inference gives the Loop's
    results and the body's carried values no type, which the importer then declares as scalars where prim.Loop
    needs the inits' types. So: an explicit `true` condition (the body already forwards it unchanged, the for-like
    form), and each loop-carried result, body argument and body result typed like its init. Valid because the
    library's loops keep their carried shapes. FPS over a distance matrix (3DSSD's F-FPS) still fails: its body
    has an Unsqueeze that shape inference leaves untyped. Returns the number of loops rewritten."""
    import onnx
    from onnx import TensorProto, helper

    loops = [n for n in model.graph.node if n.op_type == "Loop" and n.domain in ("", "ai.onnx")]
    if not loops:
        return 0
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)  # the importer's own inference
    types = {v.name: v.type for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    if not any(i.name == LOOP_CONDITION_TRUE for i in model.graph.initializer):
        model.graph.initializer.append(helper.make_tensor(LOOP_CONDITION_TRUE, TensorProto.BOOL, [], [True]))
    declared = {v.name: v for v in model.graph.value_info}
    for loop in loops:
        while len(loop.input) < 2:
            loop.input.append("")
        if not loop.input[1]:
            loop.input[1] = LOOP_CONDITION_TRUE
        body = next(a.g for a in loop.attribute if a.name == "body")
        for init, result, body_arg, body_result in zip(loop.input[2:], loop.output, body.input[2:], body.output[1:]):
            if init not in types:
                continue
            if result in declared:
                declared[result].type.CopyFrom(types[init])
            else:
                model.graph.value_info.append(helper.make_value_info(result, types[init]))
            for value in (body_arg, body_result):  # the prim.Loop region's arguments and yields
                value.type.CopyFrom(types[init])
    return len(loops)


ROUND_HALF_EVEN_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds an fp32 |v| < 2**22 half to even


def fake_quantize_activations(model: Any) -> int:  # an onnx.ModelProto
    """Rewrite each activation QuantizeLinear -> DequantizeLinear pair (int8, zero point 0, one scale) into the same
    arithmetic in float: Div by the scale, Clip to [-128, 127], round half to even by adding and subtracting
    1.5 * 2**23, Mul by the scale. Exactly ONNX's Q/DQ (rounding after the clip equals clipping after the rounding
    for integer bounds), but IREE 3.13 lowers its own quantize op element by element through a scalar rounding
    call: PointPillars INT8 took 19.0 s per call with Q/DQ and 1.10 s in this form (FP32: 0.93 s). Weight pairs
    (constant inputs) are left alone. Returns the number of pairs rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    constants.update({o: n for n in graph.node if n.op_type == "Constant" for o in n.output})
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def int8_zero(name: str) -> bool:
        zero = constants.get(name)
        return isinstance(zero, TensorProto) and zero.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero).any()

    def scalar(name: str) -> bool:
        scale = constants.get(name)
        return isinstance(scale, TensorProto) and numpy_helper.to_array(scale).size == 1

    position = {id(node): index for index, node in enumerate(graph.node)}
    replacements: dict[int, list] = {}  # Quantize's position -> the float nodes
    dequantizers: set[int] = set()  # positions of the Dequantize nodes they replace
    for index, quant in enumerate(graph.node):
        users = consumers.get(quant.output[0], []) if quant.op_type == "QuantizeLinear" else []
        if (len(users) != 1 or users[0].op_type != "DequantizeLinear" or quant.input[0] in constants
                or len(quant.input) < 3 or not int8_zero(quant.input[2]) or not scalar(quant.input[1])
                or list(users[0].input[1:]) != list(quant.input[1:])):
            continue
        stem, scale = f"autoexport_fq{len(replacements)}", quant.input[1]
        replacements[index] = [
            helper.make_node("Div", [quant.input[0], scale], [f"{stem}_scaled"]),
            helper.make_node("Clip", [f"{stem}_scaled", "autoexport_q_min", "autoexport_q_max"], [f"{stem}_clipped"]),
            helper.make_node("Add", [f"{stem}_clipped", "autoexport_rne_magic"], [f"{stem}_shifted"]),
            helper.make_node("Sub", [f"{stem}_shifted", "autoexport_rne_magic"], [f"{stem}_rounded"]),
            helper.make_node("Mul", [f"{stem}_rounded", scale], [users[0].output[0]])]
        dequantizers.add(position[id(users[0])])
    if not replacements:
        return 0
    nodes = []
    for index, node in enumerate(graph.node):
        if index not in dequantizers:
            nodes += replacements.get(index, [node])
    del graph.node[:]
    graph.node.extend(nodes)  # each replacement sits where its Quantize was: the order stays topological
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (
        ("autoexport_q_min", -128.0), ("autoexport_q_max", 127.0), ("autoexport_rne_magic", ROUND_HALF_EVEN_MAGIC)))
    return len(replacements)


def import_onnx(onnx_path: Path, mlir_path: Path) -> None:
    import onnx

    model = onnx.load(str(onnx_path))
    rewritten = mlir_path.with_name(f".{mlir_path.stem}.rewritten.onnx")
    loops, fake_quantized = make_loops_for_like(model), fake_quantize_activations(model)
    if fake_quantized:
        log.info("  %d activation Q/DQ pairs written as float arithmetic for IREE", fake_quantized)
    if loops or fake_quantized:
        onnx.save(model, str(rewritten))
        onnx_path = rewritten
    try:
        _run_tool([sys.executable, "-m", "iree.compiler.tools.import_onnx", str(onnx_path), "-o", str(mlir_path)],
                  "iree-import-onnx")
    finally:
        rewritten.unlink(missing_ok=True)  # an intermediate, like the .mlir


def compile_vmfb(mlir_path: Path, vmfb_path: Path, flags: Sequence[str]) -> None:
    _run_tool([_compile_tool(), str(mlir_path), *flags, "-o", str(vmfb_path)], "iree-compile")


@register_backend
class IreeBackend(Backend):
    kind = "iree"
    targets = ("llvm-cpu", "cuda")
    default_target = "llvm-cpu"
    # IREE 3.13's runtime segfaulted on ImVoxelNet's GridSample (reads off the image) and took autoexport down;
    # the IREE export now gathers instead (ops.grid_sample), and a crash of another module fails only its checks.
    verify_in_subprocess = True

    def missing_dependency(self, spec: BackendSpec) -> str | None:
        try:
            import iree.compiler  # noqa: F401
            import iree.runtime  # noqa: F401
        except ImportError:
            return ("IREE is not installed: pip install iree-base-compiler iree-base-runtime "
                    "(scripts/setup.sh installs the pinned versions)")
        return None

    def cannot_run_here(self, spec: BackendSpec) -> str | None:
        if spec.target != "cuda":
            return None
        import iree.runtime as rt

        try:
            devices = rt.get_driver("cuda").query_available_devices()
        except Exception:  # noqa: BLE001 - no driver library or no GPU: either way nothing to run on
            devices = []
        if not devices:
            return "no CUDA device here: compiled only; run `autoexport verify DIR --backend iree:cuda` on a GPU machine"
        return None

    def lower(self, spec: BackendSpec, source: LoweringSource) -> LoweredArtifact:
        plan = source.padding
        onnx_path = source.export_variant("iree", plan)
        out_dir = source.staging / "iree"
        out_dir.mkdir(parents=True, exist_ok=True)
        mlir_path = out_dir / f".{spec.name}.mlir"
        vmfb_rel = f"iree/model.{spec.target}.vmfb"
        details: dict = {"iree_compiler": _iree_version(), "entry_function": ENTRY_FUNCTION,
                         "source": "ONNX of the 'iree' export variant (see export_patches in metadata.json)"}
        with Timer() as timer:
            log.info("  iree-import-onnx %s", onnx_path.name)
            import_onnx(onnx_path, mlir_path)
            if spec.target == "llvm-cpu":
                flags, note = self._compile_llvm_cpu(mlir_path, source.staging / vmfb_rel)
                details["driver"] = "local-task"
                if note:
                    details["note"] = note
            else:
                flags, arch = self._compile_cuda(spec, mlir_path, source.staging / vmfb_rel)
                details.update(driver="cuda", requested_arch=spec.arch or DEFAULT_CUDA_ARCH, compiled_arch=arch)
                if arch != (spec.arch or DEFAULT_CUDA_ARCH):
                    details["note"] = (f"IREE {details['iree_compiler']} does not know {spec.arch or DEFAULT_CUDA_ARCH} "
                                       f"(iree-org/iree#22147); compiled for {arch}, whose PTX the driver JIT-compiles "
                                       "on newer GPUs")
            details["flags"] = flags
        mlir_path.unlink(missing_ok=True)
        names = source.manifest.input_names + ([plan.count_input] if plan else [])
        log.info("  %s: %s (%.1f MB) in %.1f s", spec.name, vmfb_rel,
                 (source.staging / vmfb_rel).stat().st_size / 1e6, timer.seconds)
        return LoweredArtifact(backend=spec.name, spec=str(spec), path=vmfb_rel, precision="fp32",
                               device="cuda" if spec.target == "cuda" else "cpu",
                               inputs=artifact_inputs(names, source.manifest, plan),
                               padding=plan.to_json() if plan else None, compile_s=timer.seconds, details=details)

    @staticmethod
    def _compile_llvm_cpu(mlir_path: Path, vmfb_path: Path) -> tuple[list[str], str]:
        """LLVM_CPU_FLAGS; if iree-compile crashes with them, once more without data tiling. IREE 3.13 segfaults in
        MaterializeDeviceEncodingPass on ImVoxelNet with data tiling and channels-last convs together (either alone
        compiles), so the export still gets a module, only without the tiled layouts' speed."""
        flags = list(LLVM_CPU_FLAGS)
        log.info("  iree-compile llvm-cpu (host CPU, channels-last convs, data tiling)")
        try:
            compile_vmfb(mlir_path, vmfb_path, flags)
            return flags, ""
        except CompilerCrash as crash:
            flags.remove(DATA_TILING_FLAG)
            log.info("  %s; compiling again without data tiling", crash)
            compile_vmfb(mlir_path, vmfb_path, flags)
            return flags, f"compiled without {DATA_TILING_FLAG}: with it, {crash}"

    @staticmethod
    def _compile_cuda(spec: BackendSpec, mlir_path: Path, vmfb_path: Path) -> tuple[list[str], str]:
        arch = spec.arch or DEFAULT_CUDA_ARCH
        flags = [*CUDA_FLAGS, f"--iree-cuda-target={arch}"]
        log.info("  iree-compile cuda %s", arch)
        try:
            compile_vmfb(mlir_path, vmfb_path, flags)
            return flags, arch
        except ExportFailedError as err:
            if "missing GPU target" not in str(err) and "Unknown CUDA target" not in str(err) or arch == CUDA_FALLBACK_ARCH:
                raise
            log.info("  IREE does not know %s (iree-org/iree#22147): compiling %s PTX instead", arch, CUDA_FALLBACK_ARCH)
            flags = [*CUDA_FLAGS, f"--iree-cuda-target={CUDA_FALLBACK_ARCH}"]
            compile_vmfb(mlir_path, vmfb_path, flags)
            return flags, CUDA_FALLBACK_ARCH

    def runner(self, artifact: LoweredArtifact, output_dir: Path, manifest: Manifest) -> Runner:
        plan = artifact.padding_plan
        names = [i["name"] for i in artifact.inputs]
        inner = IreeRunner(output_dir / artifact.path, artifact.details.get("driver", "local-task"), names,
                           manifest.output_names, name=artifact.backend)
        return PaddingRunner(inner, plan, manifest.input_names) if plan else inner


class IreeRunner(Runner):
    """A .vmfb loaded into an iree.runtime context on one driver (local-task for CPU, cuda for NVIDIA GPUs)."""

    def __init__(self, vmfb: Path, driver: str, input_names: Sequence[str], output_names: Sequence[str],
                 name: str = "iree") -> None:
        import iree.runtime as rt

        super().__init__(input_names, output_names)
        self.name = name
        if not vmfb.is_file():
            raise FileNotFoundError(f"{vmfb} is missing")
        self.context = rt.SystemContext(config=rt.Config(driver))
        self.context.add_vm_module(rt.VmModule.copy_buffer(self.context.instance, vmfb.read_bytes()))
        self.function = self.context.modules.module[ENTRY_FUNCTION]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        # np.ascontiguousarray would turn the 0-d count input into shape (1,)
        results = self.function(*[np.require(feed[n], requirements="C") for n in self.input_names])
        results = results if isinstance(results, (list, tuple)) else [results]
        return self._named([r.to_host() for r in results])
