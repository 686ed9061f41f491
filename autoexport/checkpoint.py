"""Loading a checkpoint without running code from it.

A `.pth` file is a pickle, and a pickle can call any function while it loads. Checkpoints are therefore read with
`torch.load(weights_only=True)`, whose unpickler builds tensors and plain containers only, plus an allow-list of the
few globals that mmengine's and mmdet3d's checkpoints really carry in their `meta` and `message_hub` (mmengine's
HistoryBuffer, numpy arrays, scalars and dtypes, ConfigDict). Anything else is refused with the global's name; the
user may opt in to a full unpickle of a file they trust with `--trust-checkpoint`.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserInputError

log = logging.getLogger("autoexport")

TRUST_FLAG = "--trust-checkpoint"


def _numpy_globals() -> list[Any]:
    """numpy's reconstructors under the names numpy 1.x and 2.x pickle them with, and its dtype classes."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    multiarray = core.multiarray
    found: list[Any] = [np.ndarray, np.dtype]
    for name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(multiarray._reconstruct, f"{name}._reconstruct"), (multiarray.scalar, f"{name}.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles a dtype with its class, e.g. Float64DType
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return found


def _mmengine_classes() -> list[type]:
    """mmengine classes a runner's checkpoint holds: the message hub's HistoryBuffers and config dicts."""
    classes: list[type] = []
    try:
        from mmengine.logging.history_buffer import HistoryBuffer

        classes.append(HistoryBuffer)
    except ImportError:
        pass
    try:
        from mmengine.config.config import Config, ConfigDict

        classes += [Config, ConfigDict]  # their state is plain data: dicts, the file name and the config text
    except ImportError:
        pass
    return classes


def _class_method_getter(classes: list[type]) -> Any:
    """`getattr` as protocol-2 pickles use it to name a method (HistoryBuffer's statistics methods are stored as
    getattr(HistoryBuffer, 'min')): only a plain function defined on one of the allowed classes, nothing else."""
    allowed = tuple(classes)

    def getattr_of_allowed_class(obj: Any, name: str) -> Any:
        if not (isinstance(obj, type) and obj in allowed and isinstance(name, str) and not name.startswith("_")
                and callable(obj.__dict__.get(name))):
            raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not one of the allowed method lookups")
        return getattr(obj, name)

    return getattr_of_allowed_class


def checkpoint_safe_globals() -> list[Any]:
    """What `torch.load(weights_only=True)` may build besides tensors and containers (torch's safe_globals)."""
    classes = _mmengine_classes()
    getter = _class_method_getter(classes)
    return [*_numpy_globals(), *classes, (getter, "builtins.getattr"), (getter, "__builtin__.getattr")]


def _unsafe_global(path: Path, error: Exception) -> str | None:
    """The global the weights-only unpickler refused, by name, or None when the failure is something else."""
    text = str(error)
    allowed = set()
    for entry in checkpoint_safe_globals():
        allowed.add(entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: take the name from the message
        names = []
    refused = [n for n in names if n not in allowed]
    if refused:
        return ", ".join(refused)
    marker = "Unsupported global: GLOBAL "
    if marker in text:
        return text.split(marker, 1)[1].split()[0]
    if "unrecognized function" in text:
        return "a call the weights-only loader does not make (" + text.split("unrecognized function", 1)[1].split(".")[0].strip() + ")"
    return None


def read_checkpoint(path: str | Path, trust: bool = False) -> Any:
    """The unpickled checkpoint. Without `trust`, only tensors, containers and the allow-listed globals load; a
    checkpoint that needs anything else is refused (UserInputError naming the global), before it runs."""
    ckpt_path = Path(path).expanduser()
    if not ckpt_path.is_file():
        raise UserInputError(f"checkpoint not found: {ckpt_path}; pass the path of a .pth file")
    if trust:
        log.warning("  %s: loading %s with a full unpickle, which can run code stored in it", TRUST_FLAG, ckpt_path)
        try:
            return torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - corrupt files raise many types
            raise _unreadable(ckpt_path, err) from None
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt files and refused globals raise many types
        refused = _unsafe_global(ckpt_path, err) if isinstance(err, pickle.UnpicklingError) else None
        if refused:
            raise UserInputError(
                f"checkpoint {ckpt_path} holds {refused}, which autoexport does not unpickle by default because "
                f"loading it could run code; if you trust this file, pass {TRUST_FLAG}") from None
        raise _unreadable(ckpt_path, err) from None


def _unreadable(path: Path, err: Exception) -> UserInputError:
    what = "a truncated or corrupt file" if isinstance(err, (EOFError, zipfile.BadZipFile, RuntimeError)) else "unreadable"
    reason = " ".join(str(err).split())[:200]
    return UserInputError(f"checkpoint {path} is not a readable PyTorch checkpoint ({what}: {type(err).__name__}: "
                          f"{reason}); pass a .pth file written by torch.save or mmengine")


def state_dict_of(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict of tensors, `module.` prefixes (DataParallel) stripped."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"checkpoint {path} holds no state_dict of tensors; pass a checkpoint saved from the "
                             "model (torch.save(model.state_dict()) or mmengine's runner)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def fit_problems(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Why `state` cannot be loaded into a model whose state dict is `expected`: missing, unexpected and mis-shaped
    keys, and tensors whose kind differs (a float checkpoint tensor for an integer buffer or the other way round;
    float16 or float64 weights for float32 parameters are fine, they are cast)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = sorted(set(state) & set(expected))
    mismatched = [k for k in common if state[k].shape != expected[k].shape]
    kinds = [k for k in common if state[k].is_floating_point() != expected[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {k}: checkpoint {tuple(state[k].shape)}, "
                        f"model {tuple(expected[k].shape)})")
    if kinds:
        k = kinds[0]
        problems.append(f"{len(kinds)} dtype mismatches (e.g. {k}: checkpoint {state[k].dtype}, model "
                        f"{expected[k].dtype})")
    return problems


def load_checkpoint_strict(model: torch.nn.Module, path: str, trust: bool = False) -> None:
    """Load weights, refusing a checkpoint that does not fit: the user must not get a half-random model."""
    ckpt_path = Path(path).expanduser()
    checkpoint = read_checkpoint(ckpt_path, trust)
    state = state_dict_of(checkpoint, ckpt_path)
    expected = model.state_dict()
    problems = fit_problems(state, expected)
    if problems:
        raise UserInputError(f"checkpoint {ckpt_path} does not fit {type(model).__name__} ({len(expected)} tensors "
                             f"expected): {'; '.join(problems)}. Is it the checkpoint for this config?")
    cast = sorted({f"{state[k].dtype} -> {expected[k].dtype}" for k in state if state[k].dtype != expected[k].dtype})
    if cast:
        log.info("  checkpoint tensors cast to the model's dtypes: %s", ", ".join(cast))
    model.load_state_dict(state, strict=True)
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, dict) else {}
    if isinstance(meta, dict) and "dataset_meta" in meta:
        model.dataset_meta = meta["dataset_meta"]
