"""The code base's layout rules, checked: one home per mmdet3d class, mechanisms that name no model, a generated CLI
reference that matches --help, short functions, a README a newcomer reads in five minutes."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autoexport"
# The stages and mechanisms: what they know about a model comes from autoexport.models through KNOWLEDGE.
MECHANISMS = ("pipeline.py", "boundaries.py", "patches.py", "split.py", "padding.py", "half.py", "quantize.py",
              "fidelity.py", "camera.py", "analyze.py", "export.py", "wrap.py", "runtime.py", "verify.py")


def _defining_functions(value: object) -> list:
    """The functions a piece of knowledge runs: a patch's factory, a boundary's forwards, a plan's stages."""
    if hasattr(value, "make"):  # ExportPatch
        return [value.make]
    if hasattr(value, "head_attrs"):  # TensorBoundary
        return [value.forward, value.host_inputs]
    if hasattr(value, "stages"):  # SplitPlan
        return [stage.forward for stage in value.stages]
    if hasattr(value, "capacity_from"):  # PaddingRule
        return [value.capacity_from]
    return [value] if callable(value) else []


def test_every_registered_class_has_one_home_module():
    from autoexport.knowledge import KNOWLEDGE

    homes = {name: KNOWLEDGE.homes(name) for name in KNOWLEDGE.names()}
    models = {name: h for name, h in homes.items() if any(m.startswith("autoexport.models.") for m in h)}
    assert {name: h for name, h in models.items() if len(h) != 1} == {}
    assert homes["PointVoxelRCNN"] == ["autoexport.models.pv_rcnn"]
    assert homes["PointPillarsScatter"] == ["autoexport.models.pillar_scatter"]
    assert homes["CenterHead"] == ["autoexport.models.center_head"]
    # A plan is built from the shared builders (autoexport.split), its own stages (in its home) and its components'
    # (PartA2RPNHead's proposals step, in that head's module).
    every_home = {m for h in models.values() for m in h}
    for name, plan in KNOWLEDGE.with_field("split_plan"):
        if hasattr(plan, "stages"):
            stage_modules = {f.__module__ for f in _defining_functions(plan) if f is not None}
            assert homes[name][0] in stage_modules | {"autoexport.models.voxelnet", "autoexport.models.mvx_two_stage"}
            # A project's own plan (the tiny fusion sample's) may also use stages of its own module.
            assert stage_modules <= every_home | set(homes[name]) | {"autoexport.split"}, (name, stage_modules)


def test_mechanism_modules_name_no_registered_class():
    from autoexport.knowledge import KNOWLEDGE

    # Library classes the mechanisms themselves work with (torch's, mmcv's, pytorch-quantization's) are not models.
    names = [n for n in KNOWLEDGE.names() if n not in ("ConvModule", "ConvTranspose2d", "RoIAlign", "TensorQuantizer")]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    found = {}
    for module in MECHANISMS:
        tree = ast.parse((PACKAGE / module).read_text())
        # Code only: strings and comments may give examples.
        code_names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        hits = sorted(n for n in code_names if pattern.fullmatch(n))
        literal = sorted({c.value for c in ast.walk(tree) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                          and pattern.fullmatch(c.value)})
        if hits or literal:
            found[module] = hits + literal
    assert found == {}, found


def test_generated_wrapper_imports_only_the_runtime_module():
    from autoexport.manifest import Manifest, OutputSpec, TensorSpec
    from autoexport.wrap import generate_wrapper_source

    manifest = Manifest(inputs=[TensorSpec("points_0", "inputs.points.0", [5, 4], "float32", {})],
                        outputs=[OutputSpec("out", [], [5], "float32", {})], dims={}, structure={})
    source = generate_wrapper_source(manifest, [{}], "tensor_mode_forward", "VoxelNet", "pp")
    imports = [line for line in source.splitlines() if line.startswith(("import autoexport", "from autoexport"))]
    assert imports == ["from autoexport.runtime import tensor_forward"]
    importlib.import_module("autoexport.runtime")


def test_cli_reference_is_generated_from_the_parsers():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_functions_fit_on_a_screen():
    longest = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    over = sorted((n, where) for n, where in longest if n >= 80)
    assert over == [], over


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
