#!/usr/bin/env bash
# Sourced by the GPU scripts: installs the carried pure-Python wheels into $SITE, builds mmcv 2.1.0's CUDA ops once
# per machine (about 5 minutes with 16 cores for one architecture) and leaves PYTHONPATH pointing at both.
# See scripts/gpu_mmcv_reference.sh for what WHEELS must hold.
#   source scripts/gpu_mmcv_build.sh WHEELS RESULT_DIR
WHEELS="$(cd "${1:?usage: source gpu_mmcv_build.sh WHEELS RESULT_DIR}" && pwd)"
RESULTS="$(mkdir -p "${2:-gpu-results}" && cd "${2:-gpu-results}" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${MMCV_BUILD_DIR:-/tmp/mmcv-cuda}"
SITE="$BUILD/site"
log() { echo "[gpu-mmcv] $(date +%H:%M:%S) $*"; }

log "1/4 pure-Python dependencies into $SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$BUILD/mmcv-2.1.0:$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -f "$BUILD/mmcv-2.1.0/.built" ]; then
    log "2/4 mmcv 2.1.0 CUDA ops for $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')"
    rm -rf "$BUILD/mmcv-2.1.0" && tar xzf "$WHEELS/mmcv-2.1.0.tar.gz" -C "$BUILD"
    build_path="$PYTHONPATH"
    if ! python3 -c "import pkg_resources" 2>/dev/null; then  # mmcv's setup.py imports it
        python3 -m pip install -q --no-index --no-deps --target "$BUILD/setuptools" "$WHEELS"/build/setuptools-*.whl
        build_path="$BUILD/setuptools:$build_path"
    fi
    arch="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
    (cd "$BUILD/mmcv-2.1.0" && PYTHONPATH="$build_path" MMCV_WITH_OPS=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" \
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" python3 setup.py build_ext --inplace >"$RESULTS/mmcv_build.log" 2>&1) || {
        grep -m 20 -E "error|Error" "$RESULTS/mmcv_build.log" || tail -40 "$RESULTS/mmcv_build.log"
        log "mmcv build failed (log: $RESULTS/mmcv_build.log)"; exit 1; }
    touch "$BUILD/mmcv-2.1.0/.built"
fi

log "3/4 mmcv.ops imports with CUDA kernels"
python3 -c "import mmcv, mmcv.ops, torch; from mmcv.utils import ext_loader; \
print('mmcv', mmcv.__version__, 'ext', ext_loader.load_ext('_ext', ['furthest_point_sampling_forward']).__file__, \
'torch', torch.__version__)"
