"""Bad input: a clear one-paragraph message, exit code 2, and no output directory left behind."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import KITTI_PP, NUS_PP, export_to

SAMPLE_CONFIGS = Path(__file__).resolve().parents[1] / "sample_configs"


def _no_output(out: Path) -> None:
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p == out]
    assert leftovers == [], f"left behind: {leftovers}"


def test_unknown_config_name(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    out = tmp_path / "out"
    assert export_to("pointpilars_hv_secfpn_8xb6-160e_kitti-3d-3class", out) == 2
    assert "unknown config" in caplog.text and KITTI_PP in caplog.text
    _no_output(out)


def test_missing_config_file(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    out = tmp_path / "out"
    assert export_to(str(tmp_path / "configs" / "missing.py"), out) == 2
    assert "no file" in caplog.text
    _no_output(out)


def test_checkpoint_of_another_model_reports_key_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from autoexport.analyze import build_model, load_config
    from autoexport.configs import resolve_config

    other = build_model(load_config(resolve_config(NUS_PP)), "cpu", 0)
    ckpt = tmp_path / "nus.pth"
    torch.save({"state_dict": other.state_dict(), "meta": {}}, ckpt)
    out = tmp_path / "out"
    assert export_to(KITTI_PP, out, "--checkpoint", str(ckpt)) == 2
    assert "does not fit PointPillars" in caplog.text or "does not fit VoxelNet" in caplog.text
    assert "missing keys" in caplog.text and "unexpected keys" in caplog.text
    _no_output(out)


def test_unreadable_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    ckpt = tmp_path / "garbage.pth"
    ckpt.write_bytes(b"not a checkpoint at all")
    out = tmp_path / "out"
    assert export_to(KITTI_PP, out, "--checkpoint", str(ckpt)) == 2
    assert "not a readable PyTorch checkpoint" in caplog.text
    _no_output(out)


def test_sample_of_the_wrong_format(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    sample = tmp_path / "nus_style.bin"
    np.ones((1001, 5), np.float32).tofile(sample)  # nuScenes rows (5 floats) given to a 4-float KITTI model
    out = tmp_path / "out"
    assert export_to(KITTI_PP, out, "--sample", str(sample)) == 2
    assert "16-byte rows" in caplog.text
    _no_output(out)


def test_existing_output_dir_is_refused_without_overwrite(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_to(KITTI_PP, out) == 2
    assert "--overwrite" in caplog.text
    assert (out / "keep.txt").read_text() == "mine"


def test_model_that_cannot_run_names_module_and_op(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch):
    """An op with no CPU kernel in mmcv 2.1.0 and no substitution: VoteNet's furthest point sampling with the
    point-op substitutions unregistered. Exit 3, the module, the op, what to do."""
    from autoexport import patches

    monkeypatch.setattr(patches, "OP_FUNCTION_SUBSTITUTIONS", [])
    out = tmp_path / "out"
    assert export_to("votenet_8xb8_scannet-3d", out) == 3
    assert "DFPSSampler" in caplog.text and "furthest_point_sample" in caplog.text
    assert "no CPU kernel" in caplog.text and "what to do" in caplog.text
    assert "Traceback" not in caplog.text
    _no_output(out)


def test_pretrained_backbone_download_is_skipped():
    from autoexport.analyze import drop_pretrained_init

    cfg = {"pts_backbone": {"type": "NoStemRegNet", "init_cfg": {"type": "Pretrained", "checkpoint": "open-mmlab://regnetx_400mf"}},
           "img_backbone": {"init_cfg": [{"type": "Kaiming"}, {"type": "Pretrained", "checkpoint": "x.pth"}]},
           "pretrained": "torchvision://resnet50"}
    dropped: list[str] = []
    drop_pretrained_init(cfg, dropped)
    assert cfg["pts_backbone"]["init_cfg"] is None and cfg["pretrained"] is None
    assert cfg["img_backbone"]["init_cfg"] == [{"type": "Kaiming"}]
    assert len(dropped) == 3


def test_eager_failure_of_the_model_itself_is_not_called_an_export_problem(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture):
    """A head whose input channels do not match the neck's fails in its own forward, before torch.export: exit 3,
    said as such, with the module and the failing mmdet3d line."""
    bad = tmp_path / "pp_head_channels.py"
    bad.write_text(f"_base_ = [{str(SAMPLE_CONFIGS / 'pointpillars_kitti_3class.py')!r}]\n"
                   "model = dict(bbox_head=dict(in_channels=100, feat_channels=100))\n")
    out = tmp_path / "out"
    assert export_to(str(bad), out) == 3
    assert "the eager PyTorch run on cpu failed" in caplog.text
    assert "the model's own forward failed in eager PyTorch" in caplog.text
    assert "anchor3d_head.py" in caplog.text and "could not trace" not in caplog.text
    _no_output(out)


def test_data_preprocessor_failure_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A data preprocessor that raises (here a config's unknown voxel_type) was a crash with a traceback: now exit 3
    naming the preprocessor, the sample, the exception and the mmdet3d line."""
    bad = tmp_path / "pp_typo.py"
    bad.write_text(f"_base_ = [{str(SAMPLE_CONFIGS / 'pointpillars_kitti_3class.py')!r}]\n"
                   "model = dict(data_preprocessor=dict(voxel_type='hrad'))\n")
    out = tmp_path / "out"
    assert export_to(str(bad), out) == 3
    assert "the data preprocessor (Det3DDataPreprocessor) failed on sample sample_0 (synthesized) on cpu" in caplog.text
    assert "ValueError: Invalid voxelization type hrad" in caplog.text and "data_preprocessor.py:" in caplog.text
    assert "Traceback" not in caplog.text
    _no_output(out)


def test_data_preprocessor_moving_tensors_to_cuda_gets_the_device_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture):
    """mmdet3d's minkunet voxelization calls .cuda() itself. autoexport's registered patch keeps it on the CPU;
    without it (as for any preprocessor written that way) the error says to run on a CUDA machine."""
    from autoexport.knowledge import KNOWLEDGE

    out = tmp_path / "out"
    with KNOWLEDGE.overridden("Det3DDataPreprocessor"):  # no patches for it
        assert export_to("minkunet34_w32_spconv_8xb2-laser-polar-mix-3x_semantickitti", out) == 3
    assert "the data preprocessor (Det3DDataPreprocessor) failed on sample sample_0 (synthesized) on cpu" in caplog.text
    assert "data_preprocessor.py:" in caplog.text and ".cuda()" in caplog.text
    assert "run on a CUDA machine (--device cuda)" in caplog.text and "Traceback" not in caplog.text
    _no_output(out)


def test_model_needing_an_uninstalled_library_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """FCAF3D imports MinkowskiEngine inside its backbone's __init__ (ImportError, was a crash); MinkUNet asserts
    torchsparse. Both say which library is missing."""
    for config, library in (("fcaf3d_2xb8_s3dis-3d-5class", "MinkowskiEngine"),
                            ("minkunet18_w16_torchsparse_8xb2-amp-15e_semantickitti", "Torchsparse")):
        caplog.clear()
        out = tmp_path / config
        assert export_to(config, out) == 2
        assert "needs a library that is not installed here" in caplog.text and library in caplog.text
        assert "check the arguments" not in caplog.text
        _no_output(out)
