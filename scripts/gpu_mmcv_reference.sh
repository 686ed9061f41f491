#!/usr/bin/env bash
# Builds mmcv 2.1.0's CUDA ops on a GPU machine and compares autoexport's op library with them
# (python -m autoexport.ops.gpu_check --reference mmcv).
#
# For a GPU machine without network access: fetch these on a machine that has it, then carry the folder along.
#   WHEELS/mmcv-2.1.0.tar.gz           pip download --no-deps --no-binary :all: mmcv==2.1.0
#   WHEELS/*.whl                       mmengine==0.10.7 addict yapf termcolor platformdirs (pure Python)
#   WHEELS/build/setuptools-69*.whl    only where the GPU Python's setuptools lacks pkg_resources (mmcv's setup.py)
# torch, numpy, opencv, onnxscript, ninja and nvcc are taken from the GPU machine.
#
#   bash scripts/gpu_mmcv_reference.sh WHEELS [RESULT_DIR]
# Stages print "[gpu-mmcv] ..." lines; the CUDA build log goes to RESULT_DIR/mmcv_build.log (about 5 minutes with
# 16 cores for one architecture). The comparison table goes to RESULT_DIR/gpu_check_mmcv.{txt,json}.
set -euo pipefail
# shellcheck source=scripts/gpu_mmcv_build.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_mmcv_build.sh" "${1:?usage: gpu_mmcv_reference.sh WHEELS [RESULT_DIR]}" "${2:-gpu-results}"

log "4/4 autoexport.ops on CUDA against mmcv's CUDA kernels"
cd "$REPO"
python3 -m autoexport.ops.gpu_check --reference mmcv --json "$RESULTS/gpu_check_mmcv.json" \
    | tee "$RESULTS/gpu_check_mmcv.txt"
