"""autoexport: torch.export-first exporter for MMDetection3D models."""

__version__ = "0.1.0"

__all__ = ["load"]


def __getattr__(name: str):
    # Lazy, so that `import autoexport` stays light (no torch, no mmdet3d) for the CLI and for deployment code.
    if name == "load":
        from .deploy import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
