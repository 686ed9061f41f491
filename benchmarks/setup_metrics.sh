#!/usr/bin/env bash
# What the accuracy benchmarks need beyond the exporter (scripts/setup.sh): mmdet3d.evaluation imports the Lyft and
# nuScenes SDKs when it is imported, and KITTI's create_data reads images with scikit-image. The SDKs pin old numpy
# and shapely releases they do not need for mmdet3d's metrics, so they go in with --no-deps.
set -euo pipefail
PY="${PYTHON:-python3}"
"$PY" -m pip install --disable-pip-version-check --no-deps lyft_dataset_sdk==0.0.8 nuscenes-devkit==1.2.0
"$PY" -m pip install --disable-pip-version-check pandas scikit-learn scikit-image cachetools descartes pyquaternion shapely
"$PY" -c "from mmdet3d.evaluation.metrics import KittiMetric; import skimage; print('[setup-metrics] ok')"
