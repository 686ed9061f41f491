"""Write a synthetic dataset in KITTI's own on-disk layout, then mmdet3d's own create_data steps on it.

No trained mmdet3d checkpoint can be downloaded here, so the INT8 fidelity benchmark trains its own weights. This
writes what KITTI ships (training/velodyne/*.bin, calib/*.txt, label_2/*.txt, image_2/*.png, ImageSets/*.txt) for
scenes of cars, pedestrians and cyclists on a ground plane among walls, poles and unlabelled boxes, in front of the
camera of KITTI frame 000008 (its calibration; planes/*.txt holds the ground plane), then runs mmdet3d's create_data steps for KITTI (info files,
reduced clouds, v2 info update, ground-truth database for ObjectSample), so mmdet3d's KittiDataset, training
pipeline and KittiMetric read it exactly as they read KITTI.

    python3 benchmarks/synthetic_kitti.py --out data/kitti_synthetic --train 3000 --val 250

Objects do not overlap, their sizes vary by +-10 % around KITTI's class means, and the number of points on an
object falls with the square of its distance, as a spinning lidar's do; labels are written for objects whose box
centre projects into the image (KITTI labels only what the camera sees).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (375, 1242)  # height, width of KITTI's image_2
# KITTI frame 000008's calibration (mmdet3d's demo data), written as KITTI's calib/*.txt holds it.
CALIB_TEXT = """\
P0: 721.5377 0.0 609.5593 0.0 0.0 721.5377 172.854 0.0 0.0 0.0 1.0 0.0
P1: 721.5377 0.0 609.5593 -387.5744 0.0 721.5377 172.854 0.0 0.0 0.0 1.0 0.0
P2: 721.5377 0.0 609.5593 44.85728 0.0 721.5377 172.854 0.2163791 0.0 0.0 1.0 0.002745884
P3: 721.5377 0.0 609.5593 -339.5242 0.0 721.5377 172.854 2.199936 0.0 0.0 1.0 0.002729905
R0_rect: 0.9999239 0.00983776 -0.007445048 -0.009869795 0.9999421 -0.004278459 0.007402527 0.004351614 0.999963
Tr_velo_to_cam: 0.007533745 -0.9999714 -0.000616602 -0.004069766 0.01480249 0.0007280733 -0.9998902 -0.07631618 \
0.9998621 0.007523790 0.01480755 -0.2717806
Tr_imu_to_velo: 0.9999976 0.0007553071 -0.002035826 -0.8086759 -0.0007854027 0.9998898 -0.01482298 0.3195559 \
0.002024406 0.01482454 0.9998881 -0.7997231
"""
CLASS_OF_KIND = {"car": "Car", "pedestrian": "Pedestrian", "cyclist": "Cyclist"}
KIND_PROBABILITY = {"car": 0.55, "pedestrian": 0.28, "cyclist": 0.17}
POINTS_AT_10_M_PER_M2 = 160.0  # a car's side at 10 m gets ~1000 points, as in KITTI
HALF_FOV = np.deg2rad(39.0)  # image_2 sees about +-40 degrees
# Labelled objects are lower over the front FRONT_FRACTION of their length (FRONT_HEIGHT of their height), as a car's
# bonnet is: a box looks the same from front and back, and a detector cannot learn the heading of what looks the same.
FRONT_FRACTION, FRONT_HEIGHT = 0.35, 0.6


def calibration() -> dict[str, np.ndarray]:
    values = {}
    for line in CALIB_TEXT.replace("\\\n", "").splitlines():
        key, numbers = line.split(":")
        values[key] = np.array([float(v) for v in numbers.split()])
    square = lambda m: np.vstack([m, [0, 0, 0, 1]])  # noqa: E731
    r0 = np.eye(4)
    r0[:3, :3] = values["R0_rect"].reshape(3, 3)
    return {"P2": square(values["P2"].reshape(3, 4)), "lidar2cam": r0 @ square(values["Tr_velo_to_cam"].reshape(3, 4))}


def place_objects(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Non-overlapping (kind, [x, y, z_bottom, l, w, h, yaw]) in the lidar frame, most inside the camera's view."""
    from autoexport.samples import _OBJECT_SIZES, _SENSOR_HEIGHT

    placed: list[tuple[str, np.ndarray]] = []
    for _ in range(int(rng.integers(4, 16))):
        kind = str(rng.choice(list(KIND_PROBABILITY), p=list(KIND_PROBABILITY.values())))
        size = np.array(_OBJECT_SIZES[kind]) * rng.uniform(0.9, 1.1, 3)
        for _attempt in range(20):
            x = rng.uniform(3.0, 68.0)
            y = rng.uniform(-1.15, 1.15) * x * np.tan(HALF_FOV)  # a few just outside the view
            if abs(y) > 38.0:
                continue
            radius = np.hypot(size[0], size[1]) / 2
            if all(np.hypot(x - b[0], y - b[1]) > radius + np.hypot(b[3], b[4]) / 2 + 0.3 for _, b in placed):
                z = -_SENSOR_HEIGHT + 0.02 * x / 50.0
                placed.append((kind, np.array([x, y, z, *size, rng.uniform(-np.pi, np.pi)])))
                break
    return placed


def object_surface(rng: np.random.Generator, count: int, box: np.ndarray, front_lower: bool) -> np.ndarray:
    """Points on a box's sides and roof ([x, y, z_bottom, l, w, h, yaw]); with front_lower, the front part of the
    length (local +x, the heading) is squashed to FRONT_HEIGHT of the height."""
    from autoexport.samples import _sample_box_surface

    local = _sample_box_surface(rng, count, np.zeros(3), tuple(box[3:6]), 0.0).astype(np.float64)
    if front_lower:
        front = local[:, 0] > box[3] * (0.5 - FRONT_FRACTION)
        local[front, 2] *= FRONT_HEIGHT
    c, s = np.cos(box[6]), np.sin(box[6])
    return (local @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T + box[:3]).astype(np.float32)


def scene_cloud(rng: np.random.Generator, objects: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Ground, walls, poles, unlabelled boxes and the objects' surfaces, as KITTI's [N, 4] x y z intensity."""
    from autoexport.samples import _sample_ground

    pc = [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]
    parts = [_sample_ground(rng, int(rng.integers(9000, 14000)), pc)]
    intensity = [rng.uniform(0.05, 0.35, len(parts[0]))]
    n_walls = int(rng.integers(1500, 3000))
    side = rng.choice([-1.0, 1.0], n_walls)
    wall = np.stack([rng.uniform(0, 70, n_walls), side * rng.uniform(22, 38, n_walls), rng.uniform(-1.73, 3.0, n_walls)], 1)
    poles = _sample_ground(rng, 10, pc)[:, :2]
    which, angle = rng.integers(0, 10, 600), rng.uniform(0, 2 * np.pi, 600)
    pole = np.stack([poles[which, 0] + 0.12 * np.cos(angle), poles[which, 1] + 0.12 * np.sin(angle),
                     rng.uniform(-1.73, 2.5, 600)], 1)
    parts += [wall.astype(np.float32), pole.astype(np.float32)]
    intensity += [rng.uniform(0.1, 0.6, n_walls + 600)]
    clutter = [("clutter", np.array([*_sample_ground(rng, 1, pc)[0], *rng.uniform([0.5, 0.5, 0.4], [3.0, 1.5, 1.5]),
                                     rng.uniform(-np.pi, np.pi)])) for _ in range(int(rng.integers(3, 9)))]
    for kind, box in objects + clutter:
        distance = max(np.hypot(box[0], box[1]), 3.0)
        length, width, height = box[3:6]
        area = length * height + width * height + length * width
        count = int(np.clip(POINTS_AT_10_M_PER_M2 * area * (10.0 / distance) ** 2, 4, 4000))
        parts.append(object_surface(rng, count, box, front_lower=kind != "clutter"))
        intensity.append(rng.uniform(0.2, 0.95, count))
    xyz = np.concatenate(parts)
    cloud = np.concatenate([xyz, np.concatenate(intensity)[:, None]], 1).astype(np.float32)
    return cloud[rng.permutation(len(cloud))]


def label_lines(objects: list[tuple[str, np.ndarray]], calib: dict[str, np.ndarray]) -> list[str]:
    """KITTI label_2 lines for the objects the camera sees (box centre projects into the image)."""
    import torch
    from mmdet3d.structures import Box3DMode, LiDARInstance3DBoxes, points_cam2img

    if not objects:
        return []
    lidar = LiDARInstance3DBoxes(torch.tensor(np.stack([b for _, b in objects]), dtype=torch.float32))
    cam = lidar.convert_to(Box3DMode.CAM, rt_mat=torch.tensor(calib["lidar2cam"], dtype=torch.float32))
    corners = points_cam2img(cam.corners.reshape(-1, 3), torch.tensor(calib["P2"][:3], dtype=torch.float32))
    corners = corners.reshape(-1, 8, 2).numpy()
    centres = points_cam2img(cam.gravity_center, torch.tensor(calib["P2"][:3], dtype=torch.float32)).numpy()
    height, width = IMAGE_SHAPE
    lines = []
    for (kind, _), box, uv, centre in zip(objects, cam.tensor.numpy(), corners, centres):
        x, y, z, length, height_3d, width_3d, ry = box  # camera boxes: (l, h, w) sizes, yaw about y
        if z < 1.0 or not (0 <= centre[0] < width and 0 <= centre[1] < height):
            continue
        full = [uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()]
        clipped = [max(full[0], 0), max(full[1], 0), min(full[2], width - 1), min(full[3], height - 1)]
        area = lambda b: max(b[2] - b[0], 0) * max(b[3] - b[1], 0)  # noqa: E731
        truncated = 1.0 - area(clipped) / max(area(full), 1e-6)
        alpha = ry - np.arctan2(x, z)
        lines.append(f"{CLASS_OF_KIND[kind]} {truncated:.2f} 0 {alpha:.2f} "
                     + " ".join(f"{v:.2f}" for v in clipped)
                     + f" {height_3d:.2f} {width_3d:.2f} {length:.2f} {x:.2f} {y:.2f} {z:.2f} {ry:.2f}")
    return lines


def plane_line(calib: dict[str, np.ndarray]) -> str:
    """The ground plane (z = -1.73 + 0.0004 x in the lidar frame) as KITTI's planes/*.txt: a b c d, camera frame."""
    from autoexport.samples import _SENSOR_HEIGHT

    normal_lidar, offset_lidar = np.array([-0.02 / 50.0, 0.0, 1.0]), _SENSOR_HEIGHT
    rotation, translation = calib["lidar2cam"][:3, :3], calib["lidar2cam"][:3, 3]
    normal = rotation @ normal_lidar
    offset = offset_lidar - normal @ translation
    scale = np.linalg.norm(normal)
    return " ".join(f"{v:.6e}" for v in (*(normal / scale), offset / scale))


def write_frame(args: tuple[Path, int, int]) -> int:
    root, index, seed = args
    rng = np.random.default_rng([seed, index])
    objects = place_objects(rng)
    name = f"{index:06d}"
    scene_cloud(rng, objects).tofile(root / "training" / "velodyne" / f"{name}.bin")
    (root / "training" / "calib" / f"{name}.txt").write_text(CALIB_TEXT.replace("\\\n", ""))
    calib = calibration()
    (root / "training" / "planes" / f"{name}.txt").write_text(f"# Plane\nWidth 4\nHeight 1\n{plane_line(calib)}\n")
    lines = label_lines(objects, calib)
    (root / "training" / "label_2" / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    os.link(root / "blank.png", root / "training" / "image_2" / f"{name}.png")
    return len(lines)


def write_raw(root: Path, n_train: int, n_val: int, seed: int, workers: int, val_only: bool = False) -> None:
    from PIL import Image

    for sub in ("velodyne", "calib", "label_2", "image_2", "planes", "velodyne_reduced"):
        (root / "training" / sub).mkdir(parents=True, exist_ok=True)
    (root / "testing" / "velodyne_reduced").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets").mkdir(exist_ok=True)
    Image.new("RGB", IMAGE_SHAPE[::-1]).save(root / "blank.png")
    ids = list(range(n_train if val_only else 0, n_train + n_val))  # frame i's scene depends on (seed, i) only
    start = time.perf_counter()
    with Pool(workers) as pool:
        labelled = 0
        for done, count in enumerate(pool.imap(write_frame, [(root, i, seed) for i in ids], chunksize=16), 1):
            labelled += count
            if done % 200 == 0 or done == len(ids):
                print(f"[synthetic-kitti] 1/2 frames {done}/{len(ids)} ({labelled} labelled objects, "
                      f"{time.perf_counter() - start:.0f} s)", flush=True)
    train, val = [i for i in ids if i < n_train], [i for i in ids if i >= n_train]
    split = {"train": train, "val": val, "trainval": ids, "test": []}
    for name, members in split.items():
        (root / "ImageSets" / f"{name}.txt").write_text("".join(f"{i:06d}\n" for i in members))


def run_create_data(root: Path, with_train: bool = True) -> None:
    """mmdet3d's tools/create_data.py kitti steps (kitti_data_prep), called one by one."""
    import mmdet3d
    from mmdet3d.utils import register_all_modules

    register_all_modules()  # the ground-truth database builds KittiDataset with its pipeline, as create_data does
    sys.path.insert(0, str(Path(mmdet3d.__file__).parent / ".mim"))  # the wheel's copy of mmdet3d's tools/
    from tools.dataset_converters import kitti_converter as kitti
    from tools.dataset_converters.create_gt_database import create_groundtruth_database
    from tools.dataset_converters.update_infos_to_v2 import update_pkl_infos

    print("[synthetic-kitti] 2/2 mmdet3d create_data kitti: infos, reduced clouds, v2 update, gt database", flush=True)
    kitti.create_kitti_info_file(str(root), "kitti", True)  # with_plane: ObjectSample puts samples on the ground
    kitti.create_reduced_point_cloud(str(root), "kitti")
    for split in ("train", "val") if with_train else ("val",):  # test is empty; trainval would repeat the work
        update_pkl_infos("kitti", out_dir=str(root), pkl_path=str(root / f"kitti_infos_{split}.pkl"))
    for split in ("trainval", "test") if with_train else ("trainval", "test", "train"):
        (root / f"kitti_infos_{split}.pkl").unlink()
    if not with_train:
        return
    create_groundtruth_database("KittiDataset", str(root), "kitti", "kitti_infos_train.pkl", relative_path=False,
                                mask_anno_path="instances_train.json", with_mask=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=250)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--val-only", action="store_true",
                        help="write only the held-out frames (the same scenes as a full run with these --train/--val)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"error: {args.out} is not empty; give a new folder")
    write_raw(args.out, args.train, args.val, args.seed, args.workers, args.val_only)
    run_create_data(args.out, with_train=not args.val_only)
    print(f"[synthetic-kitti] done: {args.out}", flush=True)


if __name__ == "__main__":
    main()
