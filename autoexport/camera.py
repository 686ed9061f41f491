"""Camera and camera+lidar samples, in the dataset's own info format and read by the dataset's own code.

For pipelines that load images, the info dict the pipeline starts from is not written by hand: we
write a raw info record in mmdet3d's v2 format (`images` per camera with cam2img/lidar2cam, plus
`lidar_points` for fusion models) and let the config's dataset class parse it (`parse_data_info`:
prefixes, default camera, lidar2img, one record per camera for `mv_image_based` datasets). Images are
rendered from the same synthesized scene as the point cloud (projected lidar returns over a sky/road
background), so camera and lidar agree on where objects are.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserInputError
from .knowledge import KNOWLEDGE


@dataclass(frozen=True)
class CameraSpec:
    """One camera of a dataset's rig: image size, intrinsics and pose in the lidar frame."""

    name: str  # the dataset's camera key, e.g. CAM2, CAM_FRONT
    width: int
    height: int
    focal: float
    center: tuple[float, float]  # principal point (cx, cy)
    yaw_deg: float  # viewing direction in the lidar frame, counter-clockwise from +x
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # camera position in the lidar frame, meters

    def cam2img(self) -> np.ndarray:
        k = np.eye(4)
        k[0, 0] = k[1, 1] = self.focal
        k[0, 2], k[1, 2] = self.center
        return k

    def lidar2cam(self) -> np.ndarray:
        """Lidar (x forward, y left, z up) to camera (x right, y down, z along the view)."""
        yaw = np.deg2rad(self.yaw_deg)
        forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
        down = np.array([0.0, 0.0, -1.0])
        rotation = np.stack([right, down, forward])
        pose = np.eye(4)
        pose[:3, :3] = rotation
        pose[:3, 3] = -rotation @ np.asarray(self.offset)
        return pose


@dataclass(frozen=True)
class CameraRig:
    cameras: tuple[CameraSpec, ...]
    image_suffix: str = ".png"
    # The point cloud's frame as the dataset names it: indoor datasets project "depth" points with depth2img.
    point_frame: str = "lidar"


def rig_for(dataset_type: str) -> CameraRig:
    entry = KNOWLEDGE.get(dataset_type)
    rig = entry.camera_rig if entry is not None else None
    if rig is None:
        known = ", ".join(name for name, _ in KNOWLEDGE.with_field("camera_rig"))
        raise UserInputError(f"no camera rig is known for dataset type '{dataset_type}' (known: {known}); "
                             "camera samples cannot be synthesized for it")
    return rig


def render_image(rng: np.random.Generator, xyz: np.ndarray, intensity: np.ndarray, camera: CameraSpec) -> np.ndarray:
    """A BGR uint8 image of the scene: sky and road gradients, lidar returns splatted by depth and intensity."""
    h, w = camera.height, camera.width
    rows = np.linspace(0.0, 1.0, h)[:, None]
    horizon = camera.center[1] / h
    sky = np.stack([200 - 60 * rows, 170 - 40 * rows, 130 - 30 * rows], -1)  # BGR: bluish, lighter at top
    road = np.stack([90 + 40 * rows, 90 + 40 * rows, 95 + 40 * rows], -1)
    image = np.where(rows[..., None] < horizon, sky, road) * np.ones((1, w, 1))
    image += rng.normal(0.0, 6.0, image.shape)

    cam = (camera.lidar2cam() @ np.c_[xyz, np.ones(len(xyz))].T)[:3]
    ahead = cam[2] > 0.5
    uvz = (camera.cam2img()[:3, :3] @ cam[:, ahead])
    u, v, depth = uvz[0] / uvz[2], uvz[1] / uvz[2], cam[2, ahead]
    inside = (u >= 1) & (u < w - 1) & (v >= 1) & (v < h - 1)
    u, v, depth = u[inside].astype(int), v[inside].astype(int), depth[inside]
    shade = np.clip(intensity[ahead][inside], 0.0, 1.0)
    color = np.stack([60 + 150 * shade, 40 + 120 * np.exp(-depth / 30.0), 200 * np.exp(-depth / 15.0)], -1)
    order = np.argsort(-depth)  # near points drawn last
    for du in (-1, 0, 1):  # 3x3 splats so objects read as surfaces, not speckle
        for dv in (-1, 0, 1):
            image[v[order] + dv, u[order] + du] = color[order]
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(rng: np.random.Generator, cloud: np.ndarray, intensity_scale: float, rig: CameraRig,
                 folder: Path, stem: str) -> dict[str, dict]:
    """Render every camera of the rig; the `images` field of a v2 info record."""
    import mmcv

    images = {}
    intensity = cloud[:, 3] / intensity_scale if cloud.shape[1] > 3 else np.full(len(cloud), 0.5)
    for camera in rig.cameras:
        path = folder / f"{stem}_{camera.name}{rig.image_suffix}"
        mmcv.imwrite(render_image(rng, cloud[:, :3], intensity, camera), str(path))
        cam2img, lidar2cam = camera.cam2img(), camera.lidar2cam()
        images[camera.name] = dict(img_path=str(path), height=camera.height, width=camera.width,
                                   cam2img=cam2img.tolist(), lidar2cam=lidar2cam.tolist(),
                                   lidar2img=(cam2img @ lidar2cam).tolist())
        if rig.point_frame == "depth":
            # SUN RGB-D's converter (update_infos_to_v2.py) writes depth2img as K @ R, 3x3 with no translation,
            # and VoteFusion multiplies 3-vectors by it.
            if any(camera.offset):
                raise ValueError(f"{camera.name}: a depth-frame camera has no translation in depth2img (3x3)")
            images[camera.name]["depth2img"] = (cam2img[:3, :3] @ lidar2cam[:3, :3]).tolist()
        elif rig.point_frame != "lidar":
            images[camera.name][f"{rig.point_frame}2img"] = images[camera.name]["lidar2img"]
    return images


def dataset_for_parsing(cfg: Any, folder: Path) -> Any:
    """The config's test dataset, built without an annotation file, to run its parse_data_info."""
    import mmdet3d.datasets  # noqa: F401  (registers the dataset classes; register_all_modules needs lyft's SDK)
    from mmdet3d.registry import DATASETS

    from .samples import test_dataset_cfg

    dataset_cfg = copy.deepcopy(test_dataset_cfg(cfg))
    # Empty prefixes under data_root=folder: files resolve to the folder, sweeps (joined by basename) too.
    prefixes = {key: "" for key in [*(dataset_cfg.get("data_prefix") or {}), "img", "pts", "sweeps"]}
    dataset_cfg.update(data_root=str(folder), data_prefix=prefixes, ann_file="", pipeline=[], test_mode=True,
                       lazy_init=True, load_eval_anns=False)
    try:
        return DATASETS.build(dataset_cfg)
    except Exception as err:
        raise UserInputError(f"could not build the config's test dataset ({dataset_cfg.get('type')}) to parse "
                             f"synthesized camera samples: {type(err).__name__}: {err}") from None


def parse_info(dataset: Any, raw: dict) -> list[dict]:
    """What the dataset would hand its pipeline for this record: one dict, or one per camera."""
    try:
        parsed = dataset.parse_data_info(copy.deepcopy(raw))
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"{type(dataset).__name__}.parse_data_info failed on a synthesized camera sample "
                             f"({type(err).__name__}: {err}); its info format needs a field the camera rig does not "
                             "write (autoexport/camera.py)") from None
    records = parsed if isinstance(parsed, list) else [parsed]
    for record in records:
        record["box_type_3d"], record["box_mode_3d"] = dataset.box_type_3d, dataset.box_mode_3d
    return records


__all__ = ["CameraSpec", "CameraRig", "rig_for", "render_image", "write_images",
           "dataset_for_parsing", "parse_info"]
