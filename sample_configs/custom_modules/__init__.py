"""Modules that sample configs import through `custom_imports`, as a user's project would (e.g. mmdet3d's
projects/BEVFusion). Not configs themselves: CI exports only the top-level sample_configs/*.py."""
