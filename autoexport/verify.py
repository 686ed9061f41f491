"""Stage 4, verify: one Comparator checks any runner against reference outputs, output by output,
element by element, with a stated tolerance."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from .errors import first_line
from .runners import Feed, Runner, RunnerCrashed

log = logging.getLogger("autoexport")


@dataclass(frozen=True)
class Tolerance:
    """An element passes when |actual - expected| <= atol + rtol * |expected| (numpy.isclose's rule); with
    min_cosine set, the output's cosine similarity to the reference must also reach it."""

    atol: float = 1e-4
    rtol: float = 1e-4
    precision: str = "fp32"
    min_cosine: float | None = None

    def describe(self) -> str:
        rule = f"|a-b| <= {self.atol:g} + {self.rtol:g}*|b|"
        return rule + (f" and cosine >= {self.min_cosine:g}" if self.min_cosine is not None else "")

    def to_json(self) -> dict:
        return {**asdict(self), "rule": self.describe()}

    @staticmethod
    def from_json(data: dict) -> "Tolerance":
        return Tolerance(**{k: v for k, v in data.items() if k != "rule"})


# Per precision of the artifact under test. fp32 backends reorder float sums (FMA, tiling, vector widths): 1e-4
# holds with >3x margin on the pillar and camera models; on VoteNet and SECOND eager fp32 is itself up to 4e-4 off a
# float64 run, so failed checks are measured against float64 too (measure_against_float64). fp16 keeps ~3 decimal
# digits; int8 is judged by direction.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-4, 1e-4, "fp32"),
    "fp16": Tolerance(1e-2, 1e-2, "fp16"),
    "int8": Tolerance(0.5, 0.1, "int8", min_cosine=0.99),
}


def tolerances_with(*overrides: Tolerance) -> dict[str, Tolerance]:
    merged = dict(DEFAULT_TOLERANCES)
    merged.update({t.precision: t for t in overrides})
    return merged


@dataclass
class OutputCheck:
    sample: str
    runtime: str
    output: str
    shape: list[int]
    max_abs: float
    max_rel: float
    cosine: float
    mismatched: int  # elements outside the tolerance
    total: int
    passed: bool
    note: str = ""
    precision: str = "fp32"
    # For a failed fp32 check: eager fp32 and this runtime, each measured against eager PyTorch in float64.
    float64: dict | None = None


@dataclass
class SkippedRunner:
    runtime: str
    reason: str


@dataclass
class ParityReport:
    reference: str
    tolerances: dict[str, Tolerance]
    checks: list[OutputCheck] = field(default_factory=list)
    skipped: list[SkippedRunner] = field(default_factory=list)
    # Backends whose lowering failed (an iree-compile crash): a failure of that backend, while the others are
    # still checked.
    not_built: list[SkippedRunner] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) and not self.not_built

    @property
    def tolerance(self) -> Tolerance:
        return self.tolerances["fp32"]

    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.passed]

    def runtime_verdicts(self) -> dict[str, bool]:
        """Whether every check of each runtime passed, runtimes in report order."""
        verdicts: dict[str, bool] = {}
        for c in self.checks:
            verdicts[c.runtime] = verdicts.get(c.runtime, True) and c.passed
        return verdicts

    def used_tolerances(self) -> dict[str, Tolerance]:
        used = {c.precision for c in self.checks} | {"fp32"}
        return {p: t for p, t in self.tolerances.items() if p in used}

    def to_json(self) -> dict:
        verdicts = self.runtime_verdicts()
        return {
            "passed": self.passed,
            "reference": self.reference,
            "tolerance": self.tolerance.to_json(),
            "tolerances": {p: t.to_json() for p, t in self.used_tolerances().items()},
            "summary": {rt: {"passed": passed,
                             "precision": next(c.precision for c in self.checks if c.runtime == rt),
                             "worst_max_abs": max(c.max_abs for c in self.checks if c.runtime == rt),
                             "worst_cosine": min(c.cosine for c in self.checks if c.runtime == rt),
                             "checks": sum(1 for c in self.checks if c.runtime == rt)}
                        for rt, passed in verdicts.items()},
            "skipped": [asdict(s) for s in self.skipped],
            "not_built": [asdict(s) for s in self.not_built],
            "checks": [asdict(c) for c in self.checks],
        }

    def worst_per_output(self) -> list[tuple[str, str, list[OutputCheck]]]:
        """(runtime, output, checks over all samples), in report order."""
        seen: dict[tuple[str, str], list[OutputCheck]] = {}
        for c in self.checks:
            seen.setdefault((c.runtime, c.output), []).append(c)
        return [(rt, out, checks) for (rt, out), checks in seen.items()]

    def table(self) -> str:
        """Per runtime and output, the worst case over samples."""
        rows = [("runtime", "output", "max_abs", "max_rel", "cosine", "verdict")]
        for runtime, output, checks in self.worst_per_output():
            rows.append((runtime, output, f"{max(c.max_abs for c in checks):.3g}",
                         f"{max(c.max_rel for c in checks):.3g}", f"{min(c.cosine for c in checks):.7f}",
                         "pass" if all(c.passed for c in checks) else "FAIL"))
        rows += [(s.runtime, "-", "-", "-", "-", f"skipped: {s.reason}") for s in self.skipped]
        rows += [(s.runtime, "-", "-", "-", "-", f"FAIL: not built: {first_line(s.reason)}") for s in self.not_built]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)

    def to_markdown(self, title: str = "Parity") -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        samples = sorted({c.sample for c in self.checks})
        lines = [f"# {title}: {verdict}", "",
                 f"Reference: {self.reference}. Samples: {', '.join(samples)}. Each row is the worst case over the "
                 "samples; a row passes when every element of every sample is inside the tolerance.", "",
                 "| precision | tolerance |", "|---|---|"]
        # A bare | would end the Markdown cell.
        lines += [f"| {p} | {t.describe().replace('|', chr(92) + '|')} |" for p, t in self.used_tolerances().items()]
        lines += ["", "| output | shape | backend | max abs | max rel | cosine | tolerance | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for runtime, output, checks in self.worst_per_output():
            ok = all(c.passed for c in checks)
            bad = sum(c.mismatched for c in checks)
            lines.append(f"| {output} | {'x'.join(map(str, checks[0].shape))} | {runtime} | "
                         f"{max(c.max_abs for c in checks):.3g} | {max(c.max_rel for c in checks):.3g} | "
                         f"{min(c.cosine for c in checks):.7f} | {checks[0].precision} | "
                         f"{'pass' if ok else f'**FAIL** ({bad} elements)'} |")
        if self.skipped:
            lines += ["", "Not run here:", ""] + [f"- {s.runtime}: {s.reason}" for s in self.skipped]
        if self.not_built:
            lines += ["", "**Could not be built** (a failure):", ""]
            lines += [f"- {s.runtime}: {first_line(s.reason)}" for s in self.not_built]
        return "\n".join(lines) + "\n"

    def to_junit(self, suite: str = "autoexport.parity") -> str:
        """JUnit XML: one test case per backend x output (all samples), skipped backends as skipped cases."""
        from xml.etree import ElementTree as ET

        cases = self.worst_per_output()
        failures = sum(1 for _, _, checks in cases if not all(c.passed for c in checks))
        root = ET.Element("testsuites")
        node = ET.SubElement(root, "testsuite", name=suite,
                             tests=str(len(cases) + len(self.skipped) + len(self.not_built)),
                             failures=str(failures + len(self.not_built)), errors="0", skipped=str(len(self.skipped)))
        for runtime, output, checks in cases:
            tol = self.tolerances[checks[0].precision]
            case = ET.SubElement(node, "testcase", classname=f"{suite}.{runtime}", name=output, time="0")
            props = ET.SubElement(case, "properties")
            for key, value in (("max_abs", max(c.max_abs for c in checks)), ("cosine", min(c.cosine for c in checks)),
                               ("tolerance", tol.describe()), ("samples", len(checks))):
                ET.SubElement(props, "property", name=key, value=str(value))
            failed = [c for c in checks if not c.passed]
            if failed:
                detail = "; ".join(f"{c.sample}: {c.mismatched}/{c.total} elements outside, max abs {c.max_abs:.3g}, "
                                   f"cosine {c.cosine:.6f} {c.note}".strip() for c in failed)
                ET.SubElement(case, "failure", message=f"{output} on {runtime} outside {tol.describe()}",
                              type="ParityFailure").text = detail
        for s in self.skipped:
            case = ET.SubElement(node, "testcase", classname=f"{suite}.{s.runtime}", name="all_outputs", time="0")
            ET.SubElement(case, "skipped", message=s.reason)
        for s in self.not_built:
            case = ET.SubElement(node, "testcase", classname=f"{suite}.{s.runtime}", name="build", time="0")
            ET.SubElement(case, "failure", message=f"{s.runtime} could not be built",
                          type="LoweringFailure").text = s.reason
        ET.indent(root)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _abs_diff(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """|actual - expected| elementwise; equal non-finite values (NaN with NaN, inf with inf) differ by 0, other
    non-finite pairs by inf."""
    with np.errstate(invalid="ignore"):
        diff = np.abs(actual - expected)
        same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    nonfinite = ~np.isfinite(actual) | ~np.isfinite(expected)
    return np.where(nonfinite, np.where(same, 0.0, np.inf), diff)


def _allowed(expected: np.ndarray, tol: Tolerance) -> np.ndarray:
    """The largest |actual - expected| the tolerance accepts per element (Tolerance's rule)."""
    return tol.atol + tol.rtol * np.abs(np.where(np.isfinite(expected), expected, 0.0))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two tensors taken as flat vectors, in float64; the project's one definition (parity,
    INT8/FP16 fidelity, the sensitivity profile). Non-finite elements count as 0 (nan_to_num), so one NaN does not
    hide the direction of the rest. Two zero vectors are as similar as can be when equal, else not at all."""
    a = np.nan_to_num(np.asarray(a, np.float64).ravel(), posinf=0.0, neginf=0.0)
    b = np.nan_to_num(np.asarray(b, np.float64).ravel(), posinf=0.0, neginf=0.0)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b / norm)


def elementwise(expected: np.ndarray, actual: np.ndarray, tol: Tolerance) -> dict:
    """The elementwise compare function: every element within |a-b| <= atol + rtol*|b| (and the cosine floor when
    the tolerance has one). Returns the check's numbers; `passed` is this rule's verdict."""
    if expected.shape != actual.shape:
        return dict(max_abs=float("inf"), max_rel=float("inf"), cosine=0.0, mismatched=int(expected.size),
                    total=int(expected.size), passed=False,
                    note=f"shape {list(actual.shape)} != expected {list(expected.shape)}")
    e = expected.astype(np.float64).ravel()
    a = actual.astype(np.float64).ravel()
    if e.size == 0:
        return dict(max_abs=0.0, max_rel=0.0, cosine=1.0, mismatched=0, total=0, passed=True, note="empty")
    diff = _abs_diff(e, a)
    bad = diff > _allowed(e, tol)
    rel = diff / np.maximum(np.abs(e), 1e-12)
    cos = cosine(e, a) if diff.any() else 1.0
    cosine_ok = tol.min_cosine is None or cos >= tol.min_cosine
    return dict(max_abs=float(diff.max()), max_rel=float(rel.max()), cosine=cos, mismatched=int(bad.sum()),
                total=int(e.size), passed=not bad.any() and cosine_ok,
                note="" if cosine_ok else f"cosine {cos:.6f} < {tol.min_cosine:g}")


compare_arrays = elementwise  # the name callers and benchmarks know


# Rows above this are not matched (the assignment is O(n^3) on an n x n cost matrix); such a set fails, saying so.
MAX_MATCHED_ROWS = 4096


def match_rows(expected: list[np.ndarray], actual: list[np.ndarray], tol: Tolerance) -> tuple[np.ndarray | None, str]:
    """A permutation p with every tensor's actual[p[i]] within tolerance of expected[i] for every row i, for
    tensors whose rows form one set (they share axis 0), or None and why there is none. Rows are matched by all
    their tensors' values together, so a box and its label or score move as one."""
    def rows(tensors: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([t.reshape(len(t), -1).astype(np.float64) for t in tensors], axis=1)

    if len({len(t) for t in expected + actual}) != 1:
        return None, f"{len(actual[0])} rows != expected {len(expected[0])}"
    e, a = rows(expected), rows(actual)
    if e.shape != a.shape:
        return None, f"row width {a.shape[1]} != expected {e.shape[1]}"
    bound = _allowed(e, tol)

    def cost(e_rows: np.ndarray, a_rows: np.ndarray, e_bound: np.ndarray) -> np.ndarray:
        """Largest difference over the row in units of the tolerance (<= 1: within it), by compare_arrays' rule."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(_abs_diff(e_rows, a_rows) / e_bound, nan=np.inf).max(-1)

    if len(e) == 0 or bool((cost(e, a, bound) <= 1.0).all()):
        return np.arange(len(e)), ""
    if len(e) > MAX_MATCHED_ROWS:
        return None, f"{len(e)} rows differ in order and are too many to match (> {MAX_MATCHED_ROWS})"
    from scipy.optimize import linear_sum_assignment  # mmdet depends on scipy; only needed here

    # pairs[i, j]: expected row i vs actual row j. Infeasible pairs get a cost no feasible assignment can reach,
    # so the assignment is all-feasible whenever one exists.
    pairs = np.empty((len(e), len(a)))
    for start in range(0, len(e), 256):
        block = slice(start, start + 256)
        pairs[block] = cost(e[block, None, :], a[None, :, :], bound[block, None, :])
    feasible = pairs <= 1.0
    rows_idx, cols = linear_sum_assignment(np.where(feasible, pairs, 2.0 * len(e) + 1.0))
    if not feasible[rows_idx, cols].all():
        unmatched = int((~feasible[rows_idx, cols]).sum())
        return None, f"{unmatched} of {len(e)} rows match no row of the reference within tolerance, in any order"
    return cols, ""


def compare_row_set(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                    tol: Tolerance) -> dict[str, dict]:
    """compare_arrays for tensors whose rows form one unordered set (a selection's kept boxes with their labels and
    scores, whose order near-tied scores may swap): rows are matched first (match_rows), then every tensor is
    compared under that permutation at the same tolerance. Each result says how many rows moved."""
    names = list(expected)
    order, why = match_rows([expected[n] for n in names], [actual[n] for n in names], tol)
    if order is None:
        in_order = {n: compare_arrays(expected[n], actual[n], tol) for n in names}
        return {n: {**m, "passed": False, "note": f"as a row set: {why}"} for n, m in in_order.items()}
    moved = int((order != np.arange(len(order))).sum())
    return {n: {**compare_arrays(expected[n], actual[n][order], tol), "rows_moved": moved} for n in names}


class Comparator:
    """Compares runners' outputs with reference outputs on named samples, each runner at the tolerance of
    its precision (Runner.precision)."""

    def __init__(self, tolerances: Tolerance | dict[str, Tolerance], reference: str = "eager") -> None:
        self.tolerances = tolerances_with(tolerances) if isinstance(tolerances, Tolerance) else dict(tolerances)
        self.reference = reference
        # (runtime, sample, output) -> what the runtime returned, for the checks that failed (for diagnosis).
        self.failed_outputs: dict[tuple[str, str, str], np.ndarray] = {}

    def compare(self, runners: Iterable[Runner], feeds: dict[str, Feed],
                expected: dict[str, dict[str, np.ndarray]], report: ParityReport | None = None) -> ParityReport:
        report = report or ParityReport(self.reference, self.tolerances)
        for runner in runners:
            tol = self.tolerances[runner.precision]
            for sample, feed in feeds.items():
                try:
                    actual = runner.infer(feed)
                except RunnerCrashed as crash:
                    # Every output of this sample fails with the crash as its note; the dead runner runs no more.
                    log.info("  %-14s vs %s on %-9s CRASHED: %s", runner.name, self.reference, sample, crash)
                    report.checks.extend(
                        OutputCheck(sample, runner.name, output, list(reference.shape), float("inf"), float("inf"),
                                    0.0, reference.size, reference.size, False, str(crash), tol.precision)
                        for output, reference in expected[sample].items())
                    break
                for output, reference in expected[sample].items():
                    got = actual.get(output)
                    if got is None:
                        report.checks.append(OutputCheck(sample, runner.name, output, list(reference.shape),
                                                         float("inf"), float("inf"), 0.0, reference.size,
                                                         reference.size, False, "output missing", tol.precision))
                        continue
                    metrics = compare_arrays(reference, got, tol)
                    report.checks.append(OutputCheck(sample, runner.name, output, list(reference.shape), **metrics,
                                                     precision=tol.precision))
                    if not metrics["passed"]:
                        self.failed_outputs[(runner.name, sample, output)] = got
                worst = [c for c in report.checks if c.runtime == runner.name and c.sample == sample]
                log.info("  %-14s vs %s on %-9s max_abs %.2e  min cosine %.7f  %s", runner.name, self.reference,
                         sample, max(c.max_abs for c in worst), min(c.cosine for c in worst),
                         "pass" if all(c.passed for c in worst) else "FAIL")
        return report


def measure_against_float64(report: ParityReport, failed_outputs: dict[tuple[str, str, str], np.ndarray],
                            expected: dict[str, dict[str, np.ndarray]],
                            expected64: dict[str, dict[str, np.ndarray]]) -> None:
    """Tells rounding from translation errors in failed fp32 checks: eager fp32 and the runtime are each compared
    with eager PyTorch run in float64, at the same tolerance. When eager fp32 misses float64 by as much as the
    runtime misses eager, the model's own fp32 rounding is at the tolerance's scale; a runtime far off float64
    while eager is close points at the translation. The verdict is not changed."""
    for check in report.failures():
        got = failed_outputs.get((check.runtime, check.sample, check.output))
        exact = expected64.get(check.sample, {}).get(check.output)
        if check.precision != "fp32" or got is None or exact is None or exact.dtype.kind != "f":
            continue
        tol = report.tolerances["fp32"]
        eager = compare_arrays(exact, expected[check.sample][check.output], tol)
        runtime = compare_arrays(exact, got, tol)
        check.float64 = {"eager_fp32_max_abs": eager["max_abs"], "eager_fp32_mismatched": eager["mismatched"],
                         "runtime_max_abs": runtime["max_abs"], "runtime_mismatched": runtime["mismatched"]}
        check.note = (f"{check.note} against eager float64: eager fp32 max abs {eager['max_abs']:.3g} "
                      f"({eager['mismatched']} outside), {check.runtime} {runtime['max_abs']:.3g} "
                      f"({runtime['mismatched']} outside)").strip()
