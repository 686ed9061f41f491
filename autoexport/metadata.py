"""metadata.json as a typed record: what one export made, from what, and how it was checked.

Every key is documented in docs/reference/output-directory.md. Readers (`autoexport verify`, `autoexport zoo`) check
`schema_version`; raise it when a key changes meaning or disappears, not when one is added.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ExportMetadata:
    status: str  # "ok" | "parity_failed"
    model_config: str
    config_name: str
    checkpoint: str | None
    weights: str
    init_weights_failed: list[str]
    model_type: str
    device: str
    formats: list[str]
    artifacts: dict[str, str | None]
    export_info: dict
    outputs: list[dict]
    samples: list[dict]
    export_patches: list[dict]
    preprocess: dict
    postprocess: dict
    tensor_boundary: str
    backends: list[dict]
    export_variants: dict[str, dict]
    parity: dict
    timings_s: dict[str, float]
    versions: dict[str, str]
    torch_threads: int
    manifest: dict
    precision: str
    substitutions: list[dict]
    # Present only where they apply: a split export, a reduced-precision export.
    split: dict | None = None
    reduced_precision: dict | None = None
    fidelity: dict | None = None
    # --scope detections: the scope and the outputs compared as unordered row sets (verify.Comparator.row_sets).
    detections: dict | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """Keys in the documented order, schema_version first; the optional ones only where they apply."""
        data: dict[str, Any] = {"schema_version": self.schema_version}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name != "schema_version" and not (value is None and field.default is None):
                data[field.name] = value
        return data


__all__ = ["ExportMetadata", "SCHEMA_VERSION"]
