"""Stage 5, report: metadata.json (what was exported and how) and parity.json (how well it matches)."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import first_line

_LIBRARIES = ("torch", "mmcv", "mmdet", "mmdet3d", "mmengine", "onnx", "onnxscript", "onnxruntime", "numpy")


def library_versions() -> dict[str, str]:
    found = {"autoexport": __version__, "python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def export_info(manifest: Any) -> dict:
    return {
        "total_inputs": len(manifest.inputs),
        "input_structure": manifest.structure,
        "tensor_details": [
            {"name": t.name, "path": t.path, "shape": t.shape, "dtype": t.dtype,
             "dynamic_dims": {str(i): {"name": n, "min": manifest.dims[n].min, "max": manifest.dims[n].max,
                                       "observed": manifest.dims[n].observed} for i, n in t.dynamic_dims.items()},
             "description": t.description, "mutated_by_model": t.mutated_by_model}
            for t in manifest.inputs
        ],
        "unused_inputs": manifest.unused_inputs,
        "batch_size": manifest.batch_size,
    }


def outputs_info(manifest: Any) -> list[dict]:
    return [{"name": o.name, "shape": o.shape, "dtype": o.dtype, "index_path": o.index_path,
             "dynamic_dims": {str(i): n for i, n in o.dynamic_dims.items()}} for o in manifest.outputs]


def manifest_dump(manifest: Any) -> dict:
    return manifest.to_json()


# ---- parity: the table in logs, parity.md for people, parity.xml (JUnit) for CI systems --------------------------

def _verdict(checks: list) -> str:
    return "pass" if all(c.passed for c in checks) else "FAIL"


def _decided_by(checks: list) -> str:
    """The rule that decided an output over its samples: the one beyond elementwise when any sample needed it."""
    rules = [c.rule for c in checks]
    return next((r for r in rules if r != "elementwise"), rules[0])


def _float64_numbers(checks: list) -> tuple[str, str, str]:
    """(artifact RMSE, eager fp32 RMSE, ratio) against float64 of the sample with the largest ratio, or dashes."""
    measured = [c.float64 for c in checks if c.float64 and "runtime_rmse" in c.float64]
    if not measured:
        return "-", "-", "-"
    worst = max(measured, key=lambda f: f["ratio"])
    return f"{worst['runtime_rmse']:.3g}", f"{worst['eager_fp32_rmse']:.3g}", f"{worst['ratio']:.3g}"


def parity_table(report: Any) -> str:
    """Per runtime and output, the worst case over samples."""
    rows = [("runtime", "output", "max_abs", "max_rel", "cosine", "rule", "rmse/f64", "eager rmse/f64", "verdict")]
    for runtime, output, checks in report.worst_per_output():
        rows.append((runtime, output, f"{max(c.max_abs for c in checks):.3g}",
                     f"{max(c.max_rel for c in checks):.3g}", f"{min(c.cosine for c in checks):.7f}",
                     _decided_by(checks), *_float64_numbers(checks)[:2], _verdict(checks)))
    rows += [(s.runtime, "-", "-", "-", "-", "-", "-", "-", f"skipped: {s.reason}") for s in report.skipped]
    rows += [(s.runtime, "-", "-", "-", "-", "-", "-", "-", f"FAIL: not built: {first_line(s.reason)}")
             for s in report.not_built]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
    return table + ("\n" + consistency_line(report.consistency) if report.consistency else "")


def consistency_line(consistency: dict) -> str:
    """One sentence on whether eager PyTorch agreed with itself (verify.eager_consistency)."""
    repeat, single = consistency["repeat"], consistency.get("one_thread")
    text = (f"eager run twice: {'bitwise equal' if repeat['bitwise'] else 'max abs %.3g apart' % repeat['max_abs']}"
            + ("" if consistency["consistent"] else " (the reference disagrees with itself: FAIL)"))
    if single is not None:
        text += (f"; 1 vs {consistency['threads']} threads: "
                 f"{'bitwise equal' if single['bitwise'] else 'max abs %.3g apart' % single['max_abs']}")
    return text


def _md(text: str) -> str:
    return text.replace("|", chr(92) + "|")  # a bare | would end the Markdown cell


def parity_markdown(report: Any, title: str = "Parity") -> str:
    samples = sorted({c.sample for c in report.checks})
    lines = [f"# {title}: {'PASSED' if report.passed else 'FAILED'}", "",
             f"Reference: {report.reference}. Samples: {', '.join(samples)}. Each row is the worst case over the "
             f"samples. Rule: {_md(report.policy.describe())}. `rule` says which comparison decided the row; "
             "RMSEs are against the same model run in float64.", "", "| precision | tolerance |", "|---|---|"]
    lines += [f"| {p} | {_md(t.describe())} |" for p, t in report.used_tolerances().items()]
    lines += ["", "| output | shape | backend | max abs | max rel | cosine | tolerance | verdict | rule | RMSE vs f64 | "
              "eager RMSE vs f64 | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for runtime, output, checks in report.worst_per_output():
        bad = sum(c.mismatched for c in checks)
        verdict = "pass" if all(c.passed for c in checks) else f"**FAIL** ({bad} elements)"
        if verdict == "pass" and bad:
            verdict = f"pass ({bad} elements outside the elementwise tolerance)"
        lines.append(f"| {output} | {'x'.join(map(str, checks[0].shape))} | {runtime} | "
                     f"{max(c.max_abs for c in checks):.3g} | {max(c.max_rel for c in checks):.3g} | "
                     f"{min(c.cosine for c in checks):.7f} | {checks[0].precision} | {verdict} | {_decided_by(checks)} | "
                     + " | ".join(_float64_numbers(checks)) + " |")
    if report.consistency:
        lines += ["", "Eager self-consistency: " + consistency_line(report.consistency) + "."]
    if report.skipped:
        lines += ["", "Not run here:", ""] + [f"- {s.runtime}: {s.reason}" for s in report.skipped]
    if report.not_built:
        lines += ["", "**Could not be built** (a failure):", ""]
        lines += [f"- {s.runtime}: {first_line(s.reason)}" for s in report.not_built]
    if report.detections is not None:
        lines += report.detections.markdown_lines()
    return "\n".join(lines) + "\n"


def _junit_case(node: Any, suite: str, runtime: str, output: str, checks: list, tol: Any) -> None:
    from xml.etree import ElementTree as ET

    case = ET.SubElement(node, "testcase", classname=f"{suite}.{runtime}", name=output, time="0")
    props = ET.SubElement(case, "properties")
    rmse, eager_rmse, ratio = _float64_numbers(checks)
    for key, value in (("max_abs", max(c.max_abs for c in checks)), ("cosine", min(c.cosine for c in checks)),
                       ("tolerance", tol.describe()), ("samples", len(checks)), ("rule", _decided_by(checks)),
                       ("rmse_vs_float64", rmse), ("eager_rmse_vs_float64", eager_rmse), ("rmse_ratio", ratio)):
        ET.SubElement(props, "property", name=key, value=str(value))
    failed = [c for c in checks if not c.passed]
    if failed:
        detail = "; ".join(f"{c.sample}: {c.mismatched}/{c.total} elements outside, max abs {c.max_abs:.3g}, "
                           f"cosine {c.cosine:.6f} {c.note}".strip() for c in failed)
        ET.SubElement(case, "failure", message=f"{output} on {runtime} outside {tol.describe()}",
                      type="ParityFailure").text = detail


def _junit_detection_cases(node: Any, suite: str, parity: Any) -> None:
    """One test case per runtime x sample of the detection parity; counts added to the suite's."""
    from xml.etree import ElementTree as ET

    for s in parity.samples:
        case = ET.SubElement(node, "testcase", classname=f"{suite}.detections.{s.runtime}", name=s.sample, time="0")
        props = ET.SubElement(case, "properties")
        for key in ("reference_boxes", "candidate_boxes", "matched", "max_box_diff", "max_score_diff"):
            ET.SubElement(props, "property", name=key, value=str(getattr(s, key)))
        if not s.passed:
            ET.SubElement(case, "failure", message=f"{len(s.unexplained)} unexplained box differences",
                          type="DetectionParityFailure").text = "; ".join(s.unexplained)
    node.set("tests", str(int(node.get("tests")) + len(parity.samples)))
    node.set("failures", str(int(node.get("failures")) + sum(1 for s in parity.samples if not s.passed)))


def parity_junit(report: Any, suite: str = "autoexport.parity") -> str:
    """JUnit XML: one test case per backend x output (all samples), skipped backends as skipped cases, an eager
    reference that disagrees with itself as a failed case."""
    from xml.etree import ElementTree as ET

    cases = report.worst_per_output()
    inconsistent = bool(report.consistency) and not report.consistency["consistent"]
    failures = sum(1 for _, _, checks in cases if not all(c.passed for c in checks)) + len(report.not_built)
    root = ET.Element("testsuites")
    node = ET.SubElement(root, "testsuite", name=suite,
                         tests=str(len(cases) + len(report.skipped) + len(report.not_built) + inconsistent),
                         failures=str(failures + inconsistent), errors="0", skipped=str(len(report.skipped)))
    for runtime, output, checks in cases:
        _junit_case(node, suite, runtime, output, checks, report.tolerances[checks[0].precision])
    for s in report.skipped:
        case = ET.SubElement(node, "testcase", classname=f"{suite}.{s.runtime}", name="all_outputs", time="0")
        ET.SubElement(case, "skipped", message=s.reason)
    for s in report.not_built:
        case = ET.SubElement(node, "testcase", classname=f"{suite}.{s.runtime}", name="build", time="0")
        ET.SubElement(case, "failure", message=f"{s.runtime} could not be built",
                      type="LoweringFailure").text = s.reason
    if inconsistent:
        case = ET.SubElement(node, "testcase", classname=f"{suite}.eager", name="self_consistency", time="0")
        ET.SubElement(case, "failure", message="the eager reference disagrees with itself",
                      type="ReferenceInconsistent").text = consistency_line(report.consistency)
    if report.detections is not None:
        _junit_detection_cases(node, suite, report.detections)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


__all__ = ["parity_table", "parity_markdown", "parity_junit", "consistency_line", "library_versions", "write_json", "save_npz", "load_npz", "export_info", "outputs_info", "asdict"]
