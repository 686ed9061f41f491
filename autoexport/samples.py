"""Sample data for analysis, export and parity, in the dataset's own on-disk format.

The test pipeline of the config is the consumer: we write files it can load (KITTI-style
`.bin` clouds, nuScenes-style clouds plus sweeps) and the info dict it starts from, so the
real loading, range filtering and packing code runs. Synthesized scenes have a ground plane,
box-shaped objects and vertical clutter with lidar-like range falloff, not uniform noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import UserInputError

# Transforms whose presence tells which modality a pipeline needs.
_POINT_LOADERS = {"LoadPointsFromFile"}
_SWEEP_LOADERS = {"LoadPointsFromMultiSweeps"}
_IMAGE_LOADERS = {"LoadImageFromFileMono3D", "LoadMultiViewImageFromFiles", "LoadImageFromFile",
                  "LoadImageFromNDArray", "MonoDet3DInferencerLoader", "MultiModalityDet3DInferencerLoader"}

# Raw intensity scale per dataset class: KITTI stores reflectance in [0, 1], nuScenes/Lyft in [0, 255].
_INTENSITY_SCALE = {"NuScenesDataset": 255.0, "LyftDataset": 255.0}


@dataclass
class PointCloudFormat:
    """What the config's test pipeline expects to read from disk."""

    load_dim: int
    use_dim: list[int]
    point_cloud_range: list[float]
    sweeps_num: int = 0  # 0: the pipeline loads no sweeps
    intensity_scale: float = 1.0
    dataset_type: str = ""


@dataclass
class SampleSource:
    """One sample before the pipeline: the info dict it starts from and the files it reads."""

    name: str  # e.g. sample_0, heldout_0
    role: str  # "export" (used to trace and find dynamic dims) or "heldout" (parity only)
    info: dict[str, Any]
    files: list[Path]
    num_points: int  # points in the main cloud file
    origin: str  # "synthesized" or the user's file (and how it was derived)


def iter_pipeline_transforms(pipeline: Iterable[dict]) -> Iterable[dict]:
    """Transforms of a pipeline config, descending into wrappers such as MultiScaleFlipAug3D."""
    for transform in pipeline:
        yield transform
        inner = transform.get("transforms")
        if isinstance(inner, (list, tuple)):
            yield from iter_pipeline_transforms(inner)


def test_dataset_cfg(cfg: Any) -> dict:
    """The config's test dataset, unwrapped from dataset wrappers (RepeatDataset, CBGSDataset, ...)."""
    dataset = cfg.get("test_dataloader", {}).get("dataset", {})
    while isinstance(dataset, dict) and "pipeline" not in dataset and "dataset" in dataset:
        dataset = dataset["dataset"]
    return dataset if isinstance(dataset, dict) else {}


def test_pipeline_of(cfg: Any) -> list[dict]:
    """The config's test pipeline (test_dataloader's dataset, through dataset wrappers)."""
    pipeline = test_dataset_cfg(cfg).get("pipeline") or cfg.get("test_pipeline")
    if not pipeline:
        raise UserInputError("the config defines no test pipeline (test_dataloader.dataset.pipeline or test_pipeline)")
    return list(pipeline)


def dataset_type_of(cfg: Any) -> str:
    return test_dataset_cfg(cfg).get("type", "")


def modalities_of(pipeline: list[dict]) -> set[str]:
    types = {t.get("type") for t in iter_pipeline_transforms(pipeline)}
    found = set()
    if types & _POINT_LOADERS:
        found.add("lidar")
    if types & _IMAGE_LOADERS:
        found.add("camera")
    return found


def point_cloud_format(cfg: Any, pipeline: list[dict]) -> PointCloudFormat:
    transforms = list(iter_pipeline_transforms(pipeline))
    loader = next(t for t in transforms if t.get("type") in _POINT_LOADERS)
    load_dim = int(loader.get("load_dim", 6))
    use_dim = loader.get("use_dim", [0, 1, 2])
    use_dim = list(range(use_dim)) if isinstance(use_dim, int) else list(use_dim)
    sweeps = next((t for t in transforms if t.get("type") in _SWEEP_LOADERS), None)
    pc_range = next((t["point_cloud_range"] for t in transforms if t.get("type") == "PointsRangeFilter"), None)
    if pc_range is None:
        voxel_layer = cfg.model.get("data_preprocessor", {}).get("voxel_layer", {}) or {}
        # Depth-camera datasets (ScanNet, S3DIS, SUNRGBD) are rooms: a street-sized scene would give an indoor
        # segmentor's sliding window thousands of patches.
        indoor = loader.get("coord_type") == "DEPTH"
        pc_range = voxel_layer.get("point_cloud_range", INDOOR_RANGE if indoor else [-40.0, -40.0, -3.0, 40.0, 40.0, 1.0])
    dataset_type = dataset_type_of(cfg)
    return PointCloudFormat(
        load_dim=load_dim,
        use_dim=use_dim,
        point_cloud_range=[float(v) for v in pc_range],
        sweeps_num=int(sweeps.get("sweeps_num", 10)) if sweeps else 0,
        intensity_scale=_INTENSITY_SCALE.get(dataset_type, 1.0),
        dataset_type=dataset_type,
    )


# Scene extent for indoor (depth-camera) configs without a point cloud range: a 10 m x 10 m room, 3 m high.
INDOOR_RANGE = [-5.0, -5.0, -1.0, 5.0, 5.0, 2.0]

# Scene extent for camera-only configs, which name no point cloud range: KITTI's front area.
CAMERA_ONLY_RANGE = [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]


def camera_scene_format(cfg: Any) -> PointCloudFormat:
    """Camera-only pipelines load no cloud; the scene is still synthesized as one, then rendered into images."""
    dataset_type = dataset_type_of(cfg)
    return PointCloudFormat(4, [0, 1, 2, 3], list(CAMERA_ONLY_RANGE),
                            intensity_scale=_INTENSITY_SCALE.get(dataset_type, 1.0), dataset_type=dataset_type)


# ---- synthesized scenes --------------------------------------------------------------------------

# Object classes as (length, width, height) in meters.
_OBJECT_SIZES = {"car": (4.2, 1.8, 1.6), "pedestrian": (0.7, 0.7, 1.75), "cyclist": (1.8, 0.7, 1.7)}
_SENSOR_HEIGHT = 1.73  # ground sits this far below the lidar origin


def _in_range_xy(xy: np.ndarray, pc_range: list[float]) -> np.ndarray:
    return (xy[:, 0] >= pc_range[0]) & (xy[:, 0] < pc_range[3]) & (xy[:, 1] >= pc_range[1]) & (xy[:, 1] < pc_range[4])


def _sample_ground(rng: np.random.Generator, n: int, pc_range: list[float]) -> np.ndarray:
    # Uniform range r gives density ~ 1/r per area, like concentric lidar rings.
    r_max = float(np.hypot(max(abs(pc_range[0]), abs(pc_range[3])), max(abs(pc_range[1]), abs(pc_range[4]))))
    out = np.empty((0, 3), np.float32)
    while len(out) < n:
        r = rng.uniform(2.0, r_max, size=2 * n)
        phi = rng.uniform(-np.pi, np.pi, size=2 * n)
        xy = np.stack([r * np.cos(phi), r * np.sin(phi)], 1)
        xy = xy[_in_range_xy(xy, pc_range)]
        z = -_SENSOR_HEIGHT + 0.02 * xy[:, 0] / 50.0 + rng.normal(0, 0.03, len(xy))  # slight slope + noise
        out = np.concatenate([out, np.concatenate([xy, z[:, None]], 1).astype(np.float32)])
    return out[:n]


def _sample_box_surface(rng: np.random.Generator, n: int, center: np.ndarray, size: tuple, yaw: float) -> np.ndarray:
    length, width, height = size
    faces = [(length, height, 0), (length, height, 1), (width, height, 2), (width, height, 3), (length, width, 4)]
    areas = np.array([a * b for a, b, _ in faces])
    which = rng.choice(len(faces), size=n, p=areas / areas.sum())
    u, v = rng.uniform(-0.5, 0.5, size=(2, n))
    local = np.zeros((n, 3))
    for face in range(5):
        m = which == face
        if face in (0, 1):  # long sides
            local[m] = np.stack([u[m] * length, np.full(m.sum(), (0.5 if face == 0 else -0.5) * width), (v[m] + 0.5) * height], 1)
        elif face in (2, 3):  # front/back
            local[m] = np.stack([np.full(m.sum(), (0.5 if face == 2 else -0.5) * length), u[m] * width, (v[m] + 0.5) * height], 1)
        else:  # roof
            local[m] = np.stack([u[m] * length, v[m] * width, np.full(m.sum(), height)], 1)
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    points = local @ rot.T + center
    return (points + rng.normal(0, 0.015, points.shape)).astype(np.float32)


@dataclass(frozen=True)
class SceneObject:
    kind: str  # a key of _OBJECT_SIZES
    bottom_center: tuple[float, float, float]  # x, y, z of the box's bottom face centre, lidar frame
    size: tuple[float, float, float]  # length (along yaw), width, height
    yaw: float  # counter-clockwise from the x axis, as mmdet3d's LiDAR boxes


def synthesize_cloud(rng: np.random.Generator, num_points: int, fmt: PointCloudFormat) -> np.ndarray:
    """A plausible lidar scene with exactly `num_points` rows of `fmt.load_dim` float32 values."""
    return synthesize_scene(rng, num_points, fmt)[0]


def synthesize_scene(rng: np.random.Generator, num_points: int,
                     fmt: PointCloudFormat) -> tuple[np.ndarray, list[SceneObject]]:
    """synthesize_cloud plus the boxes of the objects in it (ground truth for training on synthetic scenes)."""
    pc = fmt.point_cloud_range
    n_ground = int(num_points * 0.55)
    n_objects_total = int(num_points * 0.28)
    n_clutter = num_points - n_ground - n_objects_total
    parts = [_sample_ground(rng, n_ground, pc)]
    intensity = [rng.uniform(0.05, 0.35, n_ground)]

    num_objects = int(rng.integers(6, 16))
    kinds = rng.choice(list(_OBJECT_SIZES), size=num_objects, p=[0.6, 0.25, 0.15])
    centers = _sample_ground(rng, num_objects, [pc[0] + 3, pc[1] + 3, pc[2], pc[3] - 3, pc[4] - 3, pc[5]])
    distances = np.linalg.norm(centers[:, :2], axis=1) + 3.0
    share = (1.0 / distances) / (1.0 / distances).sum()  # near objects get more points
    counts = np.floor(share * n_objects_total).astype(int)
    counts[0] += n_objects_total - counts.sum()
    objects = []
    for kind, center, count in zip(kinds, centers, counts):
        yaw = float(rng.uniform(-np.pi, np.pi))
        parts.append(_sample_box_surface(rng, int(count), center, _OBJECT_SIZES[kind], yaw))
        intensity.append(rng.uniform(0.2, 0.95, int(count)))
        objects.append(SceneObject(str(kind), tuple(float(v) for v in center), _OBJECT_SIZES[kind], yaw))

    # Clutter: building facades along both sides and poles, as vertical surfaces.
    n_walls = n_clutter // 2
    side = rng.choice([-1.0, 1.0], n_walls)
    wall_y = side * rng.uniform(0.55, 0.9, n_walls) * np.where(side > 0, pc[4], -pc[1])
    wall_x = rng.uniform(pc[0], pc[3], n_walls)
    wall_z = rng.uniform(-_SENSOR_HEIGHT, min(4.0, pc[5] + 2.0), n_walls)
    parts.append(np.stack([wall_x, wall_y, wall_z], 1).astype(np.float32))
    n_poles = n_clutter - n_walls
    pole_xy = _sample_ground(rng, 12, pc)[:, :2]
    which = rng.integers(0, len(pole_xy), n_poles)
    angle = rng.uniform(0, 2 * np.pi, n_poles)
    pole = np.stack([pole_xy[which, 0] + 0.15 * np.cos(angle), pole_xy[which, 1] + 0.15 * np.sin(angle),
                     rng.uniform(-_SENSOR_HEIGHT, 3.0, n_poles)], 1)
    parts.append(pole.astype(np.float32))
    intensity.append(rng.uniform(0.1, 0.6, n_clutter))

    xyz = np.concatenate(parts)
    cloud = np.zeros((num_points, fmt.load_dim), np.float32)
    cloud[:, :3] = xyz[:num_points]
    if fmt.load_dim > 3:
        cloud[:, 3] = np.concatenate(intensity)[:num_points] * fmt.intensity_scale
    if fmt.load_dim > 4:  # nuScenes: ring index; Waymo: elongation. Sweep loading overwrites it with time lag.
        elevation = np.arctan2(cloud[:, 2], np.linalg.norm(cloud[:, :2], axis=1) + 1e-6)
        cloud[:, 4] = np.clip(np.round((elevation + 0.53) / 0.04), 0, 31)
    return cloud[rng.permutation(num_points)], objects


def _write_cloud(path: Path, cloud: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cloud.astype(np.float32).tofile(path)
    return path


def _base_info(lidar_path: Path, fmt: PointCloudFormat, box_type_3d: Any, box_mode_3d: Any, index: int) -> dict:
    # Mirrors mmdet3d.apis.inference_detector's info dict, plus what sweep loading reads.
    return dict(
        lidar_points=dict(lidar_path=str(lidar_path), num_pts_feats=fmt.load_dim),
        timestamp=1.0,
        axis_align_matrix=np.eye(4),
        box_type_3d=box_type_3d,
        box_mode_3d=box_mode_3d,
        sample_idx=index,
    )


def _sweeps(rng: np.random.Generator, cloud: np.ndarray, fmt: PointCloudFormat, folder: Path, stem: str) -> list[dict]:
    """Earlier sweeps of the same scene: fewer points, ego moving forward ~10 m/s, 50 ms apart."""
    sweeps = []
    for k in range(fmt.sweeps_num):
        lag = 0.05 * (k + 1)
        keep = rng.random(len(cloud)) < 0.5
        sweep = cloud[keep].copy()
        sweep[:, 0] += 10.0 * lag  # the scene, seen from where the sensor was
        lidar2sensor = np.eye(4)
        lidar2sensor[0, 3] = 10.0 * lag  # LoadPointsFromMultiSweeps applies p @ R - t
        path = _write_cloud(folder / f"{stem}_sweep{k}.bin", sweep)
        sweeps.append(dict(lidar_points=dict(lidar_path=str(path), lidar2sensor=lidar2sensor.tolist()),
                           timestamp=1.0 - lag))
    return sweeps


# Point counts of the synthesized samples: two of different size to find dynamic dims, and a
# larger held-out one that export never sees.
EXPORT_SAMPLE_POINTS = (14000, 21000)
HELDOUT_SAMPLE_POINTS = (28000,)


@dataclass
class CameraSampling:
    """How to make camera samples: the dataset's rig, its parser, and whether the pipeline also loads the cloud."""

    rig: Any  # camera.CameraRig
    dataset: Any  # the config's dataset class instance, for parse_data_info
    use_lidar: bool


def _camera_info(cameras: CameraSampling, rng: np.random.Generator, cloud: np.ndarray, fmt: PointCloudFormat,
                 folder: Path, name: str, index: int, main: Path) -> tuple[dict, list[Path]]:
    """The dataset's parsed info for a camera (+lidar) sample of this scene, and the files it reads."""
    from . import camera

    images = camera.write_images(rng, cloud, fmt.intensity_scale, cameras.rig, folder, name)
    raw: dict[str, Any] = dict(sample_idx=index, token=f"synthetic_{index}", timestamp=1.0, ego2global=np.eye(4).tolist(),
                               images=images, instances=[], cam_instances={cam: [] for cam in images})
    files = [Path(i["img_path"]) for i in images.values()]
    # The dataset's own modality can ask for the cloud even where the pipeline loads images only (ImVoteNet's
    # image-only stage on SUN RGB-D): its parser reads lidar_points then.
    if cameras.use_lidar or (getattr(cameras.dataset, "modality", None) or {}).get("use_lidar"):
        raw["lidar_points"] = dict(lidar_path=str(main), num_pts_feats=fmt.load_dim, lidar2ego=np.eye(4).tolist())
        if cameras.use_lidar:
            files.append(main)
        if cameras.use_lidar and fmt.sweeps_num:
            raw["lidar_sweeps"] = _sweeps(rng, cloud, fmt, folder, name)
            files += [Path(s["lidar_points"]["lidar_path"]) for s in raw["lidar_sweeps"]]
    records = camera.parse_info(cameras.dataset, raw)
    # Datasets that split a frame into one record per camera (mv_image_based): vary the camera across samples.
    return records[index % len(records)], files


def synthesize_samples(fmt: PointCloudFormat, folder: Path, seed: int, box_type_3d: Any, box_mode_3d: Any,
                       export_points: tuple[int, ...] = EXPORT_SAMPLE_POINTS,
                       heldout_points: tuple[int, ...] = HELDOUT_SAMPLE_POINTS,
                       cameras: CameraSampling | None = None) -> list[SampleSource]:
    rng = np.random.default_rng(seed)
    plan = [("export", n) for n in export_points] + [("heldout", n) for n in heldout_points]
    sources: list[SampleSource] = []
    counters = {"export": 0, "heldout": 0}
    for index, (role, n) in enumerate(plan):
        name = f"{'sample' if role == 'export' else 'heldout'}_{counters[role]}"
        counters[role] += 1
        cloud = synthesize_cloud(rng, n, fmt)
        main = _write_cloud(folder / f"{name}.bin", cloud)
        if cameras is not None:
            info, files = _camera_info(cameras, rng, cloud, fmt, folder, name, index, main)
            sources.append(SampleSource(name, role, info, files, n if cameras.use_lidar else 0, "synthesized"))
            continue
        info = _base_info(main, fmt, box_type_3d, box_mode_3d, index)
        files = [main]
        if fmt.sweeps_num:
            info["lidar_sweeps"] = _sweeps(rng, cloud, fmt, folder, name)
            files += [Path(s["lidar_points"]["lidar_path"]) for s in info["lidar_sweeps"]]
        sources.append(SampleSource(name, role, info, files, n, "synthesized"))
    return sources


# ---- annotation stand-ins -------------------------------------------------------------------------

# (LoadAnnotations3D flag, info key of the file it reads, the transform's dtype argument)
_MASK_FILES = (("with_seg_3d", "pts_semantic_mask_path", "seg_3d_dtype"),
               ("with_mask_3d", "pts_instance_mask_path", None))


def add_annotation_stand_ins(sources: list[SampleSource], pipeline: list[dict], folder: Path) -> None:
    """Segmentation test pipelines load the per-point masks for the evaluator (LoadAnnotations3D with_seg_3d,
    PointSegClassMapping); the model never reads them. Each sample gets all-zero masks of the transform's dtype, one
    label per point, and an identity label mapping, so the real pipeline runs on points alone."""
    loaders = [t for t in iter_pipeline_transforms(pipeline) if t.get("type") == "LoadAnnotations3D"]
    wanted = [(key, t.get(dtype_arg, "np.int64") if dtype_arg else "np.int64")
              for flag, key, dtype_arg in _MASK_FILES for t in loaders if t.get(flag)]
    maps_labels = any(t.get("type") == "PointSegClassMapping" for t in iter_pipeline_transforms(pipeline))
    for source in sources:
        for key, dtype_name in wanted:
            if key not in source.info:
                path = folder / f"{source.name}.{key}.bin"
                np.zeros(source.num_points, dtype=getattr(np, str(dtype_name).split(".")[-1])).tofile(path)
                source.info[key] = str(path)
        if maps_labels and "seg_label_mapping" not in source.info:
            source.info["seg_label_mapping"] = np.arange(256, dtype=np.int64)


# ---- user samples --------------------------------------------------------------------------------

_ACCEPTED = (".bin", ".npy")


def in_point_cloud_range(cloud: np.ndarray, pc_range: list[float]) -> np.ndarray:
    """Which points the test pipeline's PointsRangeFilter keeps (mmdet3d's in_range_3d: strictly inside)."""
    lower, upper = np.asarray(pc_range[:3]), np.asarray(pc_range[3:6])
    return ((cloud[:, :3] > lower) & (cloud[:, :3] < upper)).all(axis=1)


def describe_point_format(fmt: PointCloudFormat) -> str:
    return (f"{fmt.dataset_type or 'this dataset'}-style point cloud: float32 rows of {fmt.load_dim} values "
            f"(x, y, z, intensity{', ...' if fmt.load_dim > 4 else ''})")


def _read_cloud(path: Path, fmt: PointCloudFormat, expect: str) -> np.ndarray:
    if path.suffix == ".bin":
        size = path.stat().st_size
        row = 4 * fmt.load_dim
        if size % row:
            raise UserInputError(f"sample {path}: {size} bytes is not a whole number of {row}-byte rows; expected a "
                                 f"{expect}")
        return np.fromfile(path, dtype=np.float32).reshape(-1, fmt.load_dim)
    try:
        cloud = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises several types for corrupt files and oversized headers
        raise UserInputError(f"sample {path}: not a readable .npy file ({' '.join(str(err).split())[:160]}); "
                             f"expected a {expect}") from None
    if cloud.ndim != 2 or cloud.shape[1] != fmt.load_dim or cloud.dtype.kind != "f":
        raise UserInputError(f"sample {path}: array of shape {cloud.shape} and dtype {cloud.dtype}; expected a {expect}")
    return cloud.astype(np.float32)


def read_point_file(path: Path, fmt: PointCloudFormat) -> np.ndarray:
    """Load and check a user point cloud; raise UserInputError saying what is wrong with it."""
    expect = describe_point_format(fmt)
    if path.is_dir():
        raise UserInputError(f"sample {path} is a directory; pass point cloud files ({' or '.join(_ACCEPTED)}), "
                             "e.g. --sample DIR/*.bin")
    if not path.is_file():
        raise UserInputError(f"sample file not found: {path}")
    if path.suffix not in _ACCEPTED:
        raise UserInputError(f"sample {path}: unsupported file type '{path.suffix}'; expected {' or '.join(_ACCEPTED)} "
                             f"holding a {expect}")
    cloud = _read_cloud(path, fmt, expect)
    if len(cloud) == 0:
        raise UserInputError(f"sample {path} holds 0 points; an export sample needs points inside the model's point "
                             f"cloud range {fmt.point_cloud_range}")
    bad = int((~np.isfinite(cloud)).any(axis=1).sum())
    if bad:
        raise UserInputError(f"sample {path}: {bad} of {len(cloud)} points contain NaN or inf; drop or fix those rows")
    if not in_point_cloud_range(cloud, fmt.point_cloud_range).any():
        raise UserInputError(f"sample {path}: none of its {len(cloud)} points lies inside the model's point cloud range "
                             f"{fmt.point_cloud_range} (x, y, z min, then max); wrong file format, load_dim or "
                             "coordinate frame?")
    return cloud


def file_sources(paths: list[Path], fmt: PointCloudFormat, role: str, box_type_3d: Any,
                 box_mode_3d: Any) -> list[SampleSource]:
    """The user's point cloud files as samples of one role (e.g. calibration), checked as read_point_file does."""
    sources = []
    for index, path in enumerate(paths):
        cloud = read_point_file(path, fmt)
        info = _base_info(path.resolve(), fmt, box_type_3d, box_mode_3d, index)
        sources.append(SampleSource(f"{role}_{index}", role, info, [path], len(cloud), str(path)))
    return sources


def point_files_in(folder: Path) -> list[Path]:
    """Point cloud files (.bin, .npy) directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _ACCEPTED)


def user_samples(paths: list[Path], fmt: PointCloudFormat, folder: Path, seed: int,
                 box_type_3d: Any, box_mode_3d: Any) -> list[SampleSource]:
    """The user's files as samples. With fewer than three, random subsets of their clouds fill in,
    so that there are two export samples of different size and one held-out sample."""
    clouds = [(p, read_point_file(p, fmt)) for p in paths]
    rng = np.random.default_rng(seed)
    plan: list[tuple[Path, np.ndarray, str]] = [(p, c, str(p)) for p, c in clouds]
    fraction = 0.8
    while len(plan) < 3:
        base_path, base = clouds[(len(plan) - len(clouds)) % len(clouds)]
        keep = rng.random(len(base)) < fraction
        plan.append((base_path, base[keep], f"{fraction:.0%} random subset of {base_path}"))
        fraction -= 0.2
    sizes = [len(c) for _, c, _ in plan[:2]]
    if sizes[0] == sizes[1]:
        raise UserInputError("the first two samples have the same number of points; give samples of different sizes "
                             "so dynamic dimensions can be told from static ones")
    sources = []
    for index, (path, cloud, origin) in enumerate(plan):
        role = "export" if index < 2 else "heldout"
        name = f"sample_{index}" if role == "export" else f"heldout_{index - 2}"
        if origin == str(path) and path.suffix == ".bin":
            main = path.resolve()
        else:
            main = _write_cloud(folder / f"{name}.bin", cloud)
        info = _base_info(main, fmt, box_type_3d, box_mode_3d, index)
        sources.append(SampleSource(name, role, info, [main], len(cloud), origin))
    return sources


def read_info_file(path: Path) -> list[dict]:
    """The records of an mmdet3d info file (tools/create_data.py's .pkl: {'metainfo', 'data_list'}), unpickled with
    the same allow-list as checkpoints (numpy arrays, dtypes, scalars): an info file runs no code."""
    import pickle

    import torch
    import torch._weights_only_unpickler as restricted

    from .checkpoint import checkpoint_safe_globals

    if not path.is_file():
        raise UserInputError(f"--data-info {path}: no such file; pass an info .pkl written by mmdet3d's "
                             "tools/create_data.py")
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()), open(path, "rb") as f:
            data = restricted.Unpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError) as err:
        raise UserInputError(f"--data-info {path}: not an mmdet3d info file that loads without running code "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    records = data.get("data_list") if isinstance(data, dict) else data
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise UserInputError(f"--data-info {path}: no 'data_list' of records in it; pass an info .pkl written by "
                             "mmdet3d 1.x's tools/create_data.py")
    return records


def info_file_samples(info_file: Path, data_root: Path | None, cfg: Any, fmt: PointCloudFormat, folder: Path,
                      seed: int) -> list[SampleSource]:
    """Samples from the dataset's own info file: its first three records as the config's dataset class parses them
    (files relative to data_root, default the info file's folder). With fewer than three records, random subsets of
    the first record's cloud fill in, as for --sample, so that the two export samples differ in size."""
    from .camera import dataset_for_parsing, parse_info

    root = data_root or info_file.parent
    dataset = dataset_for_parsing(cfg, root)
    parsed = []
    for index, raw in enumerate(read_info_file(info_file)[:3]):
        info = parse_info(dataset, raw)[0]
        lidar = Path(info.get("lidar_points", {}).get("lidar_path", ""))
        if not lidar.is_file():
            raise UserInputError(f"--data-info {info_file}: record {index}'s point cloud {lidar} does not exist; "
                                 "pass --data-root, the folder its lidar_path is relative to")
        parsed.append((info, lidar, read_point_file(lidar, fmt), f"{info_file} record {index}"))
    rng, fraction = np.random.default_rng(seed), 0.8
    while len(parsed) < 3:
        info, lidar, cloud, _ = parsed[0]
        subset = cloud[rng.random(len(cloud)) < fraction]
        path = _write_cloud(folder / f"subset_{len(parsed)}.bin", subset)
        copy = {**info, "lidar_points": {**info["lidar_points"], "lidar_path": str(path)}, "lidar_path": str(path)}
        parsed.append((copy, path, subset, f"{fraction:.0%} random subset of {lidar}"))
        fraction -= 0.2
    sources = []
    for index, (info, lidar, cloud, origin) in enumerate(parsed):
        role = "export" if index < 2 else "heldout"
        name = f"sample_{index}" if role == "export" else f"heldout_{index - 2}"
        images = [Path(v["img_path"]) for v in (info.get("images") or {}).values()
                  if isinstance(v, dict) and v.get("img_path")]
        sources.append(SampleSource(name, role, info, [lidar, *images], len(cloud), origin))
    return sources
