"""Stage 3, export: torch.export the generated wrapper (with export patches applied) and translate the
same ExportedProgram to ONNX. Failures are turned into messages that name the op, the module and what to do."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ExportFailedError, first_line
from .events import emit
from .manifest import Manifest
from .onnx_translations import translation_table
from .padding import PaddingPlan
from .patches import (AppliedPatch, PatchContext, export_patches, substituted_functions,
                      substituted_op_functions)
from .portable import make_device_portable

log = logging.getLogger("autoexport")

ONNX_OPSET = 18


@dataclass
class ExportedArtifacts:
    program: torch.export.ExportedProgram
    patches: list[AppliedPatch] = field(default_factory=list)
    mutated_user_inputs: list[str] = field(default_factory=list)


def dynamic_shapes_for(manifest: Manifest, plan: PaddingPlan | None = None) -> tuple[dict[int, Any] | None, ...]:
    """torch.export dynamic_shapes for the flat inputs; dims a padding plan fixes to its capacity stay static,
    and the plan's count input (last) is a scalar."""
    dims = {name: torch.export.Dim(name, min=d.min, max=d.max) if d.max else torch.export.Dim(name, min=d.min)
            for name, d in manifest.dims.items()}
    fixed = plan.dim if plan else None
    shapes = tuple({i: dims[n] for i, n in t.dynamic_dims.items() if n != fixed} or None for t in manifest.inputs)
    return shapes + ((None,) if plan else ())


class ModuleTracker:
    """Keeps the stack of module paths being executed, so a failure can name the module it happened in."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack: list[tuple[str, str]] = []
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter(name or "<model>", type(module).__name__)))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str, class_name: str):  # noqa: ANN202
        def hook(module, args):  # noqa: ANN001, ANN202
            self.stack.append((name, class_name))
        return hook

    def _leave(self, module, args, output):  # noqa: ANN001, ANN202
        if self.stack:
            self.stack.pop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


_SOURCE_MARKERS = ("/mmdet3d/", "/mmcv/", "/mmdet/", "/mmengine/", "wrapper.py", "/autoexport/models/")


def innermost_model_frame(err: BaseException) -> str | None:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if any(m in f.filename for m in _SOURCE_MARKERS)]
    if not frames:
        return None
    frame = frames[-1]
    short = re.sub(r".*/site-packages/", "", frame.filename)
    return f"{short}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def _classify(err: BaseException, stage: str = "torch.export") -> tuple[str, str]:
    """(what went wrong, what to do) for the export errors we know."""
    text = f"{type(err).__name__}: {err}"
    if "DataDependent" in text or "data-dependent" in text or "GuardOnDataDependentSymNode" in text:
        return ("data-dependent control flow or shape (a Python branch, loop or .item() on tensor values)",
                "register an export patch for this class in its module under autoexport/models/ that computes the "
                "same result with static shapes (see autoexport/models/pillar_scatter.py)")
    if "not implemented on CPU" in text or "not compiled with GPU" in text or "compiled with CUDA enabled" in text:
        return ("an mmcv op with no CPU kernel in this mmcv build",
                "run with --device cuda on a machine with a GPU, or substitute the op library's implementation "
                "(autoexport.ops.OP_LIBRARY) through an export patch with eager_devices=('cpu',) in "
                "autoexport/models/mmcv_ops.py, as for sparse convolution")
    if "data pointer" in text or "_ext" in text or "FakeTensor" in text:
        return ("a C++/CUDA extension op (mmcv._ext) that torch.export cannot see into",
                "substitute an exportable implementation of the op (pure PyTorch or a torch.library custom op) "
                "through an export patch in autoexport/patches.py")
    if stage.startswith("the eager"):
        # Not an export problem: mmdet3d's own forward failed before torch.export was involved.
        return ("the model's own forward failed in eager PyTorch",
                "run with --verbose for the full trace; a detector family without a module in autoexport/models/ "
                "(e.g. a two-stage detector, whose RoI head waits for a host-side NMS) may need its own tensor path "
                "and a split plan there")
    return ("an operation torch.export could not trace", "run with --verbose for the full trace; if the module is "
            "export-hostile, register an export patch in its class's module under autoexport/models/")


def describe_export_failure(stage: str, err: BaseException, module_stack: list[tuple[str, str]], verbose: bool,
                            context: str = "") -> str:
    """One line: what failed where (module, source line), the error, and what to do. The trace stays the
    exception's cause, which the CLI prints with --verbose."""
    what, todo = _classify(err, stage)
    message = " ".join(first_line(str(err)).split())
    where = f" in module `{module_stack[-1][0]}` ({module_stack[-1][1]})" if module_stack else ""
    frame = innermost_model_frame(err)
    at = f" at {frame}" if frame else ""
    of = f" of {context}" if context else ""
    return (f"{stage} failed{where}{of}: {what}: {type(err).__name__}: {message[:400]}{at}; what to do: {todo}")


def export_program(wrapper: torch.nn.Module, model: torch.nn.Module, manifest: Manifest,
                   example: tuple[torch.Tensor, ...], verbose: bool = False, variant: str = "default",
                   plan: PaddingPlan | None = None, star_args: bool = False) -> ExportedArtifacts:
    """torch.export the flat wrapper (or a PaddedInputs front when `plan` is given) under the export patches
    of `variant`."""
    tracker = ModuleTracker(model)
    context = PatchContext(batch_size=manifest.batch_size, variant=variant,
                           spare_batch_row=bool(plan and plan.spare_batch_row))
    try:
        with export_patches(model, context) as applied:
            for patch in applied:
                log.info("  patch %s.%s (used at %s)", patch.target, patch.method, ", ".join(patch.module_paths[:3]))
                emit("patch", name=f"{patch.target}.{patch.method}")
            shapes = dynamic_shapes_for(manifest, plan)
            with substituted_functions(variant) as functions, substituted_op_functions() as op_functions:
                # PaddedInputs.forward (and split stages') take *args: torch.export wants one entry for that parameter.
                program = torch.export.export(wrapper, example, dynamic_shapes=(shapes,) if plan or star_args else shapes,
                                              strict=False)
            for function in functions:
                log.info("  substituted %s while tracing", function.target)
            for function in op_functions:
                log.info("  substituted %s by %s (rebound in %s)", function.substitutes, function.target,
                         ", ".join(function.module_paths[:3]))
            applied = [*applied, *functions, *op_functions]
    except Exception as err:
        raise ExportFailedError(describe_export_failure("torch.export", err, tracker.stack, verbose)) from err
    finally:
        tracker.remove()
    # Saved, translated to ONNX and lowered without the trace's device: it runs on CUDA after move_to_device_pass.
    program = make_device_portable(program)
    mutated = list(program.graph_signature.user_inputs_to_mutate.values())
    return ExportedArtifacts(program=program, patches=applied, mutated_user_inputs=mutated)


def save_pt2(program: torch.export.ExportedProgram, path: Path) -> None:
    torch.export.save(program, str(path))


def export_onnx(program: torch.export.ExportedProgram, input_names: list[str], output_names: list[str], path: Path,
                verbose: bool = False) -> None:
    """Translate the ExportedProgram (not a re-trace of the module) to ONNX with named inputs and outputs."""
    sink = io.StringIO()
    try:
        # The dynamo exporter prints its own progress; keep it for --verbose only.
        with contextlib.redirect_stdout(sink) if not verbose else contextlib.nullcontext(), _no_approximate_no_ops():
            onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=input_names,
                                             output_names=output_names, opset_version=ONNX_OPSET,
                                             optimize=True, verbose=verbose,
                                             custom_translation_table=translation_table())
    except Exception as err:
        ops = sorted(set(re.findall(r"(aten::\w+(?:\.\w+)?|mmcv::\w+|torch\.ops\.\w+\.\w+)", str(err))))
        hint = f" (ops: {', '.join(ops)})" if ops else ""
        raise ExportFailedError(
            f"ONNX translation failed{hint}: {type(err).__name__}: {str(err).strip().splitlines()[0][:400]}\n"
            "  what to do: register an ONNX translation for the op, or an export patch that replaces it; "
            "--format pt2 still works" + ("" if not verbose else "\n" + "".join(traceback.format_exception(err)))
        ) from err
    onnx_program.save(str(path), external_data=False)


@contextlib.contextmanager
def _no_approximate_no_ops() -> Iterator[None]:
    """torch.onnx's optimizer without onnxscript's no-op rules (x + 0, x - 0, x * 1, x / 1, dropout).

    onnxscript 0.7 matches their constant with math.isclose(abs_tol=1e-8), so ``x + 1e-8`` counts as ``x + 0``
    and is deleted: mmdet3d's PointFPModule computes ``1 / (dist + 1e-8)``, and VoteNet's ONNX got inf where a
    point coincides with a sampled one (dist 0). Exact no-ops are rare in exported graphs; dropping the rules
    costs a few Identity-like nodes at most.
    """
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _no_op

    original = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(rule for rule in original if rule not in _no_op.rules.rules)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = original


@contextlib.contextmanager
def quiet_export_logs(verbose: bool) -> Iterator[None]:
    """torch.export warns loudly about things that do not affect the result; keep that for --verbose."""
    if verbose:
        yield
        return
    names = ["torch._dynamo", "torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes", "torch.onnx",
             "onnx_ir"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
