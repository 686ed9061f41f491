# A user's own config: mmdet3d's PointPillars KITTI 3-class model, inherited from the installed
# mmdet3d package (mmengine resolves "mmdet3d::" against the wheel's bundled configs).
# Edit anything below as you would in a training config; autoexport reads the model, the
# data preprocessor (voxelization) and the test pipeline from it.
_base_ = ["mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py"]
