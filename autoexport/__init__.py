"""autoexport: torch.export-first exporter for MMDetection3D models."""

__version__ = "0.1.0"
