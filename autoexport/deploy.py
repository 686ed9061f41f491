"""Run a `--scope detections` export on a point cloud: points in, boxes out, without mmdet3d.

    import autoexport
    model = autoexport.load("out/pp_det")                 # the export's --output-dir
    dets = model.predict("000008.bin", backend="onnxruntime")
    for box, score, name in zip(dets.boxes, dets.scores, dets.names): ...

Loading and predicting need numpy and the chosen runtime only: torch for model.pt2 (and AOTInductor), ONNX Runtime
for model.onnx, the IREE runtime for a .vmfb. Never mmdet3d, mmcv or mmengine: the graph itself filters the points to
the point cloud range, voxelizes, runs the network, decodes the boxes and applies NMS. The one host step is reading a
point cloud file the way the config's LoadPointsFromFile does (float32 rows of load_dim values, use_dim kept).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np

from .errors import UserInputError

if TYPE_CHECKING:
    from .backends.runner import Runner

DETECTION_OUTPUTS = ("boxes_3d", "scores_3d", "labels_3d", "num_detections")
BOX_FIELDS = ("x", "y", "z", "x_size", "y_size", "z_size", "yaw")
BOX_CONVENTION = "mmdet3d LiDAR frame: (x, y, z) is the bottom center, yaw is the rotation about +z"
POINT_FILES = (".bin", ".npy")
# The names `backend=` takes; a lowered kind may carry a target (iree:cuda, aoti:cuda).
BACKEND_NAMES = ("pt2", "onnxruntime", "iree", "aoti")

PointsLike = Union[np.ndarray, str, os.PathLike]


@dataclass
class Detections:
    """The M = num_detections rows of one prediction, best score first."""

    boxes: np.ndarray  # (M, 7) float32: x, y, z (bottom center), x_size, y_size, z_size, yaw
    scores: np.ndarray  # (M,) float32
    labels: np.ndarray  # (M,) int64, indices into class_names
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.scores)

    def class_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class_{label}"

    @property
    def names(self) -> list[str]:
        """The class name of each detection."""
        return [self.class_name(int(label)) for label in self.labels]

    def to_json(self) -> dict:
        return {
            "num_detections": len(self),
            "box_fields": list(BOX_FIELDS),
            "box_convention": BOX_CONVENTION,
            "class_names": list(self.class_names),
            "detections": [{"class": self.class_name(int(label)), "label": int(label), "score": float(score),
                            "box": [float(v) for v in box]}
                           for box, score, label in zip(self.boxes, self.scores, self.labels)],
        }

    @classmethod
    def from_json(cls, data: dict) -> "Detections":
        """Detections from to_json()'s dictionary (extra keys are ignored)."""
        rows = data.get("detections")
        if not isinstance(rows, list):
            raise ValueError("no 'detections' list")
        boxes = np.array([row["box"] for row in rows], np.float32).reshape(-1, len(BOX_FIELDS))
        return cls(boxes, np.array([row["score"] for row in rows], np.float32),
                   np.array([row["label"] for row in rows], np.int64), tuple(data.get("class_names", ())))

    @classmethod
    def empty(cls, class_names: Sequence[str] = ()) -> "Detections":
        return cls(np.zeros((0, len(BOX_FIELDS)), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                   tuple(class_names))


def load(directory: str | Path) -> "DetectionModel":
    """The detection model of an export directory made with `autoexport --scope detections`."""
    return DetectionModel(Path(directory))


def _read_metadata(directory: Path) -> dict:
    if not directory.is_dir():
        raise UserInputError(f"{directory} is not a directory; pass the --output-dir of an "
                             "`autoexport --scope detections` export")
    path = directory / "metadata.json"
    if not path.is_file():
        raise UserInputError(f"{directory} is not an autoexport export directory (no metadata.json); pass the "
                             "--output-dir of an `autoexport --scope detections` export")
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserInputError(f"{path} is not readable JSON ({' '.join(str(err).split())[:160]}); export again "
                             "into a fresh directory") from None
    if not isinstance(metadata, dict) or "manifest" not in metadata:
        raise UserInputError(f"{path} is not an autoexport metadata file (no manifest); export again into a fresh "
                             "directory")
    return metadata


class DetectionModel:
    """An export of the detections scope, with one runner per backend made on first use and kept.

    `predict(points, backend)` takes float32 rows of the columns the model uses (or the loader's load_dim columns,
    of which the use_dim ones are kept) or a .bin/.npy file, and returns Detections."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.metadata = _read_metadata(directory)
        outputs = [o.get("name") for o in self.metadata["manifest"].get("outputs", [])]
        missing = [name for name in DETECTION_OUTPUTS if name not in outputs]
        if missing:
            shown = ", ".join(outputs[:4]) + (", ..." if len(outputs) > 4 else "")
            raise UserInputError(f"{directory} is not a --scope detections export (its outputs are {shown}; "
                                 f"{', '.join(DETECTION_OUTPUTS)} are missing); export the model again with "
                                 "`autoexport --config CONFIG --scope detections --output-dir DIR`")
        inputs = self.metadata["manifest"].get("inputs", [])
        if len(inputs) != 1 or len(inputs[0].get("shape", [])) != 2:
            raise UserInputError(f"{directory} takes {len(inputs)} inputs "
                                 f"({', '.join(i.get('name', '?') for i in inputs)}); predict runs exports whose one "
                                 "input is the point cloud (N, C)")
        self.input_name: str = inputs[0]["name"]
        self.num_columns: int = int(inputs[0]["shape"][1])
        self.output_names: list[str] = outputs
        self.class_names: tuple[str, ...] = tuple(self.metadata.get("postprocess", {}).get("classes") or ())
        cloud = self.metadata.get("preprocess", {}).get("point_cloud", {})
        self.load_dim: int = int(cloud.get("load_dim", self.num_columns))
        use_dim = cloud.get("use_dim", self.num_columns)
        self.use_dim: list[int] = list(range(use_dim)) if isinstance(use_dim, int) else [int(d) for d in use_dim]
        pc_range = cloud.get("point_cloud_range")
        self.point_cloud_range: list[float] | None = [float(v) for v in pc_range] if pc_range else None
        self._runners: dict[str, Runner] = {}

    def __repr__(self) -> str:
        return (f"DetectionModel({str(self.directory)!r}, classes={list(self.class_names)}, "
                f"backends={self.backends})")

    # Backends ----------------------------------------------------------------------------------------------------

    def _lowered(self) -> list[dict]:
        return [a for a in self.metadata.get("backends", []) if isinstance(a, dict) and a.get("path")]

    @property
    def backends(self) -> list[str]:
        """The backends whose artifact is in the directory: pt2, onnxruntime and lowered ones (iree-llvm-cpu, ...)."""
        found = [name for name, file in (("pt2", "model.pt2"), ("onnxruntime", "model.onnx"))
                 if (self.directory / file).is_file()]
        return found + [a["backend"] for a in self._lowered() if (self.directory / a["path"]).is_file()]

    def _artifact(self, backend: str) -> dict:
        """The lowered artifact a name such as iree, iree:cuda, iree-llvm-cpu or aoti selects."""
        kind, _, target = backend.replace("-", ":", 1).partition(":")
        candidates = [a for a in self._lowered() if a["backend"].split("-", 1)[0] == kind
                      and (not target or a["backend"] == f"{kind}-{target}")]
        if not candidates:
            raise UserInputError(f"{self.directory} has no {backend} artifact (it has {', '.join(self.backends)}); "
                                 f"export with --backend {backend} to add one, or pick one of those")
        present = [a for a in candidates if (self.directory / a["path"]).is_file()]
        if not present:
            raise UserInputError(f"{self.directory}: the {backend} artifact {candidates[0]['path']} is missing from "
                                 "the directory; copy the whole export directory, or export again")
        if kind != "iree" or len(present) == 1:
            return present[0]
        # iree without a target: the CPU module unless it is absent.
        return next((a for a in present if a.get("device") == "cpu"), present[0])

    def _check_backend(self, backend: str) -> str:
        """The cache key of a backend, after checking its artifact and runtime are here (raises UserInputError)."""
        if not isinstance(backend, str) or not backend:
            raise UserInputError(f"backend {backend!r}: choose one of {', '.join(BACKEND_NAMES)}")
        name = backend.strip().lower()
        if name in ("pt2", "onnxruntime"):
            file = "model.pt2" if name == "pt2" else "model.onnx"
            if not (self.directory / file).is_file():
                other = "--format pt2 or both" if name == "pt2" else "--format onnx or both"
                raise UserInputError(f"{self.directory} has no {file} for backend {name} (it has "
                                     f"{', '.join(self.backends) or 'no artifact'}); export with {other}, or pick "
                                     "one of those")
            if name == "onnxruntime" and not _importable("onnxruntime"):
                raise UserInputError("backend onnxruntime: ONNX Runtime is not installed; pip install onnxruntime")
            return name
        kind = name.replace("-", ":", 1).split(":", 1)[0]
        if kind not in BACKEND_NAMES:
            raise UserInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)} "
                                 f"(this export has {', '.join(self.backends)})")
        artifact = self._artifact(name)
        if kind == "iree":
            if not _importable("iree.runtime"):
                raise UserInputError(f"backend {artifact['backend']}: the IREE runtime is not installed; "
                                     "pip install iree-base-runtime (the version in metadata.json's "
                                     "backends[].details.iree_compiler)")
            if artifact.get("device") == "cuda" and not _iree_cuda_devices():
                raise UserInputError(f"backend {artifact['backend']}: no CUDA device here; run it on a GPU machine, "
                                     "or use a CPU backend (pt2, onnxruntime, iree)")
        elif artifact.get("device") == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UserInputError(f"backend {artifact['backend']}: no CUDA device here; run it on a GPU "
                                     "machine, or use a CPU backend (pt2, onnxruntime, aoti)")
        return artifact["backend"]

    def runner(self, backend: str = "pt2") -> "Runner":
        """The backend's runner, made on first use and kept."""
        key = self._check_backend(backend)
        if key not in self._runners:
            self._runners[key] = self._make_runner(key)
        return self._runners[key]

    def _make_runner(self, key: str) -> "Runner":
        names = ([self.input_name], self.output_names)
        if key == "pt2":
            from .backends.pt2 import PT2Runner

            return PT2Runner.from_file(self.directory / "model.pt2", *names)
        if key == "onnxruntime":
            from .backends.onnxruntime import OnnxRuntimeRunner

            return OnnxRuntimeRunner(self.directory / "model.onnx", *names)
        from .backends import BACKENDS, LoweredArtifact, parse_backend
        from .manifest import Manifest

        artifact = LoweredArtifact.from_json(next(a for a in self._lowered() if a["backend"] == key))
        manifest = Manifest.from_json(self.metadata["manifest"])
        return BACKENDS[parse_backend(artifact.spec).kind].runner(artifact, self.directory, manifest)

    # Points ------------------------------------------------------------------------------------------------------

    def _layout(self) -> str:
        used = f"columns {self.use_dim} of {self.load_dim}" if self.load_dim != self.num_columns else "every column"
        return f"float32 rows of {self.num_columns} values ({used} of the dataset's files: x, y, z, ...)"

    def read_points(self, path: str | Path) -> np.ndarray:
        """A point cloud file as the config's LoadPointsFromFile reads it: float32, reshaped to (-1, load_dim),
        the use_dim columns kept."""
        path = Path(path)
        if path.is_dir():
            raise UserInputError(f"points {path} is a directory; pass one point cloud file "
                                 f"({' or '.join(POINT_FILES)})")
        if not path.is_file():
            raise UserInputError(f"points file not found: {path}")
        if path.suffix not in POINT_FILES:
            raise UserInputError(f"points {path}: unsupported file type '{path.suffix}'; expected "
                                 f"{' or '.join(POINT_FILES)} holding float32 rows of {self.load_dim} values")
        if path.suffix == ".bin":
            row = 4 * self.load_dim
            size = path.stat().st_size
            if size % row:
                raise UserInputError(f"points {path}: {size} bytes is not a whole number of {row}-byte rows "
                                     f"(float32 x {self.load_dim}, the config's load_dim); wrong file or dataset?")
            cloud = np.fromfile(path, dtype=np.float32)
        else:
            try:
                cloud = np.load(path, allow_pickle=False)
            except Exception as err:  # noqa: BLE001 - numpy raises several types for corrupt files
                raise UserInputError(f"points {path}: not a readable .npy file "
                                     f"({' '.join(str(err).split())[:160]})") from None
            if cloud.ndim == 2 and cloud.shape[1] != self.load_dim:
                raise UserInputError(f"points {path}: {cloud.shape[1]} columns where the config's load_dim is "
                                     f"{self.load_dim}; expected float32 rows of {self.load_dim} values")
            if cloud.dtype.kind not in "fiu" or cloud.size % self.load_dim:
                raise UserInputError(f"points {path}: array of shape {cloud.shape} and dtype {cloud.dtype}; "
                                     f"expected numbers in rows of {self.load_dim} values (the config's load_dim)")
            cloud = cloud.astype(np.float32)
        return cloud.reshape(-1, self.load_dim)[:, self.use_dim]

    def prepare(self, points: PointsLike) -> np.ndarray:
        """The graph's input: (N, C) float32, C-contiguous, finite; a path is read with read_points."""
        if isinstance(points, (str, os.PathLike)):
            points = self.read_points(points)
        try:
            array = np.asarray(points)
        except Exception as err:  # noqa: BLE001 - whatever the object is, it is not a point array
            raise UserInputError(f"points: not an array ({type(points).__name__}: {first_words(err)}); pass an "
                                 f"(N, {self.num_columns}) float32 array or a .bin/.npy file") from None
        if array.dtype.kind not in "fiu":
            raise UserInputError(f"points: dtype {array.dtype}; expected {self._layout()}")
        if array.ndim != 2:
            raise UserInputError(f"points: shape {array.shape} is not 2-D; expected (N, {self.num_columns}), "
                                 f"{self._layout()}")
        if array.shape[1] != self.num_columns:
            if array.shape[1] == self.load_dim:  # the dataset's raw rows: keep the columns the loader keeps
                array = array[:, self.use_dim]
            else:
                raise UserInputError(f"points: {array.shape[1]} columns where the model takes {self.num_columns}; "
                                     f"expected {self._layout()}")
        bad = int((~np.isfinite(array)).any(axis=1).sum()) if array.dtype.kind == "f" else 0
        if bad:
            raise UserInputError(f"points: {bad} of {len(array)} rows contain NaN or inf; drop or fix those rows")
        return np.ascontiguousarray(array, dtype=np.float32)

    # Prediction --------------------------------------------------------------------------------------------------

    def predict(self, points: PointsLike, backend: str = "pt2") -> Detections:
        """Boxes, scores and labels of one point cloud (an array or a .bin/.npy file), best score first."""
        cloud = self.prepare(points)
        if len(cloud) == 0:
            self._check_backend(backend)
            return Detections.empty(self.class_names)
        outputs = self.runner(backend).infer({self.input_name: cloud})
        count = int(np.asarray(outputs["num_detections"]).reshape(()))
        count = max(0, min(count, len(outputs["scores_3d"])))
        return Detections(np.asarray(outputs["boxes_3d"][:count], np.float32),
                          np.asarray(outputs["scores_3d"][:count], np.float32),
                          np.asarray(outputs["labels_3d"][:count], np.int64), self.class_names)


def first_words(err: BaseException) -> str:
    return " ".join(str(err).split())[:160]


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _iree_cuda_devices() -> list[Any]:
    import iree.runtime as rt

    try:
        return list(rt.get_driver("cuda").query_available_devices())
    except Exception:  # noqa: BLE001 - no driver library or no GPU: either way nothing to run on
        return []


# Bird's-eye view ---------------------------------------------------------------------------------------------------

def box_corners_bev(boxes: np.ndarray) -> np.ndarray:
    """(M, 4, 2) x-y corners of boxes (x, y, z, x_size, y_size, z_size, yaw): x_size runs along the heading."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, len(BOX_FIELDS))
    half = np.array([[0.5, 0.5], [0.5, -0.5], [-0.5, -0.5], [-0.5, 0.5]])  # front-left, front-right, rear...
    local = half[None] * boxes[:, None, 3:5]
    cos, sin = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * cos - local[..., 1] * sin + boxes[:, None, 0]
    y = local[..., 0] * sin + local[..., 1] * cos + boxes[:, None, 1]
    return np.stack([x, y], axis=-1)


def render_bev(path: str | Path, points: np.ndarray, detections: Detections, reference: Detections | None = None,
               extent: Sequence[float] | None = None, title: str = "") -> Path:
    """A bird's-eye-view PNG: the points as small grey dots, each detection as a rotated rectangle coloured by class
    with a tick from its center to its front and its score, the reference boxes (if any) dashed black on top.
    `extent` is the point cloud range (x min, y min, z min, x max, y max, z max) that frames the picture."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Polygon
    except ImportError:
        raise UserInputError("--bev needs matplotlib, which is not installed; pip install matplotlib") from None
    import matplotlib

    path = Path(path)
    figure = Figure(figsize=(10, 10), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    points = np.asarray(points)
    if len(points):
        axes.scatter(points[:, 0], points[:, 1], s=0.3, c="0.55", marker=".", linewidths=0, rasterized=True)
    colours = matplotlib.colormaps["tab10"]
    legend = {}
    for box, corners, score, label in zip(detections.boxes, box_corners_bev(detections.boxes), detections.scores,
                                          detections.labels):
        colour = colours(int(label) % 10)
        axes.add_patch(Polygon(corners, closed=True, fill=False, edgecolor=colour, linewidth=1.5))
        front = corners[:2].mean(axis=0)
        axes.plot([box[0], front[0]], [box[1], front[1]], color=colour, linewidth=1.5)
        axes.text(corners[:, 0].max(), corners[:, 1].max(), f"{score:.2f}", color=colour, fontsize=7)
        legend.setdefault(detections.class_name(int(label)), Line2D([], [], color=colour, linewidth=1.5))
    if reference is not None:
        for box, corners in zip(reference.boxes, box_corners_bev(reference.boxes)):
            axes.add_patch(Polygon(corners, closed=True, fill=False, edgecolor="black", linewidth=1.0,
                                   linestyle="--"))
            front = corners[:2].mean(axis=0)
            axes.plot([box[0], front[0]], [box[1], front[1]], color="black", linewidth=1.0, linestyle="--")
        legend[f"reference ({len(reference)})"] = Line2D([], [], color="black", linewidth=1.0, linestyle="--")
    if extent is not None and len(extent) >= 6:
        axes.set_xlim(extent[0], extent[3])
        axes.set_ylim(extent[1], extent[4])
    axes.set_aspect("equal")
    axes.set_xlabel("x (m, forward)")
    axes.set_ylabel("y (m, left)")
    axes.grid(True, linewidth=0.3, alpha=0.5)
    if legend:
        axes.legend(list(legend.values()), list(legend), loc="upper right", fontsize=8)
    axes.set_title(title or f"{len(detections)} detections, {len(points)} points", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path), format="png", bbox_inches="tight")
    return path


__all__ = ["BOX_FIELDS", "DetectionModel", "Detections", "box_corners_bev", "load", "render_bev"]
