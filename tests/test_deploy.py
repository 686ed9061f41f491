"""autoexport.load / `autoexport predict`: a --scope detections export run on point clouds without mmdet3d."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import export_to

ROOT = Path(__file__).resolve().parents[1]
PP_SAMPLE = str(ROOT / "sample_configs" / "pointpillars_kitti_3class.py")
BACKENDS = ("pt2", "onnxruntime")
TOL = {"atol": 1e-4, "rtol": 1e-4}


def _demo_scan() -> Path | None:
    for base in (Path("/work/shared"), ROOT.parent / "shared"):
        path = base / "data" / "mmdet3d-demo" / "kitti" / "000008.bin"
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="module")
def det_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "pp_det"
    assert export_to(PP_SAMPLE, out, "--scope", "detections", "--format", "both") == 0
    return out


@pytest.fixture(scope="module")
def model(det_export: Path):
    import autoexport

    return autoexport.load(det_export)


def _samples(directory: Path) -> list[str]:
    return sorted(p.stem for p in (directory / "inputs").glob("*.npz"))


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoexport", "predict", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


# (a) stored inputs -> the stored eager outputs --------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_matches_the_stored_reference(model, det_export: Path, backend: str):
    samples = _samples(det_export)
    assert len(samples) == 3
    total = 0
    for sample in samples:
        points = np.load(det_export / "inputs" / f"{sample}.npz")["points"]
        ref = np.load(det_export / "reference" / f"{sample}.npz")
        count = int(ref["num_detections"])
        dets = model.predict(points, backend=backend)
        assert len(dets) == count, sample
        assert dets.boxes.shape == (count, 7) and dets.boxes.dtype == np.float32
        assert dets.scores.shape == (count,) and dets.labels.dtype == np.int64
        np.testing.assert_allclose(dets.boxes, ref["boxes_3d"][:count], **TOL, err_msg=sample)
        np.testing.assert_allclose(dets.scores, ref["scores_3d"][:count], **TOL, err_msg=sample)
        np.testing.assert_array_equal(dets.labels, ref["labels_3d"][:count], err_msg=sample)
        assert dets.names == [("Pedestrian", "Cyclist", "Car")[int(i)] for i in ref["labels_3d"][:count]]
        total += count
    assert total > 0, "no sample has a detection: the comparison would be vacuous"
    assert backend in model._runners  # one session per backend, kept
    runner = model._runners[backend]
    model.predict(points, backend=backend)
    assert model._runners[backend] is runner


def test_json_round_trip(model, det_export: Path):
    from autoexport.deploy import Detections

    points = np.load(det_export / "inputs" / "heldout_0.npz")["points"]
    dets = model.predict(points, backend="onnxruntime")
    data = json.loads(json.dumps(dets.to_json()))
    assert data["num_detections"] == len(dets) == len(data["detections"])
    back = Detections.from_json(data)
    np.testing.assert_allclose(back.boxes, dets.boxes, rtol=0, atol=0)
    np.testing.assert_array_equal(back.labels, dets.labels)
    assert back.names == dets.names


# (b) the real KITTI demo scan through the CLI -----------------------------------------------------------------

def test_cli_on_the_kitti_demo_scan(model, det_export: Path, tmp_path: Path):
    scan = _demo_scan()
    if scan is None:
        pytest.skip("the mmdet3d KITTI demo scan (data/mmdet3d-demo/kitti/000008.bin) is not on this machine")
    out_json, out_png = tmp_path / "dets.json", tmp_path / "bev.png"
    proc = _cli(str(det_export), "--points", str(scan), "--backend", "onnxruntime", "--json", str(out_json),
                "--bev", str(out_png))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out_json.read_text())
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith(f"{data['num_detections']} detections")
    assert len(lines) == data["num_detections"] + 1
    # What the file holds is what the API gives on the same scan (read as LoadPointsFromFile does: 4 floats a row).
    raw = np.fromfile(scan, np.float32).reshape(-1, 4)
    assert data["num_points"] == len(raw)
    dets = model.predict(scan, backend="onnxruntime")
    assert data["num_detections"] == len(dets)
    np.testing.assert_allclose(np.array([d["box"] for d in data["detections"]]).reshape(-1, 7), dets.boxes, **TOL)
    np.testing.assert_array_equal([d["label"] for d in data["detections"]], dets.labels)
    # The same scan given as an array gives the same boxes.
    np.testing.assert_allclose(model.predict(raw, backend="onnxruntime").boxes, dets.boxes, rtol=0, atol=0)
    png = out_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # pt2 with the onnxruntime boxes overlaid as the reference.
    overlay = tmp_path / "overlay.png"
    proc = _cli(str(det_export), "--points", str(scan), "--bev", str(overlay), "--reference-json", str(out_json))
    assert proc.returncode == 0, proc.stderr
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and overlay.stat().st_size > 10_000


# (c) no mmdet3d, mmcv or mmengine -------------------------------------------------------------------------------

BLOCKED_RUN = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np

    BLOCKED = ("mmdet3d", "mmcv", "mmengine", "mmdet")
    tried = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                tried.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:
        try:
            __import__(name)
            raise SystemExit(f"import {name} was not blocked")
        except ImportError:
            pass
    tried.clear()

    import autoexport
    directory, out = sys.argv[1], sys.argv[2]
    model = autoexport.load(directory)
    results = {}
    for backend in ("pt2", "onnxruntime"):
        dets = model.predict(np.load(f"{directory}/inputs/heldout_0.npz")["points"], backend=backend)
        results[f"{backend}_boxes"] = dets.boxes
        results[f"{backend}_labels"] = dets.labels
    np.savez(out, **results)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"tried": tried, "loaded": loaded}))
""")


def test_load_and_predict_without_mmdet3d(model, det_export: Path, tmp_path: Path):
    out = tmp_path / "boxes.npz"
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(det_export), str(out)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"tried": [], "loaded": []}
    got = np.load(out)
    expected = model.predict(np.load(det_export / "inputs" / "heldout_0.npz")["points"], backend="pt2")
    assert len(expected) > 0
    for backend in BACKENDS:
        np.testing.assert_allclose(got[f"{backend}_boxes"], expected.boxes, **TOL)
        np.testing.assert_array_equal(got[f"{backend}_labels"], expected.labels)


# (d) bad input ------------------------------------------------------------------------------------------------

def test_bad_points_are_user_input_errors(model, det_export: Path, tmp_path: Path):
    from autoexport.errors import UserInputError

    good = np.load(det_export / "inputs" / "heldout_0.npz")["points"]
    cases = {
        "3 columns where the model takes 4": good[:, :3],
        "contain NaN or inf": np.where(np.arange(len(good))[:, None] == 7, np.nan, good).astype(np.float32),
        "is not 2-D": good[:, 0],
        "dtype <U": np.array([["a", "b", "c", "d"]]),
    }
    for expected, points in cases.items():
        with pytest.raises(UserInputError) as err:
            model.predict(points)
        assert expected in str(err.value) and "\n" not in str(err.value)
    inf = good.copy()
    inf[3, 1] = np.inf
    with pytest.raises(UserInputError, match="1 of 25983 rows contain NaN or inf"):
        model.predict(inf)
    odd = tmp_path / "odd.bin"
    np.ones(4 * 10 + 1, np.float32).tofile(odd)
    with pytest.raises(UserInputError, match="not a whole number of 16-byte rows"):
        model.predict(odd)
    with pytest.raises(UserInputError, match="not found"):
        model.predict(tmp_path / "missing.bin")
    with pytest.raises(UserInputError, match="unsupported file type '.txt'"):
        (tmp_path / "points.txt").write_text("1 2 3 4")
        model.predict(tmp_path / "points.txt")


def test_zero_points_give_zero_detections_without_running(det_export: Path):
    import autoexport

    fresh = autoexport.load(det_export)
    for backend in BACKENDS:
        dets = fresh.predict(np.zeros((0, 4), np.float32), backend=backend)
        assert len(dets) == 0 and dets.boxes.shape == (0, 7) and dets.labels.shape == (0,)
    assert fresh._runners == {}  # no session was made


def test_backends_that_are_not_there(model, det_export: Path, tmp_path: Path):
    from autoexport.errors import UserInputError

    points = np.load(det_export / "inputs" / "heldout_0.npz")["points"]
    for backend, expected in (("iree", "has no iree artifact"), ("aoti", "has no aoti artifact"),
                              ("tensorflow", "unknown backend 'tensorflow'")):
        with pytest.raises(UserInputError, match=expected):
            model.predict(points, backend=backend)
    onnx_only = tmp_path / "onnx_only"
    shutil.copytree(det_export, onnx_only, ignore=shutil.ignore_patterns("model.pt2"))
    import autoexport

    with pytest.raises(UserInputError, match="has no model.pt2 for backend pt2"):
        autoexport.load(onnx_only).predict(points, backend="pt2")


def _network_scope_copy(det_export: Path, directory: Path) -> Path:
    """A directory whose metadata describes a --scope network export of the same model: the same files, but the
    head's raw tensors as outputs (the manifest a network-scope PointPillars export writes)."""
    shutil.copytree(det_export, directory)
    metadata = json.loads((directory / "metadata.json").read_text())
    raw = [{"name": name, "index_path": [name], "shape": [1, 18, 248, 216], "dtype": "float32", "dynamic_dims": {}}
           for name in ("cls_score_0", "bbox_pred_0", "dir_cls_pred_0")]
    metadata["manifest"]["outputs"] = raw
    metadata["outputs"] = raw
    metadata["tensor_boundary"] = "extract_feat+bbox_head"
    (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory


def test_directories_that_are_not_detection_exports(det_export: Path, tmp_path: Path):
    import autoexport
    from autoexport.errors import UserInputError

    network = _network_scope_copy(det_export, tmp_path / "network")
    with pytest.raises(UserInputError, match="is not a --scope detections export") as err:
        autoexport.load(network)
    assert "\n" not in str(err.value) and "--scope detections" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="no metadata.json"):
        autoexport.load(empty)
    with pytest.raises(UserInputError, match="is not a directory"):
        autoexport.load(tmp_path / "missing")


def test_cli_bad_input_is_one_line_and_exit_2(det_export: Path, tmp_path: Path):
    three = tmp_path / "three.npy"
    np.save(three, np.ones((100, 3), np.float32))
    nan = tmp_path / "nan.bin"
    cloud = np.ones((100, 4), np.float32)
    cloud[5, 2] = np.nan
    cloud.tofile(nan)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    network = _network_scope_copy(det_export, tmp_path / "network")
    ok_points = tmp_path / "ok.bin"
    np.load(det_export / "inputs" / "heldout_0.npz")["points"].tofile(ok_points)
    zero = tmp_path / "zero.bin"
    zero.write_bytes(b"")
    cases = [
        ((str(det_export), "--points", str(three)), "3 columns where the config's load_dim is 4"),
        ((str(det_export), "--points", str(nan)), "1 of 100 rows contain NaN or inf"),
        ((str(empty_dir), "--points", str(ok_points)), "no metadata.json"),
        ((str(network), "--points", str(ok_points)), "is not a --scope detections export"),
        ((str(det_export), "--points", str(ok_points), "--backend", "iree"), "has no iree artifact"),
        ((str(det_export), "--points", str(ok_points), "--reference-json", str(ok_points)), "add --bev"),
        ((str(det_export),), "the following arguments are required: --points"),
    ]
    for args, expected in cases:
        proc = _cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("autoexport")]
        assert len(lines) == 1 and expected in lines[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    proc = _cli(str(det_export), "--points", str(zero), "--json", str(tmp_path / "zero.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0 detections (pt2, 0 points)"
    assert json.loads((tmp_path / "zero.json").read_text())["num_detections"] == 0


def test_point_files_are_read_as_the_loader_reads_them(model, det_export: Path, tmp_path: Path):
    from autoexport.errors import UserInputError

    points = np.load(det_export / "inputs" / "heldout_0.npz")["points"]
    flat = tmp_path / "flat.npy"
    np.save(flat, points.reshape(-1))  # LoadPointsFromFile reshapes to (-1, load_dim)
    np.testing.assert_array_equal(model.read_points(flat), points)
    three = tmp_path / "three.npy"
    np.save(three, np.ones((100, 3), np.float32))
    with pytest.raises(UserInputError, match="3 columns where the config's load_dim is 4"):
        model.predict(three)
    ragged = tmp_path / "ragged.npy"
    np.save(ragged, np.ones(4 * 10 + 2, np.float32))
    with pytest.raises(UserInputError, match="rows of 4 values"):
        model.predict(ragged)


def test_use_dim_keeps_the_loaders_columns(det_export: Path, tmp_path: Path):
    """A nuScenes-style loader (load_dim 5, use_dim 0-3): a .bin of 5 floats a row keeps the first 4 columns."""
    import autoexport

    nus = tmp_path / "nus"
    nus.mkdir()
    metadata = json.loads((det_export / "metadata.json").read_text())
    metadata["preprocess"]["point_cloud"].update(load_dim=5, use_dim=[0, 1, 2, 3])
    (nus / "metadata.json").write_text(json.dumps(metadata))
    five = np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32)
    five.tofile(nus / "scan.bin")
    model = autoexport.load(nus)
    np.testing.assert_array_equal(model.read_points(nus / "scan.bin"), five[:, :4])
    np.testing.assert_array_equal(model.prepare(five), five[:, :4])  # the raw rows as an array
    np.testing.assert_array_equal(model.prepare(five[:, :4]), five[:, :4])


def test_package_import_stays_light():
    code = ("import sys, autoexport; heavy = [m for m in ('torch', 'mmdet3d', 'mmcv', 'autoexport.deploy') "
            "if m in sys.modules]; print(heavy); assert callable(autoexport.load)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
