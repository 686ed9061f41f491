"""Export patches: replacements for mmdet3d methods that torch.export cannot trace (the mechanism).

Each patch is keyed by the mmdet3d class that defines the method and registered by that class's module in
autoexport.models (ClassKnowledge.patches). Patches are applied to that
class only inside `export_patches(...)` and restored on exit, so eager PyTorch (the parity
reference) runs mmdet3d's original code and parity proves each patch is faithful. The exceptions
are patches with `eager_devices`: where the original cannot run on the device (an mmcv op without a
kernel there, code that calls `.cuda()`), the reference runs them too (`eager_substitutions`), and
their own tests check them against mmcv or mmdet3d instead; metadata.json marks them
`in_eager_reference`.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch.overrides import TorchFunctionMode

from .knowledge import KNOWLEDGE


@dataclass(frozen=True)
class PatchContext:
    """Facts fixed for one export that patches may rely on."""

    batch_size: int  # number of samples per call: static in the exported graph
    variant: str = "default"  # which export this is: "default" (model.pt2/model.onnx) or a backend's ("iree")
    spare_batch_row: bool = False  # padded rows carry batch index == batch_size and must land outside the output


@dataclass(frozen=True)
class ExportPatch:
    target: str  # mmdet3d class that defines `method`
    method: str
    reason: str  # why the original cannot be exported (recorded in metadata.json)
    make: Callable[[PatchContext], Callable[..., Any]]  # builds the replacement method
    variants: tuple[str, ...] = ()  # exports it applies to; empty: every export
    # Op substitutions: the mmcv op this replaces with the op library's (autoexport.ops) implementation.
    substitutes: str | None = None
    # Devices where the original cannot run (mmcv has no kernel for the op; mmdet3d code that cannot run there),
    # so the eager reference must run the patch too; the library op is checked against mmcv (or a dense
    # reference) in tests/test_ops.py, other such patches against mmdet3d in tests/test_patches.py. `module` is
    # the import path of the target class, so it can be patched before a model exists.
    eager_devices: tuple[str, ...] = ()
    module: str | None = None
    # Which instances it is for, where the class alone does not say (e.g. one voxel_type of the data preprocessor);
    # a model without such an instance neither gets the patch nor lists it.
    applies_to: Callable[[torch.nn.Module], bool] | None = None


def register_patch(patch: ExportPatch) -> ExportPatch:
    """Adds the patch to its target class's knowledge (called by the modules of autoexport.models)."""
    KNOWLEDGE.register(patch.target, home=sys._getframe(1).f_globals.get("__name__"), patches=(patch,))
    return patch


@dataclass(frozen=True)
class AppliedPatch:
    target: str
    method: str
    reason: str
    module_paths: tuple[str, ...]  # where in the model the patched class is used
    substitutes: str | None = None


def patches_for(model: torch.nn.Module, variant: str = "default") -> list[tuple[type, ExportPatch, list[str]]]:
    """Every registered patch for this export variant whose target class appears in the model's module tree."""
    found: dict[tuple[type, str], tuple[type, ExportPatch, list[str]]] = {}
    for module_path, module in model.named_modules():
        for klass in type(module).__mro__:
            known = KNOWLEDGE.get(klass.__name__)
            if known is not None:
                for patch in known.patches:
                    if patch.variants and variant not in patch.variants:
                        continue
                    if patch.applies_to is not None and not patch.applies_to(module):
                        continue
                    key = (klass, patch.method)
                    entry = found.setdefault(key, (klass, patch, []))
                    entry[2].append(module_path or "<model>")
    return list(found.values())


class MethodSwaps:
    """Replaces methods on classes and puts the originals back, including methods the class only inherited
    (those are deleted again, so the base class's shows through). The one mechanism every patch uses."""

    _missing = object()

    def __init__(self) -> None:
        self._saved: list[tuple[type, str, Any]] = []

    def swap(self, klass: type, method: str, replacement: Callable[..., Any]) -> None:
        self._saved.append((klass, method, klass.__dict__.get(method, self._missing)))
        setattr(klass, method, replacement)

    def restore(self) -> None:
        for klass, method, original in reversed(self._saved):
            if original is self._missing:
                delattr(klass, method)
            else:
                setattr(klass, method, original)
        self._saved.clear()


@contextmanager
def swapped_methods() -> Iterator[MethodSwaps]:
    swaps = MethodSwaps()
    try:
        yield swaps
    finally:
        swaps.restore()


@contextmanager
def export_patches(model: torch.nn.Module, context: PatchContext) -> Iterator[list[AppliedPatch]]:
    """Apply every relevant patch to its class for the duration of the block, then restore."""
    applied: list[AppliedPatch] = []
    with swapped_methods() as swaps:
        for klass, patch, module_paths in patches_for(model, context.variant):
            swaps.swap(klass, patch.method, patch.make(context))
            # One entry per registered patch: a class name can match several classes (mmcv's ConvTranspose2d
            # subclasses torch's), and each of them is patched, but it is still one patch.
            same = next((i for i, a in enumerate(applied) if (a.target, a.method) == (patch.target, patch.method)), None)
            if same is None:
                applied.append(AppliedPatch(patch.target, patch.method, patch.reason, tuple(module_paths),
                                            patch.substitutes))
            else:
                merged = applied[same].module_paths + tuple(p for p in module_paths if p not in applied[same].module_paths)
                applied[same] = AppliedPatch(patch.target, patch.method, patch.reason, merged, patch.substitutes)
        yield applied


@contextmanager
def eager_substitutions(device: str, calls: dict[str, OpFunctionSubstitution] | None = None
                        ) -> Iterator[list[AppliedPatch]]:
    """Op substitutions the eager reference needs on `device` (mmcv has no kernel there): class methods by import
    path and op functions wherever imported, for the duration of the block, then restored. Yields those applied;
    `calls` is filled with the op functions called, host-side ones (a data preprocessor's) included."""
    used: list[AppliedPatch] = []
    with swapped_methods() as swaps:
        for _, patches in KNOWLEDGE.with_field("patches"):
            for patch in patches:
                if device.split(":")[0] not in patch.eager_devices or not patch.module:
                    continue
                try:
                    klass = getattr(importlib.import_module(patch.module), patch.target)
                except (ImportError, AttributeError):
                    continue  # the library that defines it is not installed: nothing to substitute
                swaps.swap(klass, patch.method, patch.make(PatchContext(batch_size=1)))
                used.append(AppliedPatch(patch.target, patch.method, patch.reason, (), patch.substitutes))
        with substituted_op_functions(device, report="bound", calls=calls) as functions:
            yield [*used, *functions]


def library_forward(module: str, class_name: str) -> Callable[[PatchContext], Callable[..., Any]]:
    """The forward of the op library's same-named drop-in class (autoexport.ops.<module>); it reads the same
    attributes as mmcv's class (e.g. weight, stride, deform_groups, conv_offset; voxel_size, average_points)."""

    def make(context: PatchContext) -> Callable[..., Any]:
        return getattr(importlib.import_module(f"autoexport.ops.{module}"), class_name).forward

    return make


# ---- torch functions replaced while tracing -------------------------------------------------------

@dataclass(frozen=True)
class FunctionSubstitution:
    """A torch function replaced during torch.export only (through a TorchFunctionMode), for every caller."""

    name: str
    functions: tuple[Callable[..., Any], ...]
    replacement: Callable[..., Any]
    reason: str
    variants: tuple[str, ...] = ()  # exports it applies to; empty: every export
    when: Callable[..., bool] | None = None  # only the calls whose arguments satisfy this; None: every call


# Filled by autoexport.models.torch_functions.
FUNCTION_SUBSTITUTIONS: list[FunctionSubstitution] = []


class _FunctionSubstitutionMode(TorchFunctionMode):
    def __init__(self, variant: str) -> None:
        super().__init__()
        KNOWLEDGE.load()  # fills FUNCTION_SUBSTITUTIONS
        self.by_function = {f: sub for sub in FUNCTION_SUBSTITUTIONS for f in sub.functions
                            if not sub.variants or variant in sub.variants}
        self.used: list[FunctionSubstitution] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        sub = self.by_function.get(func)
        if sub is None or (sub.when is not None and not sub.when(*args, **(kwargs or {}))):
            return func(*args, **(kwargs or {}))
        if sub not in self.used:
            self.used.append(sub)
        return sub.replacement(*args, **(kwargs or {}))


@contextmanager
def substituted_functions(variant: str = "default") -> Iterator[list[AppliedPatch]]:
    """FUNCTION_SUBSTITUTIONS of this export variant active for the block; yields (and fills on exit) the ones the
    model called."""
    applied: list[AppliedPatch] = []
    mode = _FunctionSubstitutionMode(variant)
    with mode:
        yield applied
    applied.extend(AppliedPatch(sub.name, "", sub.reason, ()) for sub in mode.used)


# ---- mmcv op functions, substituted by autoexport.ops wherever a module imported them -----------

@dataclass(frozen=True)
class OpFunctionSubstitution:
    """An mmcv op function (an autograd Function's apply over a C++/CUDA kernel) that torch.export cannot trace.

    Modules bind these at import (``from mmcv.ops import furthest_point_sample``), so the substitution rebinds
    every module global that is the same object, in mmcv, mmdet3d and the user's custom_imports alike.
    """

    mmcv_function: str  # import path, e.g. "mmcv.ops.furthest_point_sample" (or mmdet3d's own binding of one)
    library_function: str  # attribute of autoexport.ops.<library_module> with the same signature
    eager_devices: tuple[str, ...] = ("cpu",)  # mmcv 2.1.0 has CUDA kernels only
    library_module: str = "point_sample"
    reason: str = ""  # metadata.json's reason; empty: the point-op one


_POINT_OP_REASON = ("mmcv's {name} is a CUDA-only C++ op torch.export cannot trace; autoexport.ops.point_sample "
                    "has it in PyTorch (FPS as a custom op with an ONNX Loop), checked against numpy ports of the "
                    "CUDA kernel in tests/test_ops.py")

# Filled by autoexport.models.mmcv_ops.
OP_FUNCTION_SUBSTITUTIONS: list[OpFunctionSubstitution] = []


def _resolve(path: str) -> Any:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _recording(sub: OpFunctionSubstitution, used: dict[str, OpFunctionSubstitution]) -> Callable[..., Any]:
    implementation = getattr(importlib.import_module(f"autoexport.ops.{sub.library_module}"), sub.library_function)

    def substitute(*args: Any, **kwargs: Any) -> Any:
        used[sub.mmcv_function] = sub
        return implementation(*args, **kwargs)

    return substitute


def _rebind_globals(modules: Iterable[tuple[str, Any]], swap: dict[int, tuple[Any, Any]]) -> list[tuple[Any, str, Any, str]]:
    """Sets every global of `modules` that is one of swap's objects (keyed by id: (object, replacement)) to its
    replacement. Returns (module, name, previous value, module name) for each one set."""
    rebound = []
    for module_name, module in modules:
        for name, value in list(vars(module).items()):
            entry = swap.get(id(value))
            if entry is not None and value is entry[0]:
                setattr(module, name, entry[1])
                rebound.append((module, name, value, module_name))
    return rebound


@contextmanager
def substituted_op_functions(device: str | None = None, report: Literal["bound", "called"] = "called",
                             calls: dict[str, OpFunctionSubstitution] | None = None) -> Iterator[list[AppliedPatch]]:
    """OP_FUNCTION_SUBSTITUTIONS bound in every loaded module for the block (device None: all of them, as the
    export needs; otherwise those mmcv has no kernel for on that device). Yields the ones bound, or (filled on
    exit) the ones the block called. `calls`, when given, is filled as they are called (by import path)."""
    KNOWLEDGE.load()  # fills OP_FUNCTION_SUBSTITUTIONS
    wanted = [sub for sub in OP_FUNCTION_SUBSTITUTIONS
              if device is None or device.split(":")[0] in sub.eager_devices]
    originals: dict[int, tuple[OpFunctionSubstitution, Any]] = {}
    for sub in wanted:
        try:
            original = _resolve(sub.mmcv_function)
        except (ImportError, AttributeError):
            continue  # mmcv without this op: nothing can call it
        originals[id(original)] = (sub, original)
    used: dict[str, OpFunctionSubstitution] = calls if calls is not None else {}
    to_library = {key: (original, _recording(sub, used)) for key, (sub, original) in originals.items()}
    loaded_before = set(sys.modules)
    rebound = _rebind_globals(((name, module) for name, module in list(sys.modules.items())
                               if module is not None and not name.startswith(("autoexport", "torch"))), to_library)
    where: dict[str, list[str]] = {}
    for _, _, value, module_name in rebound:
        where.setdefault(originals[id(value)][0].mmcv_function, []).append(module_name)

    def applied(subs: Iterable[OpFunctionSubstitution]) -> list[AppliedPatch]:
        return [AppliedPatch(f"autoexport.ops.{sub.library_module}.{sub.library_function}", "",
                             sub.reason or _POINT_OP_REASON.format(name=sub.mmcv_function),
                             tuple(where[sub.mmcv_function]), sub.mmcv_function) for sub in subs]

    result = applied(sub for sub, _ in originals.values() if sub.mmcv_function in where) if report == "bound" else []
    try:
        yield result
    finally:
        for module, name, value, _ in reversed(rebound):
            setattr(module, name, value)
        # A module first imported inside the block (mmengine's registry imports mmdet3d.models lazily, at the first
        # build) bound the substitutes from the rebound mmcv.ops; give it mmcv's functions back too.
        to_mmcv = {id(replacement): (replacement, original) for original, replacement in to_library.values()}
        _rebind_globals(((name, sys.modules[name]) for name in set(sys.modules) - loaded_before
                         if sys.modules.get(name) is not None), to_mmcv)
    if report == "called":
        result.extend(applied(used.values()))
