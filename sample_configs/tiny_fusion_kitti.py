# A camera + lidar fusion model defined outside mmdet3d, as a user's project would be (cf. mmdet3d's
# projects/BEVFusion): `custom_imports` loads sample_configs/custom_modules/tiny_fusion.py, which registers
# TinyFusionDetector and CameraBEVLift into mmdet3d's MODELS. autoexport puts the config's folder on sys.path.
# Everything else is registry components: PointPillars' pillar encoder and scatter, an mmdet ResNet-18, SECOND,
# SECONDFPN and Anchor3DHead. The camera branch reads lidar2img from the metainfo, so the export takes it as an input.
custom_imports = dict(imports=["custom_modules.tiny_fusion"], allow_failed_imports=False)
default_scope = "mmdet3d"

point_cloud_range = [0, -39.68, -3, 69.12, 39.68, 1]
voxel_size = [0.32, 0.32, 4]
grid_size = [216, 248]  # (x, y) cells of the BEV canvas
class_names = ["Car"]

model = dict(
    type="TinyFusionDetector",
    data_preprocessor=dict(
        type="Det3DDataPreprocessor",
        voxel=True,
        voxel_layer=dict(max_num_points=32, point_cloud_range=point_cloud_range, voxel_size=voxel_size,
                         max_voxels=(16000, 40000)),
        mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32),
    img_backbone=dict(type="mmdet.ResNet", depth=18, num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(1,),
                      frozen_stages=-1,
                      norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True, style="pytorch"),
    camera_lift=dict(type="CameraBEVLift", in_channels=128, out_channels=64, point_cloud_range=point_cloud_range,
                     grid_size=grid_size, height=-1.0, feature_stride=8),
    pts_voxel_encoder=dict(type="PillarFeatureNet", in_channels=4, feat_channels=[64], with_distance=False,
                           voxel_size=voxel_size, point_cloud_range=point_cloud_range),
    pts_middle_encoder=dict(type="PointPillarsScatter", in_channels=64, output_shape=[grid_size[1], grid_size[0]]),
    pts_backbone=dict(type="SECOND", in_channels=128, layer_nums=[1, 2, 2], layer_strides=[2, 2, 2],
                      out_channels=[64, 128, 256]),
    pts_neck=dict(type="SECONDFPN", in_channels=[64, 128, 256], upsample_strides=[1, 2, 4],
                  out_channels=[128, 128, 128]),
    pts_bbox_head=dict(
        type="Anchor3DHead",
        num_classes=1,
        in_channels=384,
        feat_channels=384,
        use_direction_classifier=True,
        anchor_generator=dict(type="AlignedAnchor3DRangeGenerator",
                              ranges=[[0, -39.68, -1.78, 69.12, 39.68, -1.78]], sizes=[[3.9, 1.6, 1.56]],
                              rotations=[0, 1.57], reshape_out=True),
        diff_rad_by_sin=True,
        bbox_coder=dict(type="DeltaXYZWLHRBBoxCoder"),
        loss_cls=dict(type="mmdet.FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type="mmdet.SmoothL1Loss", beta=1.0 / 9.0, loss_weight=2.0),
        loss_dir=dict(type="mmdet.CrossEntropyLoss", use_sigmoid=False, loss_weight=0.2)),
    test_cfg=dict(use_rotate_nms=True, nms_across_levels=False, nms_thr=0.01, score_thr=0.1, min_bbox_size=0,
                  nms_pre=100, max_num=50),
)

test_pipeline = [
    dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=4, use_dim=4),
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(640, 192), keep_ratio=True),
    dict(type="PointsRangeFilter", point_cloud_range=point_cloud_range),
    dict(type="Pack3DDetInputs", keys=["points", "img"]),
]
test_dataloader = dict(
    batch_size=1,
    dataset=dict(type="KittiDataset", data_root="data/kitti/", ann_file="kitti_infos_val.pkl",
                 data_prefix=dict(pts="training/velodyne_reduced", img="training/image_2"), pipeline=test_pipeline,
                 modality=dict(use_lidar=True, use_camera=True), test_mode=True, metainfo=dict(classes=class_names),
                 box_type_3d="LiDAR"))
