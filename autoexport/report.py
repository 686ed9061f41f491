"""Stage 5, report: metadata.json (what was exported and how) and parity.json (how well it matches)."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__

_LIBRARIES = ("torch", "mmcv", "mmdet", "mmdet3d", "mmengine", "onnx", "onnxscript", "onnxruntime", "numpy")


def library_versions() -> dict[str, str]:
    found = {"autoexport": __version__, "python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def export_info(manifest: Any) -> dict:
    return {
        "total_inputs": len(manifest.inputs),
        "input_structure": manifest.structure,
        "tensor_details": [
            {"name": t.name, "path": t.path, "shape": t.shape, "dtype": t.dtype,
             "dynamic_dims": {str(i): {"name": n, "min": manifest.dims[n].min, "max": manifest.dims[n].max,
                                       "observed": manifest.dims[n].observed} for i, n in t.dynamic_dims.items()},
             "description": t.description, "mutated_by_model": t.mutated_by_model}
            for t in manifest.inputs
        ],
        "unused_inputs": manifest.unused_inputs,
        "batch_size": manifest.batch_size,
    }


def outputs_info(manifest: Any) -> list[dict]:
    return [{"name": o.name, "shape": o.shape, "dtype": o.dtype, "index_path": o.index_path,
             "dynamic_dims": {str(i): n for i, n in o.dynamic_dims.items()}} for o in manifest.outputs]


def manifest_dump(manifest: Any) -> dict:
    return manifest.to_json()


__all__ = ["library_versions", "write_json", "save_npz", "load_npz", "export_info", "outputs_info", "asdict"]
