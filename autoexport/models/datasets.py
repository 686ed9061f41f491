"""Dataset classes: the camera rig of synthesized camera samples. Nominal values of each dataset's sensor setup:
KITTI's CAM2 (P2 of a typical drive), nuScenes' six 1600x900 cameras at their mounting yaws, SUN RGB-D's Kinect v2
frame (730x530; depth frame x right, y forward, z up, so the camera looks along +y)."""

from __future__ import annotations

from ..camera import CameraRig, CameraSpec
from ..knowledge import register


register("KittiDataset", camera_rig=CameraRig((
    CameraSpec("CAM2", 1242, 375, 721.54, (609.56, 172.85), 0.0, (0.27, 0.0, -0.08)),)))
register("NuScenesDataset", camera_rig=CameraRig(tuple(
    CameraSpec(name, 1600, 900, 1266.4, (816.3, 491.5), yaw, (0.5, 0.0, -0.3))
    for name, yaw in (("CAM_FRONT", 0.0), ("CAM_FRONT_RIGHT", -55.0), ("CAM_FRONT_LEFT", 55.0),
                      ("CAM_BACK", 180.0), ("CAM_BACK_LEFT", 110.0), ("CAM_BACK_RIGHT", -110.0))), ".jpg"))
register("SUNRGBDDataset", camera_rig=CameraRig((
    CameraSpec("CAM0", 730, 530, 529.5, (365.0, 265.0), 90.0),), ".jpg", point_frame="depth"))
