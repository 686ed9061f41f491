"""Shared fixtures. Exports of real models are made once per test module or once per test run: each takes tens
of seconds."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
warnings.filterwarnings("ignore")

KITTI_PP = "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class"
NUS_PP = "pointpillars_hv_secfpn_sbn-all_8xb4-2x_nus-3d"
CENTERPOINT_PILLAR = "centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d"
# The custom_imports camera + lidar fusion sample (a model defined outside mmdet3d).
FUSION_SAMPLE = str(Path(__file__).resolve().parents[1] / "sample_configs" / "tiny_fusion_kitti.py")


def export_to(config: str, output_dir: Path, *extra: str) -> int:
    from autoexport.cli import main

    return main(["--config", config, "--output-dir", str(output_dir), *extra])


@pytest.fixture(scope="session")
def kitti_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Lowered too: IREE for the CPU here, IREE for CUDA (compiled, not run: no GPU) and AOTInductor for the CPU;
    # IREE with static padded inputs (the CenterPoint test covers IREE with dynamic shapes).
    out = tmp_path_factory.mktemp("exports") / "pp_kitti"
    assert export_to(KITTI_PP, out, "--format", "both", "--backend", "iree", "--backend", "iree:cuda",
                     "--backend", "aoti", "--capacity", "auto") == 0
    return out
