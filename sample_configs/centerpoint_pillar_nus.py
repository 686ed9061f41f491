# A user's own config: mmdet3d's CenterPoint (pillar 0.2 m, nuScenes, 10 sweeps) inherited from the installed
# mmdet3d package. Six task heads, 36 outputs; the same voxel pipeline as PointPillars.
_base_ = ["mmdet3d::centerpoint/centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d.py"]
