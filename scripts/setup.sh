#!/usr/bin/env bash
# Installs the autoexport stack into the current Python (or $PYTHON).
# Order matters: torch 2.13.0 (CPU wheel) must be present before anything that
# depends on torch, otherwise pip pulls a multi-GB CUDA build. mmcv 2.1.0 exists
# only as a source archive and is built against that torch with its C++ ops.
# Idempotent: steps whose packages are already installed at the right version are skipped.
set -euo pipefail
PY="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }
have() { "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(0 if version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)  # 2.13.0+cpu is 2.13.0
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}
step() { echo "[setup] $*"; }

step "1/5 torch 2.13.0 (CPU)"
have torch 2.13.0 || pip_install torch==2.13.0

step "2/5 mmcv 2.1.0 with ops (source build, ~15 min the first time on 2 cores; pip caches the wheel)"
pip_install "setuptools<70" wheel ninja "numpy<2.4" addict "mmengine==0.10.7" opencv-python-headless Pillow pyyaml yapf packaging
if ! "$PY" -c "import mmcv, mmcv.ops" 2>/dev/null || ! have mmcv 2.1.0; then
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" pip_install --no-build-isolation mmcv==2.1.0
fi

step "3/5 mmdet 3.3.0 and mmdet3d 1.4.0 (--no-deps: their declared deps pull nuscenes-devkit, which fails offline)"
have mmdet 3.3.0 || pip_install --no-deps mmdet==3.3.0
have mmdet3d 1.4.0 || pip_install --no-deps mmdet3d==1.4.0
pip_install shapely terminaltables scipy pycocotools numba six trimesh plyfile tqdm pyquaternion

step "4/5 export and runtime stack"
pip_install onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1 \
    iree-base-compiler==3.13.0 iree-base-runtime==3.13.0 \
    pytorch-quantization==2.1.3 absl-py prettytable

step "5/5 autoexport itself (editable) and test tools"
pip_install --no-deps -e "$HERE"
pip_install pytest ruff==0.17.6 matplotlib
"$PY" -c "import torch, mmcv.ops, mmdet3d, onnxruntime, iree.runtime; print('[setup] ok: torch', torch.__version__, 'mmdet3d', mmdet3d.__version__)"
