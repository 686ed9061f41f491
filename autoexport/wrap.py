"""Stage 2, wrap: generate `wrapper.py`, a readable module with a flat tensor signature that rebuilds
the nested inputs, calls the model's tensor path and returns its outputs as a flat tuple.

The exporter imports the generated file and exports that, never an in-memory twin, so what a
user reads is exactly what was exported.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from . import __version__
from .manifest import Manifest, parse_metainfo_path

# Metainfo keys that only describe where data came from on the host; the model never reads them.
_HOST_ONLY_METAINFO = {"lidar_path", "img_path", "filename", "sample_idx", "num_pts_feats", "lidar_sweeps"}


def inert_text(text: object) -> str:
    """Text from the user's files (config names, paths, dict keys) made safe to place inside a docstring or a
    comment of generated code: newlines, backslashes, quotes and non-ASCII characters are escaped, so it can
    neither end the docstring nor start a statement."""
    return str(text).encode("unicode_escape").decode("ascii").replace('"', '\\"')


def _importable(klass: type) -> bool:
    """Whether `from module import Name` for this class is plain dotted identifiers (always, for real classes)."""
    module, name = getattr(klass, "__module__", ""), getattr(klass, "__name__", "")
    return bool(name.isidentifier() and all(part.isidentifier() for part in str(module).split(".")))


class _Renderer:
    """Python source for plain values, numpy arrays, classes and enums; collects the imports they need."""

    def __init__(self) -> None:
        self.imports: set[str] = set()
        self.dropped: list[str] = []

    def render(self, value: Any, indent: int) -> str | None:
        pad = " " * indent
        if isinstance(value, enum.Enum):  # before int: IntEnum members are ints too
            if not (_importable(type(value)) and value.name.isidentifier()):
                return None
            self._import(type(value))
            return f"{type(value).__name__}.{value.name}"
        if value is None or isinstance(value, (bool, int, str)):
            return repr(value)
        if isinstance(value, float):
            return repr(value) if np.isfinite(value) else f"float('{value}')"
        if isinstance(value, type):
            if not _importable(value):
                return None
            self._import(value)
            return value.__name__
        if isinstance(value, np.generic):
            return self.render(value.item(), indent)
        if isinstance(value, np.ndarray):
            self.imports.add("import numpy as np")
            return f"np.array({value.tolist()!r}, dtype=np.{value.dtype.name})"
        if isinstance(value, torch.Tensor):
            return f"torch.tensor({value.tolist()!r}, dtype=torch.{str(value.dtype).replace('torch.', '')})"
        if isinstance(value, (list, tuple)):
            items = [self.render(v, indent + 4) for v in value]
            if any(i is None for i in items):
                return None
            body = "".join(f"{pad}    {i},\n" for i in items)
            open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
            return f"{open_}\n{body}{pad}{close}" if items else f"{open_}{close}"
        if isinstance(value, dict):
            lines = []
            for key, item in value.items():
                rendered = self.render(item, indent + 4)
                if rendered is None:
                    self.dropped.append(f"{inert_text(key)} ({inert_text(type(item).__name__)})")
                    continue
                lines.append(f"{pad}    {key!r}: {rendered},\n")
            return "{\n" + "".join(lines) + pad + "}"
        return None

    def _import(self, klass: type) -> None:
        module = klass.__module__
        self.imports.add(f"from {module} import {klass.__name__}")


def _render_structure(node: Any, indent: int) -> str:
    pad = " " * indent
    if isinstance(node, dict) and set(node) == {"tensor"}:
        return node["tensor"]
    if isinstance(node, dict):
        body = "".join(f"{pad}    {k!r}: {_render_structure(v, indent + 4)},\n" for k, v in node.items())
        return "{\n" + body + pad + "}"
    if isinstance(node, list):
        body = "".join(f"{pad}    {_render_structure(v, indent + 4)},\n" for v in node)
        return "[\n" + body + pad + "]"
    raise TypeError(f"unexpected structure node {node!r}")


def _shape_text(shape: list[int], dynamic: dict[int, str]) -> str:
    return "[" + ", ".join(dynamic.get(i, str(s)) for i, s in enumerate(shape)) + "]"


def _constant_metainfo(metainfo: list[dict], meta_inputs: list[tuple]) -> list[dict]:
    """Each batch item's metainfo without host-only keys and without the matrices that are graph inputs."""
    return [{k: v for k, v in meta.items()
             if k not in _HOST_ONLY_METAINFO and not any(i == index and k == key for _, i, key in meta_inputs)}
            for index, meta in enumerate(metainfo)]


def generate_wrapper_source(manifest: Manifest, metainfo: list[dict], forward_name: str, model_type: str,
                            config_name: str, forward_options: dict | None = None) -> str:
    renderer = _Renderer()
    # Metainfo matrices that are inputs (path 'metainfo.<i>.<key>') are set from the arguments on every call.
    meta_inputs = [(t, *meta) for t in manifest.inputs if (meta := parse_metainfo_path(t.path))]
    rendered_meta = renderer.render(_constant_metainfo(metainfo, meta_inputs), 0)
    width = max(len(t.name) for t in manifest.inputs)
    out_width = max(len(o.name) for o in manifest.outputs)
    doc_inputs = "\n".join(
        f"    {t.name:<{width}}  {t.dtype:<7} {_shape_text(t.shape, t.dynamic_dims)}  {inert_text(t.description)}"
        for t in manifest.inputs)
    doc_outputs = "\n".join(f"    {o.name:<{out_width}}  {o.dtype:<7} {_shape_text(o.shape, o.dynamic_dims)}"
                            for o in manifest.outputs)
    imports = sorted(renderer.imports | {"from mmdet3d.structures import Det3DDataSample"},
                     key=lambda line: (line.startswith("from "), line))
    signature = ", ".join(f"{t.name}: Tensor" for t in manifest.inputs)
    copies = "".join(
        f"        # The model writes into {inert_text(t.path)} in place; copy it so every call sees the caller's values.\n"
        f"        {t.name} = {t.name}.clone()\n" for t in manifest.inputs if t.mutated_by_model)
    meta_sets = "".join(
        f"        self.data_samples[{index}].set_field({t.name}, {key!r}, field_type='metainfo')\n"
        for t, index, key in meta_inputs)
    if meta_sets:
        meta_sets = ("        # Camera/lidar matrices the model computes with: inputs, not constants (set_field: no deep copy).\n"
                     + meta_sets)
    returns = "".join(
        f"            outputs{''.join(f'[{p!r}]' for p in o.index_path)},  # {o.name}\n" for o in manifest.outputs)
    dropped = ""
    if renderer.dropped:
        dropped = "# Metainfo left out (not representable as constants): " + ", ".join(renderer.dropped) + "\n"
    unused = ""
    if manifest.unused_inputs:
        unused = ("\nInputs the model never reads, left out of the signature: "
                  + ", ".join(inert_text(u) for u in manifest.unused_inputs) + "\n")
    return f'''"""Export wrapper for {inert_text(model_type)} ({inert_text(config_name)}), generated by autoexport {__version__}.

mmdet3d models take nested inputs (dicts of voxel tensors, lists of point clouds) plus
Det3DDataSample metainfo; torch.export and ONNX need a flat tensor signature. This module
rebuilds the nested inputs from flat tensors, runs the model's tensor path (raw head outputs,
no box decoding) and returns the outputs as a flat tuple. Regenerate it rather than editing it.

Inputs (dynamic dims by name):
{doc_inputs}
Outputs:
{doc_outputs}
{unused}"""

from __future__ import annotations

import torch
from torch import Tensor

{chr(10).join(imports)}

from autoexport.runtime import tensor_forward

INPUT_NAMES = {tuple(manifest.input_names)!r}
OUTPUT_NAMES = {tuple(manifest.output_names)!r}
FORWARD_OPTIONS = {renderer.render(forward_options or {}, 0)}  # the export's scope and its constants

# Metainfo of each batch item as the test pipeline produced it; constant in the exported graph.
{dropped}METAINFO = {rendered_meta}


class Wrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # Built once here: Det3DDataSample deep-copies its metainfo, which must not happen while tracing.
        self.data_samples = [Det3DDataSample(metainfo=dict(meta)) for meta in METAINFO]

    def forward(self, {signature}) -> tuple[Tensor, ...]:
{copies}{meta_sets}        inputs = {_render_structure(manifest.structure["inputs"] if "inputs" in manifest.structure else manifest.structure, 8)}
        outputs = tensor_forward(self.model, inputs, self.data_samples, **FORWARD_OPTIONS)  # {forward_name}, for {inert_text(model_type)}
        return (
{returns}        )
'''


def write_wrapper(path: Path, source: str) -> None:
    compile(source, str(path), "exec")  # a codegen bug must fail here, not at import in the user's hands
    path.write_text(source)


def import_wrapper(path: Path) -> ModuleType:
    """Import a generated wrapper.py from its file."""
    module_name = f"autoexport_wrapper_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def build_wrapper(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    return import_wrapper(path).Wrapper(model).eval()


__all__ = ["generate_wrapper_source", "write_wrapper", "import_wrapper", "build_wrapper"]
