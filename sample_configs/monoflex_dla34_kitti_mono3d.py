# MonoFlex (Zhang et al., "Objects are Different", CVPR 2021) on KITTI mono3d: SMOKE's DLA-34 backbone and DLANeck
# with mmdet3d's MonoFlexHead and MonoFlexCoder. mmdet3d 1.4 ships the head and the coder but no MonoFlex config (its
# metafile names monoflex_dla34_pytorch_dlaneck_gn-all_2x4_6x_kitti-mono3d.py, which was never released), so this is
# one built from registry components; the head settings are those of mmdet3d's own MonoFlexHead unit test
# (tests/test_models/test_dense_heads/test_monoflex_head.py): 8 regression groups (2D box, 2D offset, 10 keypoints,
# 3 dimensions, 3 orientations' worth of bins, 8 + 8 direction bins and residuals, depth, depth uncertainty) and edge
# fusion on the 2D offsets. MonoFlexHead.forward needs the image metas, which mmdet3d's detectors never pass it
# (its `predict` fails in mmdet3d itself); autoexport's tensor path passes them (autoexport/models/monoflex_head.py: takes_image_metas).
PI = 3.141592653589793  # a config with imports is parsed in mmengine's lazy mode, which `_base_` cannot mix with

_base_ = ["mmdet3d::smoke/smoke_dla34_dlaneck_gn-all_4xb8-6x_kitti-mono3d.py"]

model = dict(
    type="SingleStageMono3DDetector",
    backbone=dict(init_cfg=None),  # the base config's ImageNet weights are a download; random weights need none
    bbox_head=dict(
        _delete_=True,
        type="MonoFlexHead",
        num_classes=3,
        in_channels=64,
        use_edge_fusion=True,
        edge_fusion_inds=[(1, 0)],
        edge_heatmap_ratio=1 / 8,
        stacked_convs=0,
        feat_channels=64,
        use_direction_classifier=False,
        diff_rad_by_sin=False,
        pred_attrs=False,
        pred_velo=False,
        dir_offset=0,
        strides=None,
        group_reg_dims=((4,), (2,), (20,), (3,), (3,), (8, 8), (1,), (1,)),
        cls_branch=(256,),
        reg_branch=((256,), (256,), (256,), (256,), (256,), (256,), (256,), (256,)),
        num_attrs=0,
        bbox_code_size=7,
        dir_branch=(),
        attr_branch=(),
        bbox_coder=dict(
            type="MonoFlexCoder",
            depth_mode="exp",
            base_depth=(26.494627, 16.05988),
            depth_range=[0.1, 100],
            combine_depth=True,
            uncertainty_range=[-10, 10],
            base_dims=((3.8840, 1.5261, 1.6286, 0.4259, 0.1367, 0.1022),
                       (0.8423, 1.7607, 0.6602, 0.2349, 0.1133, 0.1427),
                       (1.7635, 1.7372, 0.5968, 0.1766, 0.0948, 0.1242)),
            dims_mode="linear",
            multibin=True,
            num_dir_bins=4,
            bin_centers=[0, PI / 2, PI, -PI / 2],
            bin_margin=PI / 6,
            code_size=7),
        conv_bias=True,
        dcn_on_last_conv=False),
)
