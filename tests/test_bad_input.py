"""The bad-input sweep: every malformed input gets exit 2 (3 where the model's own code fails), one error line naming
the cause and what to do, no traceback, and no output directory that looks complete. The table of cases is in
docs/reference/bad-input.md; keep the two in step."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import KITTI_PP, export_to

ROOT = Path(__file__).resolve().parents[1]
PP_SAMPLE = str(ROOT / "sample_configs" / "pointpillars_kitti_3class.py")


def leftovers(out: Path) -> list[str]:
    """The output directory, its staging and lock files, its .failed twin: anything a run left for this target."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name in (out.name, f"{out.name}.failed") or p.name.startswith(f".{out.name}."))


def assert_clean_refusal(code: int, expected: int, caplog: pytest.LogCaptureFixture, out: Path, *needles: str) -> None:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == expected, caplog.text[-2000:]
    assert len(errors) == 1 and "\n" not in errors[0].strip(), errors
    assert errors[0].startswith("autoexport: error:") and "Traceback" not in caplog.text
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert leftovers(out) == [], leftovers(out)


# ---- configs ------------------------------------------------------------------------------------------------------

CONFIG_CASES = {
    "syntax_error": ("model = dict(type='VoxelNet'\n", 2, ("could not be loaded", "SyntaxError")),
    "unknown_type": ("model = dict(type='NoSuchDetector')\n"
                     "test_pipeline = []\n", 2, ("could not be built", "NoSuchDetector")),
    "no_model_key": ("x = 1\n", 2, ("no `model` section",)),
    "missing_base": ("_base_ = ['./does_not_exist.py']\n", 2, ("could not be loaded", "does_not_exist")),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_malformed_config(case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    text, code, needles = CONFIG_CASES[case]
    config = tmp_path / f"{case}.py"
    config.write_text(text)
    out = tmp_path / "out"
    assert_clean_refusal(export_to(str(config), out), code, caplog, out, *needles)


def test_custom_import_of_an_unbuilt_extension_names_it(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A project whose module imports a compiled extension that was never built (BEVFusion's bev_pool_ext without
    `setup.py develop`): the error names the module, the extension and what to do."""
    package = tmp_path / "myproject" / "ops"
    package.mkdir(parents=True)
    (tmp_path / "myproject" / "__init__.py").write_text("from .ops import pool\n")
    (package / "__init__.py").write_text("")
    (package / "pool.py").write_text("from . import pool_ext\n")
    (package / "pool_cuda.cu").write_text("// the kernel the extension is built from\n")
    config = tmp_path / "uses_ext.py"
    config.write_text(f"_base_ = [{PP_SAMPLE!r}]\ncustom_imports = dict(imports=['myproject'])\n")
    out = tmp_path / "out"
    assert_clean_refusal(export_to(str(config), out), 2, caplog, out, "custom_imports module myproject",
                         "compiled extension myproject.ops.pool_ext", "pool.py:1", "not built", "What to do")


def test_custom_import_that_is_not_on_the_path(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    config = tmp_path / "uses_missing.py"
    config.write_text(f"_base_ = [{PP_SAMPLE!r}]\ncustom_imports = dict(imports=['no_such_project.models'])\n")
    out = tmp_path / "out"
    assert_clean_refusal(export_to(str(config), out), 2, caplog, out, "no module", "PYTHONPATH")


# ---- checkpoints --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pp_state() -> dict[str, torch.Tensor]:
    from autoexport.analyze import build_model
    from autoexport.configs import load_config, resolve_config

    return build_model(load_config(resolve_config(KITTI_PP)), "cpu", 0).state_dict()


def _checkpoint_cases(state: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    full = folder / "full.pth"
    torch.save({"state_dict": state, "meta": {}}, full)
    truncated = folder / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    non_tensor = folder / "non_tensor.pth"
    torch.save({"state_dict": {k: v.tolist() for k, v in list(state.items())[:3]}}, non_tensor)
    wrong_dtype = folder / "wrong_dtype.pth"
    torch.save({"state_dict": {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in state.items()}},
               wrong_dtype)
    other_model = folder / "other_model.pth"
    torch.save({"state_dict": {f"backbone.other.{i}": torch.zeros(3) for i in range(4)}}, other_model)
    return {"truncated": (truncated, ("not a readable PyTorch checkpoint", "truncated or corrupt")),
            "non_tensor": (non_tensor, ("no state_dict of tensors",)),
            "wrong_dtype": (wrong_dtype, ("dtype mismatches", "torch.int32")),
            "other_model": (other_model, ("does not fit", "missing keys", "unexpected keys"))}


@pytest.mark.parametrize("case", ["truncated", "non_tensor", "wrong_dtype", "other_model"])
def test_malformed_checkpoint(case: str, pp_state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path, needles = _checkpoint_cases(pp_state, tmp_path)[case]
    out = tmp_path / "out"
    assert_clean_refusal(export_to(KITTI_PP, out, "--checkpoint", str(path)), 2, caplog, out, *needles)


class _RunsShellCommand:
    """What an attacker pickles into a checkpoint's meta: unpickling calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_before_it_runs(pp_state: dict, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": pp_state, "meta": {"note": _RunsShellCommand(marker)}}, ckpt)
    out = tmp_path / "out"
    assert_clean_refusal(export_to(KITTI_PP, out, "--checkpoint", str(ckpt)), 2, caplog, out,
                         "posix.system", "--trust-checkpoint")
    assert not marker.exists()


def test_trust_checkpoint_opts_in_to_a_full_unpickle(pp_state: dict, tmp_path: Path):
    """Documented behaviour: with --trust-checkpoint the file is fully unpickled, so its code runs."""
    from autoexport.checkpoint import read_checkpoint

    marker = tmp_path / "ran"
    ckpt = tmp_path / "trusted.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"note": _RunsShellCommand(marker)}}, ckpt)
    read_checkpoint(ckpt, trust=True)
    assert marker.exists()


def _runner_checkpoint(model: torch.nn.Module, work_dir: Path) -> Path:
    """A checkpoint written by mmengine's own Runner (CheckpointHook -> Runner.save_checkpoint) after one epoch of
    SGD with a parameter scheduler on a one-layer model, carrying the meta, message hub and optimizer state it
    really writes, dataset_meta included; its state_dict is then swapped for `model`'s with mmengine's
    save_checkpoint."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from mmengine.runner.checkpoint import save_checkpoint
    from torch.utils.data import Dataset

    class Tiny(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def forward(self, x: torch.Tensor, mode: str = "tensor") -> object:
            out = self.layer(torch.stack(x) if isinstance(x, list) else x)
            return {"loss": (out ** 2).mean()} if mode == "loss" else out

    class Points(Dataset):
        metainfo = {"classes": ("Pedestrian", "Cyclist", "Car"), "version": "v1.0"}

        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> dict:
            return {"x": torch.full((2,), float(index))}

    runner = Runner(model=Tiny(), work_dir=str(work_dir), experiment_name="bad_input_checkpoint",
                    train_dataloader=dict(dataset=Points(), sampler=dict(type="DefaultSampler", shuffle=False),
                                          batch_size=2, collate_fn=dict(type="default_collate")),
                    optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01, momentum=0.9)),
                    param_scheduler=dict(type="MultiStepLR", milestones=[1]),
                    train_cfg=dict(by_epoch=True, max_epochs=1),
                    default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1)))
    runner.train()
    written = torch.load(work_dir / "epoch_1.pth", weights_only=False)  # our own file, just written
    written["state_dict"] = model.state_dict()
    path = work_dir / "pointpillars_runner.pth"
    save_checkpoint(written, str(path))
    return path


def test_checkpoints_written_by_mmengine_load_without_the_flag(tmp_path: Path):
    from autoexport.analyze import build_model
    from autoexport.checkpoint import load_checkpoint_strict, read_checkpoint
    from autoexport.configs import load_config, resolve_config

    model = build_model(load_config(resolve_config(KITTI_PP)), "cpu", 0)
    with torch.no_grad():
        for index, parameter in enumerate(model.parameters()):
            parameter.fill_(0.001 * index)
    path = _runner_checkpoint(model, tmp_path)
    written = read_checkpoint(path)
    assert {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"} <= set(written)
    assert written["meta"]["dataset_meta"]["classes"] == ("Pedestrian", "Cyclist", "Car")
    assert "HistoryBuffer" in type(written["message_hub"]["log_scalars"]["train/loss"]).__name__
    fresh = build_model(load_config(resolve_config(KITTI_PP)), "cpu", 1)
    load_checkpoint_strict(fresh, str(path))
    for (name, expected), loaded in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(expected, loaded), name
    assert fresh.dataset_meta["classes"] == ("Pedestrian", "Cyclist", "Car")


# ---- samples ------------------------------------------------------------------------------------------------------

def _write_npy_with_huge_header(path: Path) -> None:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4), 'x': '" + "a" * 200_000 + "'}"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header.encode() + b"\0" * 16)


def _sample_cases(folder: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    rng = np.random.default_rng(0)
    good = np.c_[rng.uniform(5, 40, (2000, 1)), rng.uniform(-20, 20, (2000, 1)), rng.uniform(-2, 0, (2000, 1)),
                 rng.uniform(0, 1, (2000, 1))].astype(np.float32)
    cases = {}
    wrong_rows = folder / "wrong_rows.bin"
    np.ones((1001, 5), np.float32).tofile(wrong_rows)
    cases["wrong_row_size"] = (wrong_rows, ("16-byte rows",))
    nan = folder / "nan.bin"
    with_nan = good.copy()
    with_nan[7, 1] = np.nan
    with_nan[9, 0] = np.inf
    with_nan.tofile(nan)
    cases["nan_inf"] = (nan, ("2 of 2000 points contain NaN or inf",))
    empty = folder / "empty.bin"
    empty.write_bytes(b"")
    cases["empty"] = (empty, ("holds 0 points",))
    outside = folder / "outside.bin"
    np.c_[rng.uniform(-90, -80, (50, 3)), np.zeros((50, 1))].astype(np.float32).tofile(outside)
    cases["all_out_of_range"] = (outside, ("none of its 50 points lies inside", "point cloud range"))
    above = folder / "above.bin"  # inside in x and y, but 20 m above the range's top
    np.c_[good[:50, :2], np.full((50, 1), 20.0), good[:50, 3:]].astype(np.float32).tofile(above)
    cases["all_above_the_range"] = (above, ("none of its 50 points lies inside",))
    directory = folder / "clouds"
    directory.mkdir()
    cases["directory"] = (directory, ("is a directory",))
    header = folder / "huge_header.npy"
    _write_npy_with_huge_header(header)
    cases["huge_npy_header"] = (header, ("not a readable .npy file",))
    pcd = folder / "cloud.pcd"
    pcd.write_text("# .PCD v0.7\n")
    cases["unsupported_type"] = (pcd, ("unsupported file type '.pcd'",))
    return cases


SAMPLE_CASES = ["wrong_row_size", "nan_inf", "empty", "all_out_of_range", "all_above_the_range", "directory",
                "huge_npy_header", "unsupported_type"]


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_malformed_sample(case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path, needles = _sample_cases(tmp_path)[case]
    out = tmp_path / "out"
    assert_clean_refusal(export_to(KITTI_PP, out, "--sample", str(path)), 2, caplog, out, *needles)


def test_sample_flag_takes_several_files(tmp_path: Path):
    from autoexport.cli import _export_parser

    args = _export_parser().parse_args(["--config", "x", "--sample", "a.bin", "b.bin", "c.bin", "--sample", "d.bin"])
    assert [p.name for p in args.sample] == ["a.bin", "b.bin", "c.bin", "d.bin"]


# ---- flags and output directories ---------------------------------------------------------------------------------

FLAG_CASES = {
    "tensorrt_without_onnx": (("--format", "pt2", "--backend", "tensorrt"), ("--backend tensorrt builds from model.onnx",)),
    "split_with_int8": (("--split", "--precision", "int8"), ("cannot be combined with --precision int8",)),
    "calib_data_without_int8": (("--calib-data", "."), ("apply to --precision int8 only",)),
    "capacity_zero": (("--capacity", "0"), ("--capacity must be auto, dynamic or a positive integer",)),
    "calib_samples_zero": (("--precision", "int8", "--calib-samples", "0"), ("--calib-samples must be at least 1",)),
    "negative_atol": (("--atol", "-1"), ("--atol -1.0: a tolerance must be a number >= 0",)),
    "fp64_multiplier_zero": (("--fp64-multiplier", "fp32=0"), ("--fp64-multiplier 'fp32=0': expected PRECISION=M",)),
    "unknown_compare_rule": (("--compare", "cls_score_0=cosine"), ("--compare 'cls_score_0=cosine': expected OUTPUT=RULE",)),
    "unknown_backend": (("--backend", "tvm"), ("unknown backend 'tvm'",)),
    "unknown_backend_target": (("--backend", "iree:vulkan"), ("backend iree has no target 'vulkan'",)),
    "unknown_flag": (("--no-such-flag",), ("unrecognized arguments: --no-such-flag",)),
    "bad_format": (("--format", "tflite"), ("invalid choice: 'tflite'",)),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flags(case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    flags, needles = FLAG_CASES[case]
    out = tmp_path / "out"
    assert_clean_refusal(export_to(KITTI_PP, out, *flags), 2, caplog, out, *needles)


def test_output_path_that_is_a_file(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    out = tmp_path / "out"
    out.write_text("not a directory")
    code = export_to(KITTI_PP, out)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and "is not a directory" in errors[0]
    assert out.read_text() == "not a directory"


def test_unwritable_output_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "out"  # its parent is a file: nothing can be created there, as for a read-only mount
    code = export_to(KITTI_PP, out)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and "choose a writable --output-dir" in errors[0], errors


def test_export_into_a_directory_another_run_holds_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from autoexport.output_dir import OutputDirectory

    out = tmp_path / "out"
    holder = OutputDirectory(out, overwrite=False)
    holder.claim()
    try:
        code = export_to(KITTI_PP, out)
    finally:
        holder.abandon()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and f"another autoexport (pid {os.getpid()}) is writing" in errors[0]
    assert leftovers(out) == []


# ---- faults and signals -------------------------------------------------------------------------------------------

def test_unexpected_fault_in_a_registered_tensor_path_names_stage_model_and_entry(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """A KeyError inside the tensor path registered for the detector (as when a model's inputs are not what that
    path expects): exit 3, one line naming the stage, the model class and the registry entry."""
    import dataclasses
    import functools

    from autoexport import boundaries
    from autoexport.knowledge import KNOWLEDGE

    @functools.wraps(boundaries.tensor_mode_forward)  # the registered path, failing inside
    def expects_other_inputs(model: object, inputs: dict, data_samples: list) -> object:
        return inputs["img_features"]

    entry = KNOWLEDGE.get("Base3DDetector")
    faulty = dataclasses.replace(entry, boundary=dataclasses.replace(entry.boundary, forward=expects_other_inputs))
    out = tmp_path / "out"
    with KNOWLEDGE.overridden("Base3DDetector", faulty):
        code = export_to(KITTI_PP, out)
    assert_clean_refusal(code, 3, caplog, out, "KeyError", "VoxelNet",
                         "tensor_mode_forward", "registered for Base3DDetector")


def test_unexpected_fault_in_a_later_stage_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch):
    from autoexport import pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("parity")

    monkeypatch.setattr(pipeline, "write_reports", broken)
    out = tmp_path / "out"
    assert_clean_refusal(export_to(PP_SAMPLE, out), 3, caplog, out, "unexpected KeyError in stage report",
                         "VoxelNet", "--verbose")


STAGES = ("analyze", "wrap", "export", "verify", "report")


def _interrupt_at(stage: str, sig: int, out: Path) -> tuple[int, str]:
    """Start an export of the PointPillars sample and send `sig` as soon as it announces `stage`."""
    proc = subprocess.Popen([sys.executable, "-m", "autoexport", "--config", PP_SAMPLE, "--output-dir", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("[") and f"] {stage}: " in line:
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    return proc.wait(timeout=300), "".join(seen) + rest


@pytest.mark.slow
def test_interrupted_exports_leave_nothing_that_looks_complete(tmp_path: Path):
    """SIGINT and SIGKILL at the start of every stage: no output directory; Ctrl-C removes its staging directory
    and says so; a killed run's staging directory is left hidden, and the next run clears it and succeeds."""
    out = tmp_path / "out"
    for stage in STAGES:
        code, text = _interrupt_at(stage, signal.SIGINT, out)
        assert code == 130 and "interrupted" in text and "Traceback" not in text, text[-1500:]
        assert leftovers(out) == [], (stage, leftovers(out))
        code, _ = _interrupt_at(stage, signal.SIGKILL, out)
        assert code == -signal.SIGKILL
        assert not out.exists() and all(n.startswith(f".{out.name}.") for n in leftovers(out)), leftovers(out)
    done = subprocess.run([sys.executable, "-m", "autoexport", "--config", PP_SAMPLE, "--output-dir", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert leftovers(out) == ["out"] and (out / "metadata.json").is_file()


# ---- the generated wrapper never runs text from the user's files ---------------------------------------------------

HOSTILE = 'pp """; import os; os.system("touch MARKER") #\\ \n é\'q'


def _env_with_this_checkout() -> dict:
    """Run from another directory but import this checkout's autoexport, installed or not."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_hostile_config_name_gives_an_inert_wrapper(tmp_path: Path):
    import ast

    config = tmp_path / f"{HOSTILE}.py"
    config.write_text(f"_base_ = [{PP_SAMPLE!r}]\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "autoexport", "--config", str(config), "--output-dir", str(out),
                           "--format", "pt2"], capture_output=True, text=True, cwd=tmp_path, env=_env_with_this_checkout())
    assert done.returncode == 0, done.stderr[-2000:]
    source = (out / "wrapper.py").read_text()
    module = ast.parse(source)
    assert HOSTILE in ast.get_docstring(module)  # the name, intact, as text
    subprocess.run([sys.executable, str(out / "wrapper.py")], cwd=tmp_path, check=True, env=_env_with_this_checkout())
    assert not (tmp_path / "MARKER").exists()


def test_hostile_metainfo_keys_paths_and_names_stay_text():
    """Metainfo keys, input paths, output names and descriptions with quotes, newlines and non-ASCII: the source
    compiles, and the module's statements are only the wrapper's own."""
    import ast

    from autoexport.manifest import Manifest, OutputSpec, TensorSpec, identifier
    from autoexport.wrap import generate_wrapper_source

    name = identifier(HOSTILE)
    manifest = Manifest(
        inputs=[TensorSpec(name, f"inputs.{HOSTILE}", [3, 4], "float32", description=HOSTILE, mutated_by_model=True)],
        outputs=[OutputSpec(identifier("out\n" + HOSTILE), [HOSTILE], [3], "float32")],
        dims={}, structure={"inputs": {HOSTILE: {"tensor": name}}}, unused_inputs=[HOSTILE])
    source = generate_wrapper_source(manifest, [{HOSTILE: HOSTILE, "box_type": object()}], "tensor_mode_forward",
                                     HOSTILE, HOSTILE)
    module = ast.parse(source)
    statements = [type(node).__name__ for node in module.body]
    # INPUT_NAMES, OUTPUT_NAMES, FORWARD_OPTIONS, METAINFO: constants only, nothing the hostile text added.
    assert statements == ["Expr", "ImportFrom", "Import", "ImportFrom", "ImportFrom", "ImportFrom", "Assign",
                          "Assign", "Assign", "Assign", "ClassDef"], statements
    called = {ast.unparse(node.func) for node in ast.walk(module) if isinstance(node, ast.Call)}
    imported = {alias.name for node in ast.walk(module) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert not any("os.system" in c for c in called) and "os" not in imported, (called, imported)
