"""Stage 4, verify: one Comparator checks any runner against reference outputs, output by output,
element by element, with a stated tolerance."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .backends.runner import Feed, Runner, RunnerCrashed
from .errors import UserInputError

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


# The float64 rule's multiplier per precision of the artifact: PyTorch's accuracy checker for compiled and exported
# models (torch._dynamo.utils.same with fp64_ref) uses 2 for fp32 results and 3 for fp16/bf16 ones.
DEFAULT_MULTIPLIERS: dict[str, float] = {"fp32": 2.0, "tf32": 2.0, "fp16": 3.0}
PARITY_MODES = ("float64", "strict")
COMPARE_RULES = ("elementwise", "float64")


@dataclass(frozen=True)
class ParityPolicy:
    """Which compare function decides each output. `float64` (the default): an output within the elementwise
    tolerance passes; otherwise it passes when RMSE(artifact, float64) <= m * RMSE(eager fp32, float64) + atol/10,
    the same model run in float64 on the same inputs being the exact answer. `strict`: elementwise only. INT8 keeps
    its own rule (elementwise and cosine against the quantized eager model). `per_output` names the rule of single
    outputs, whatever the mode."""

    mode: str = "float64"
    multipliers: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MULTIPLIERS))
    per_output: dict[str, str] = field(default_factory=dict)

    def rule_for(self, output: str, precision: str) -> str:
        if precision == "int8":
            return "elementwise"
        return self.per_output.get(output, "elementwise" if self.mode == "strict" else "float64")

    def multiplier(self, precision: str) -> float:
        return self.multipliers.get(precision, DEFAULT_MULTIPLIERS["fp32"])

    def describe(self) -> str:
        if self.mode == "strict":
            return "strict: elementwise tolerance only"
        ms = ", ".join(f"{p} {m:g}" for p, m in self.multipliers.items())
        return (f"float64-referenced: elementwise tolerance, else RMSE(artifact, f64) <= m * RMSE(eager fp32, f64) "
                f"+ atol/10 (m: {ms})")

    def to_json(self) -> dict:
        return {"mode": self.mode, "multipliers": dict(self.multipliers), "per_output": dict(self.per_output),
                "rule": self.describe()}

    @staticmethod
    def from_json(data: dict | None) -> "ParityPolicy":
        data = data or {}
        return ParityPolicy(data.get("mode", "float64"), {**DEFAULT_MULTIPLIERS, **(data.get("multipliers") or {})},
                            dict(data.get("per_output") or {}))


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
    # For a check outside the elementwise tolerance: eager fp32 and this runtime, each measured against eager
    # PyTorch in float64 (max abs, elements outside, RMSE), the ratio of the RMSEs and the float64 rule's bound.
    float64: dict | None = None
    rule: str = "elementwise"  # the compare function that decided: elementwise, float64 or selection


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
    policy: ParityPolicy = field(default_factory=ParityPolicy)
    # Eager run again on the same inputs (same threads, then one thread): eager_consistency's result, when it ran.
    consistency: dict | None = None
    # --scope detections: the exported boxes against mmdet3d's own inference (detection_parity.DetectionParity).
    detections: Any = None

    @property
    def passed(self) -> bool:
        consistent = self.consistency is None or self.consistency.get("consistent", True)
        detections_ok = self.detections is None or self.detections.passed
        return (bool(self.checks) and all(c.passed for c in self.checks) and not self.not_built and consistent
                and detections_ok)

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

    def _summary(self, runtime: str, passed: bool) -> dict:
        mine = [c for c in self.checks if c.runtime == runtime]
        return {"passed": passed, "precision": mine[0].precision, "worst_max_abs": max(c.max_abs for c in mine),
                "worst_cosine": min(c.cosine for c in mine), "checks": len(mine),
                "decided_by": {r: sum(1 for c in mine if c.rule == r) for r in dict.fromkeys(c.rule for c in mine)}}

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "tolerance": self.tolerance.to_json(),
            "tolerances": {p: t.to_json() for p, t in self.used_tolerances().items()},
            "policy": self.policy.to_json(),
            "eager_consistency": self.consistency,
            "summary": {rt: self._summary(rt, passed) for rt, passed in self.runtime_verdicts().items()},
            "skipped": [asdict(s) for s in self.skipped],
            "not_built": [asdict(s) for s in self.not_built],
            "checks": [asdict(c) for c in self.checks],
            **({"detections": self.detections.to_json()} if self.detections is not None else {}),
        }

    def worst_per_output(self) -> list[tuple[str, str, list[OutputCheck]]]:
        """(runtime, output, checks over all samples), in report order."""
        seen: dict[tuple[str, str], list[OutputCheck]] = {}
        for c in self.checks:
            seen.setdefault((c.runtime, c.output), []).append(c)
        return [(rt, out, checks) for (rt, out), checks in seen.items()]

    # The formats live in report.py, one place for every way parity is shown.
    def table(self) -> str:
        from .report import parity_table

        return parity_table(self)

    def to_markdown(self, title: str = "Parity") -> str:
        from .report import parity_markdown

        return parity_markdown(self, title)

    def to_junit(self, suite: str = "autoexport.parity") -> str:
        from .report import parity_junit

        return parity_junit(self, suite)


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

    def __init__(self, tolerances: Tolerance | dict[str, Tolerance], reference: str = "eager",
                 policy: ParityPolicy | None = None, row_sets: tuple[tuple[str, ...], ...] = ()) -> None:
        self.tolerances = tolerances_with(tolerances) if isinstance(tolerances, Tolerance) else dict(tolerances)
        self.reference = reference
        self.policy = policy or ParityPolicy()
        # Groups of outputs whose rows form one unordered set (kept boxes with their scores and labels): compared
        # with compare_row_set, so near-tied scores that swap two rows are not a mismatch.
        self.row_sets = row_sets
        # (runtime, sample, output) -> what the runtime returned, for the checks that failed (for diagnosis).
        self.failed_outputs: dict[tuple[str, str, str], np.ndarray] = {}

    def compare(self, runners: Iterable[Runner], feeds: dict[str, Feed],
                expected: dict[str, dict[str, np.ndarray]], report: ParityReport | None = None) -> ParityReport:
        report = report or ParityReport(self.reference, self.tolerances)
        report.policy = self.policy
        known = {name for outputs in expected.values() for name in outputs}
        unknown = sorted(set(self.policy.per_output) - known)
        if unknown:
            raise UserInputError(f"--compare names no output of this model: {', '.join(unknown)}; its outputs: "
                                 f"{', '.join(sorted(known))}")
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
                as_sets = self._row_set_metrics(expected[sample], actual, tol)
                for output, reference in expected[sample].items():
                    got = actual.get(output)
                    if got is None:
                        report.checks.append(OutputCheck(sample, runner.name, output, list(reference.shape),
                                                         float("inf"), float("inf"), 0.0, reference.size,
                                                         reference.size, False, "output missing", tol.precision))
                        continue
                    metrics = as_sets.get(output) or compare_arrays(reference, got, tol)
                    report.checks.append(OutputCheck(sample, runner.name, output, list(reference.shape), **metrics,
                                                     precision=tol.precision))
                    if not metrics["passed"]:
                        self.failed_outputs[(runner.name, sample, output)] = got
                worst = [c for c in report.checks if c.runtime == runner.name and c.sample == sample]
                log.info("  %-14s vs %s on %-9s max_abs %.2e  min cosine %.7f  %s", runner.name, self.reference,
                         sample, max(c.max_abs for c in worst), min(c.cosine for c in worst),
                         "pass" if all(c.passed for c in worst) else "FAIL")
        return report


    def _row_set_metrics(self, expected: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                         tol: Tolerance) -> dict[str, dict]:
        """Metrics of row-set outputs whose rows match the reference's as a set at the tolerance; a group that does
        not match as a set is left to the in-order comparison (and its float64 rule), so noise beyond the elementwise
        tolerance in a network whose eager fp32 is itself that far from float64 is judged as everywhere else."""
        metrics: dict[str, dict] = {}
        for group in self.row_sets:
            if not all(n in expected and n in actual for n in group):
                continue
            as_set = compare_row_set({n: expected[n] for n in group}, {n: actual[n] for n in group}, tol)
            if not all(m["passed"] for m in as_set.values()):
                continue
            for name, m in as_set.items():
                moved = m.pop("rows_moved", 0)
                metrics[name] = {**m, "note": f"rows compared as a set, {moved} moved" if moved else m.get("note", "")}
        return metrics


def rmse(exact: np.ndarray, other: np.ndarray) -> float:
    """Root mean squared error in float64; equal non-finite values differ by 0, others by inf (as elementwise)."""
    diff = _abs_diff(np.asarray(exact, np.float64).ravel(), np.asarray(other, np.float64).ravel())
    return float(np.sqrt(np.mean(np.square(diff)))) if diff.size else 0.0


def selection(expected: np.ndarray, actual: np.ndarray, exact: np.ndarray) -> dict:
    """The compare function of index outputs (furthest point sampling, top-k, NMS keep lists) that differ from the
    eager reference: the artifact passes where, at every element it differs from eager fp32, it chose as the
    float64 run did (eager fp32 took the other side of a near-tie). A choice float64 did not make fails."""
    differs = actual != expected
    as_float64 = bool((actual[differs] == exact[differs]).all())
    eager_off = int((expected != exact).sum())
    return {"passed": as_float64, "rule": "selection",
            "float64": {"differing": int(differs.sum()), "as_float64": int((actual[differs] == exact[differs]).sum()),
                        "eager_fp32_off_float64": eager_off}}


def float64_referenced(expected: np.ndarray, actual: np.ndarray, exact: np.ndarray | None, tol: Tolerance,
                       multiplier: float) -> dict:
    """The float64-referenced compare function (torch._dynamo.utils.same with fp64_ref): within the elementwise
    tolerance passes; otherwise pass when RMSE(actual, exact) <= multiplier * RMSE(expected, exact) + atol / 10,
    `exact` being the same model run in float64 on the same inputs. The elementwise numbers are kept."""
    plain = {**elementwise(expected, actual, tol), "rule": "elementwise"}
    if plain["passed"] or exact is None or expected.shape != actual.shape:
        return plain
    if exact.shape != expected.shape:
        return {**plain, "note": f"{plain['note']} float64 run has shape {list(exact.shape)}: not comparable".strip()}
    if expected.dtype.kind in "iub":
        return {**plain, **selection(expected, actual, exact)}
    eager, runtime = elementwise(exact, expected, tol), elementwise(exact, actual, tol)
    eager_rmse, runtime_rmse = rmse(exact, expected), rmse(exact, actual)
    bound = multiplier * eager_rmse + tol.atol / 10
    ratio = runtime_rmse / eager_rmse if eager_rmse > 0 else (0.0 if runtime_rmse == 0 else float("inf"))
    numbers = {"eager_fp32_max_abs": eager["max_abs"], "eager_fp32_mismatched": eager["mismatched"],
               "runtime_max_abs": runtime["max_abs"], "runtime_mismatched": runtime["mismatched"],
               "eager_fp32_rmse": eager_rmse, "runtime_rmse": runtime_rmse, "ratio": ratio,
               "multiplier": multiplier, "bound": bound, "passed": bool(runtime_rmse <= bound)}
    return {**plain, "passed": numbers["passed"], "rule": "float64", "float64": numbers}


def _float64_note(runtime: str, rule: str, f64: dict) -> str:
    if rule == "selection":
        return (f"selection: {f64['as_float64']} of {f64['differing']} differing elements chose as float64 did "
                f"(eager fp32 itself differs from float64 at {f64['eager_fp32_off_float64']})")
    verdict = "<=" if f64["passed"] else ">"
    return (f"against eager float64: eager fp32 max abs {f64['eager_fp32_max_abs']:.3g} "
            f"({f64['eager_fp32_mismatched']} outside), {runtime} {f64['runtime_max_abs']:.3g} "
            f"({f64['runtime_mismatched']} outside); RMSE {f64['runtime_rmse']:.3g} {verdict} {f64['multiplier']:g} x "
            f"eager {f64['eager_fp32_rmse']:.3g} + atol/10 = {f64['bound']:.3g}")


def measure_against_float64(report: ParityReport, failed_outputs: dict[tuple[str, str, str], np.ndarray],
                            expected: dict[str, dict[str, np.ndarray]],
                            expected64: dict[str, dict[str, np.ndarray]]) -> None:
    """Decides the checks outside the elementwise tolerance by the report's policy: under the float64 rule (and
    the selection rule for index outputs) from the float64 run; under `strict` the numbers are only recorded and
    the verdict stays failed. INT8 checks (whose reference is the quantized model) are left as they are."""
    for check in report.failures():
        got = failed_outputs.get((check.runtime, check.sample, check.output))
        exact = expected64.get(check.sample, {}).get(check.output)
        if check.precision == "int8" or got is None or exact is None:
            continue
        tol = report.tolerances[check.precision]
        decided = float64_referenced(expected[check.sample][check.output], got, exact, tol,
                                     report.policy.multiplier(check.precision))
        if "float64" not in decided:
            continue
        check.float64 = decided["float64"]
        if report.policy.rule_for(check.output, check.precision) != "elementwise":
            check.passed, check.rule = decided["passed"], decided["rule"]
        check.note = f"{check.note} {_float64_note(check.runtime, decided['rule'], check.float64)}".strip()


def _agreement(expected: dict[str, dict[str, np.ndarray]], again: dict[str, dict[str, np.ndarray]],
               tol: Tolerance) -> dict:
    """How far a second eager run is from the first: bitwise equal, or the largest difference and whether every
    element is within the elementwise tolerance."""
    bitwise, within, worst, differing = True, True, 0.0, []
    for sample, outputs in expected.items():
        for name, first in outputs.items():
            second = again[sample][name]
            if first.shape == second.shape and np.array_equal(first, second, equal_nan=first.dtype.kind == "f"):
                continue
            m = elementwise(first, second, tol)
            bitwise, within, worst = False, within and m["passed"], max(worst, m["max_abs"])
            differing.append(f"{sample}/{name}")
    return {"bitwise": bitwise, "within_tolerance": within, "max_abs": worst, "differing": differing}


def eager_consistency(run: Callable[[Feed], dict[str, np.ndarray]], feeds: dict[str, Feed],
                      expected: dict[str, dict[str, np.ndarray]], tol: Tolerance) -> dict:
    """Eager PyTorch run again on the same inputs: at the same thread count it must agree with the reference (the
    stated bound: the elementwise tolerance; on CPU it is bitwise), else the reference disagrees with itself and
    no verdict measured against it holds. Where more than one thread runs, a run at one thread is reported too:
    intra-op parallelism changes the order of float sums (ImVoteNet's stage 1), which is rounding, not a fault."""
    import torch

    repeat = _agreement(expected, {s: run(f) for s, f in feeds.items()}, tol)
    threads = torch.get_num_threads()
    one_thread = None
    if threads > 1:
        torch.set_num_threads(1)
        try:
            one_thread = _agreement(expected, {s: run(f) for s, f in feeds.items()}, tol)
        finally:
            torch.set_num_threads(threads)
    return {"consistent": repeat["within_tolerance"], "threads": threads, "samples": sorted(feeds),
            "repeat": repeat, "one_thread": one_thread}
