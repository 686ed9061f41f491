"""Resolve `--config`: a path to a config file, or the name of a config shipped with mmdet3d."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import traceback
import types
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserInputError
from .knowledge import KNOWLEDGE


def bundled_config_root() -> Path:
    """The `.mim/configs` folder inside the installed mmdet3d wheel."""
    import mmdet3d

    return Path(mmdet3d.__file__).parent / ".mim" / "configs"


@lru_cache(maxsize=1)
def bundled_configs() -> dict[str, Path]:
    """Config name (file stem) -> path, for every non-base config shipped with mmdet3d."""
    root = bundled_config_root()
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        if "_base_" in path.parts or path.name.startswith("__"):
            continue
        found.setdefault(path.stem, path)
    return found


def resolve_config(spec: str) -> Path:
    """Return the config file for `spec`, or raise UserInputError naming close matches."""
    as_path = Path(spec).expanduser()
    if as_path.is_file():
        return as_path.resolve()
    looks_like_path = as_path.suffix == ".py" or "/" in spec
    name = as_path.stem if as_path.suffix == ".py" else as_path.name
    known = bundled_configs()
    if name in known and not (looks_like_path and "/" in spec):
        return known[name]
    close = difflib.get_close_matches(name, known.keys(), n=5, cutoff=0.5)
    if not close:  # substring matches help with short names like "centerpoint"
        close = [k for k in known if name.lower() in k.lower()][:5]
    hint = ("\n  did you mean:\n    " + "\n    ".join(close)) if close else ""
    where = f"no file '{spec}'" if looks_like_path else f"'{spec}' is neither a file nor a config shipped with mmdet3d"
    raise UserInputError(
        f"unknown config: {where} ({len(known)} bundled configs under {bundled_config_root()}).{hint}"
    )


def load_config(config_path: Path) -> Any:
    """The mmengine Config of a config file, with its custom_imports imported; errors as UserInputError."""
    from mmengine.config import Config

    # `custom_imports` name modules relative to where the user keeps the project (e.g. projects.BEVFusion.bevfusion
    # from mmdet3d's root): the config's folder and the working directory are importable, as with mmdet3d's tools.
    for folder in (str(Path(config_path).resolve().parent), str(Path.cwd())):
        if Path(config_path).is_file() and folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        with bundled_base_fallback():
            cfg = Config.fromfile(str(config_path), import_custom_modules=False)
    except Exception as err:  # noqa: BLE001 - mmengine raises many types for syntax, missing bases, bad imports
        raise UserInputError(f"config {config_path} could not be loaded: {type(err).__name__}: "
                             f"{_one_line(str(err))}; fix the config file") from None
    import_custom_modules(cfg.get("custom_imports"), config_path)
    return cfg


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def import_custom_modules(custom_imports: Any, config_path: Path) -> None:
    """Import the config's custom_imports; a module that cannot be imported is named with why: a compiled
    extension that is not built, a library that is not installed, or a module not found on the path."""
    if not custom_imports:
        return
    imports = custom_imports.get("imports", []) if isinstance(custom_imports, dict) else custom_imports
    allow_failed = bool(custom_imports.get("allow_failed_imports", False)) if isinstance(custom_imports, dict) else False
    KNOWLEDGE.load()  # autoexport.models registers the compiled-extension substitutes
    for name in [imports] if isinstance(imports, str) else list(imports):
        alias_project_package(name, config_path)
        try:
            with extension_substitutes():
                importlib.import_module(name)
        except ImportError as err:
            if allow_failed:
                continue
            raise UserInputError(describe_import_failure(name, err, config_path)) from None


def _importing_frame(err: ImportError) -> traceback.FrameSummary | None:
    """The innermost frame of the user's code (not importlib's) on the failed import's traceback."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "importlib" not in f.filename
              and not f.filename.startswith("<")]
    return frames[-1] if frames else None


def compiled_extension_sources(missing: str, importer: Path | None) -> list[Path]:
    """C++/CUDA sources that build the extension `missing` (a module name's last part), found beside the module
    that imports it or named in a setup.py above it: evidence that it is a compiled extension."""
    if importer is None:
        return []
    short = missing.rsplit(".", 1)[-1]
    found = [p for p in importer.parent.rglob("*") if p.suffix in (".cpp", ".cu", ".cc") and p.is_file()][:3]
    for folder in list(importer.parents)[:6]:
        setup = folder / "setup.py"
        if setup.is_file() and short in setup.read_text(errors="replace"):
            found.append(setup)
            break
    return found


def describe_import_failure(module: str, err: ImportError, config_path: Path) -> str:
    """One line: which custom_imports module failed, on which import, and what to do."""
    missing = err.name or _one_line(str(err), 80)
    imported = re.match(r"cannot import name '([^']+)' from '([^']+)'", str(err))
    if imported:  # `from . import ext`: the package is there, the extension module in it is not
        missing = f"{imported.group(2)}.{imported.group(1)}"
    frame = _importing_frame(err)
    importer = Path(frame.filename) if frame else None
    where = f" ({frame.filename}:{frame.lineno}: {(frame.line or '').strip()})" if frame else ""
    head = f"config {config_path.name}: custom_imports module {module} could not be imported"
    if missing == module or (err.name and module.startswith(err.name + ".")) or (err.name and module == err.name):
        return (f"{head}: no module {missing} on the path; run autoexport from the folder that holds it (the "
                "config's folder and the working directory are searched) or add that folder to PYTHONPATH")
    sources = compiled_extension_sources(missing, importer)
    if sources or missing.rsplit(".", 1)[-1].endswith(("_ext", "_cuda", "_layer")):
        built_from = f", built from {', '.join(str(p) for p in sources)}" if sources else ""
        return (f"{head}: it imports the compiled extension {missing}{where}, which is not built here{built_from}; "
                "autoexport's op library has no substitute for it. What to do: build the project's extensions "
                "(e.g. `python setup.py develop` in the project), or export on a machine where they are built")
    return (f"{head}: it imports {missing}{where}, which is not installed here ({type(err).__name__}: "
            f"{_one_line(str(err), 160)}); install it")


# ---- configs of projects kept outside an mmdet3d checkout -------------------------------------------------

@contextlib.contextmanager
def bundled_base_fallback() -> Iterator[None]:
    """While a config loads, a `_base_` file that is not beside it (`../../../configs/_base_/x.py` from a project
    kept outside mmdet3d's repository) is taken from the same place under the wheel's `.mim/configs` tree."""
    from mmengine.config import Config

    original = Config.__dict__["_get_cfg_path"]

    def get_cfg_path(cfg_path: str, filename: str) -> tuple[str, Any]:
        path, scope = original.__func__(cfg_path, filename)
        if scope is None and not Path(path).exists():
            bundled = _bundled_equivalent(Path(path))
            if bundled is not None:
                return str(bundled), None
        return path, scope

    Config._get_cfg_path = staticmethod(get_cfg_path)
    try:
        yield
    finally:
        Config._get_cfg_path = original


def _bundled_equivalent(path: Path) -> Path | None:
    """.mim/configs/<rest> for a missing path .../configs/<rest>, if the wheel ships it."""
    parts = Path(str(path).replace("\\", "/")).parts
    if "configs" not in parts:
        return None
    rest = parts[len(parts) - 1 - parts[::-1].index("configs") + 1:]
    candidate = bundled_config_root().joinpath(*rest) if rest else None
    return candidate if candidate is not None and candidate.is_file() else None


def alias_project_package(module: str, config_path: Path) -> None:
    """`custom_imports` name a project as mmdet3d's repository lays it out (projects.BEVFusion.bevfusion). Where the
    top package is not importable but a folder above the config is the project (named like the second part), the
    top package becomes a namespace package over that folder's parent, so the project's own name imports."""
    parts = module.split(".")
    if len(parts) < 3 or parts[0] in sys.modules or importlib.util.find_spec(parts[0]) is not None:
        return
    project = next((folder for folder in Path(config_path).resolve().parents
                    if folder.name == parts[1] and (folder / parts[2]).exists()), None)
    if project is None:
        return
    package = types.ModuleType(parts[0])
    package.__path__ = [str(project.parent)]  # a namespace package: only the project's folder is reached through it
    package.__spec__ = importlib.machinery.ModuleSpec(parts[0], None, is_package=True)
    package.__spec__.submodule_search_locations = package.__path__
    sys.modules[parts[0]] = package


# ---- substitutes for compiled extensions that are not built -------------------------------------------------

@dataclass(frozen=True)
class ExtensionSubstitute:
    """A module standing in for a project's compiled extension while the project imports, when it is not built."""

    suffix: str  # the extension's dotted name ends with this, e.g. "bevfusion.ops.bev_pool.bev_pool_ext"
    make: Callable[[str], types.ModuleType]  # full module name -> the substitute module
    note: str  # what stands in for it (export log)


COMPILED_EXTENSION_SUBSTITUTES: list[ExtensionSubstitute] = []
# Substitutes that stood in during this process's config loads, full name -> note.
SUBSTITUTED_EXTENSIONS: dict[str, str] = {}


class _SubstituteLoader(importlib.abc.Loader):
    def __init__(self, substitute: ExtensionSubstitute) -> None:
        self.substitute = substitute

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.substitute.make(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        SUBSTITUTED_EXTENSIONS[module.__name__] = self.substitute.note


class _SubstituteFinder(importlib.abc.MetaPathFinder):
    """Finds a substitute only for a registered extension that the normal path finder cannot find."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        substitute = next((s for s in COMPILED_EXTENSION_SUBSTITUTES
                           if fullname == s.suffix or fullname.endswith("." + s.suffix)), None)
        if substitute is None or importlib.machinery.PathFinder.find_spec(fullname, path) is not None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _SubstituteLoader(substitute))


@contextlib.contextmanager
def extension_substitutes() -> Iterator[None]:
    """The substitute finder on sys.meta_path while a custom_imports module imports, removed afterwards (the
    modules that imported a substitute keep it)."""
    finder = _SubstituteFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
