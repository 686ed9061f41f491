#!/usr/bin/env bash
# Trains a zoo config on the synthetic KITTI-format set on a GPU machine without network access, with mmdet3d's own
# runner: builds mmcv's CUDA ops (scripts/gpu_mmcv_build.sh), writes the data set once per machine
# (benchmarks/synthetic_kitti.py: KITTI's layout plus mmdet3d's create_data steps), then trains
# (benchmarks/train_kitti_synthetic.py) and saves fp16 weights to RESULT_DIR.
#
# WHEELS holds what scripts/gpu_mmcv_reference.sh lists, plus mmdet 3.3.0, mmdet3d 1.4.0 and what they import
# (pycocotools, shapely, terminaltables, trimesh, plyfile, pyquaternion, lyft_dataset_sdk, nuscenes-devkit, cachetools,
# descartes; pip download --no-deps for the GPU machine's Python).
#
#   bash scripts/gpu_train_synthetic.sh WHEELS RESULT_DIR EPOCHS    (EPOCHS 0: build and write the data only)
set -euo pipefail
# shellcheck source=scripts/gpu_mmcv_build.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_mmcv_build.sh" "${1:?usage: gpu_train_synthetic.sh WHEELS RESULT_DIR EPOCHS}" "${2:?}"
EPOCHS="${3:?}"
DATA="${SYNTHETIC_KITTI_DIR:-/tmp/kitti_synthetic}"
cd "$REPO"
if [ ! -f "$DATA/.complete" ]; then
    log "data: ${TRAIN_FRAMES:-3000} training and ${VAL_FRAMES:-250} held-out frames into $DATA"
    rm -rf "$DATA"
    python3 benchmarks/synthetic_kitti.py --out "$DATA" --train "${TRAIN_FRAMES:-3000}" --val "${VAL_FRAMES:-250}" \
        >"$RESULTS/synthetic_kitti.log" 2>&1 || { tail -30 "$RESULTS/synthetic_kitti.log"; exit 1; }
    grep "^\[synthetic-kitti\]" "$RESULTS/synthetic_kitti.log"
    touch "$DATA/.complete"
fi
[ "$EPOCHS" = 0 ] && exit 0
log "train: ${CONFIG:-pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class}, $EPOCHS epochs"
python3 benchmarks/train_kitti_synthetic.py --config "${CONFIG:-pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class}" \
    --data "$DATA" --epochs "$EPOCHS" --workers "${WORKERS:-12}" --work-dir /tmp/train_work \
    --out "$RESULTS/${OUT_NAME:-pointpillars_kitti_synthetic.pth}" 2>&1 | tee "$RESULTS/train.log" \
    | grep --line-buffered -E "Epoch\(train\).*\[[0-9]+\]\[(50|100|150|200)/|\[train\]|Error|error:"
