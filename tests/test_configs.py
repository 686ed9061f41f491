from pathlib import Path

import pytest

from autoexport.configs import bundled_configs, resolve_config
from autoexport.errors import UserInputError


def test_bundled_name_resolves_to_the_wheel_config():
    path = resolve_config("pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class")
    assert path.is_file() and path.name == "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py"
    assert resolve_config("pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py") == path


def test_bundled_configs_exclude_bases():
    configs = bundled_configs()
    assert len(configs) > 100  # 233 files in the wheel, about 90 of them _base_ fragments
    assert not any("_base_" in p.parts for p in configs.values())


def test_path_to_a_config_file(tmp_path: Path):
    cfg = tmp_path / "mine.py"
    cfg.write_text("model = dict(type='VoxelNet')\n")
    assert resolve_config(str(cfg)) == cfg.resolve()


def test_unknown_name_lists_close_matches():
    with pytest.raises(UserInputError) as err:
        resolve_config("pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3clas")
    message = str(err.value)
    assert "did you mean" in message and "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class" in message


def test_missing_file_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserInputError, match="no file"):
        resolve_config(str(tmp_path / "nope" / "model.py"))


def test_bundled_sample_config_inherits_from_the_mmdet3d_wheel():
    from autoexport.analyze import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(resolve_config(str(root / "sample_configs" / "pointpillars_kitti_3class.py")))
    assert cfg.model.type == "VoxelNet"
    assert cfg.model.data_preprocessor.voxel_layer.max_num_points == 32
