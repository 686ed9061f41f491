"""What a generated wrapper.py imports from autoexport: the tensor path of the model it wraps.

Kept small and stable on purpose: wrappers written by one version of autoexport should import with the next. The
path is looked up by the model's class when called (autoexport.models registers one per detector class).
"""

from __future__ import annotations

from typing import Any

from .boundaries import boundary_for


def tensor_forward(model: Any, inputs: dict, data_samples: list, scope: str = "network", **options: Any) -> Any:
    """The model's tensor path: preprocessed inputs in, raw head outputs out; with scope="detections", the raw
    point cloud in and the decoded boxes out (options: that scope's constants, e.g. point_range)."""
    if scope == "detections":
        from .detections import points_to_detections

        return points_to_detections(model, inputs, data_samples, **options)
    return boundary_for(model)[1](model, inputs, data_samples)


__all__ = ["tensor_forward"]
