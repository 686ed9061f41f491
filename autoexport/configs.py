"""Resolve `--config`: a path to a config file, or the name of a config shipped with mmdet3d."""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

from .errors import UserInputError


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
