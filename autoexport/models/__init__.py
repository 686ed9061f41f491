"""What autoexport knows about each mmdet3d class, one module per detector or component.

Importing this package imports every module listed in `MODULES`; each registers its classes into
`autoexport.knowledge.KNOWLEDGE`. To support a new class, add a module here (docs/contributing/add-a-model.md).
"""

from __future__ import annotations

import importlib

MODULES: tuple[str, ...] = ("bevfusion",)

for _name in MODULES:
    importlib.import_module(f"{__name__}.{_name}")
