"""Stage 4, verify: one Comparator checks any runner against reference outputs, output by output,
element by element, with a stated tolerance."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from .runners import Feed, Runner

log = logging.getLogger("autoexport")


@dataclass(frozen=True)
class Tolerance:
    """An element passes when |actual - expected| <= atol + rtol * |expected| (numpy.isclose's rule)."""

    atol: float = 1e-4
    rtol: float = 1e-4
    precision: str = "fp32"

    def describe(self) -> str:
        return f"|a-b| <= {self.atol:g} + {self.rtol:g}*|b|"


DEFAULT_TOLERANCES = {"fp32": Tolerance(1e-4, 1e-4, "fp32")}


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


@dataclass
class ParityReport:
    reference: str
    tolerance: Tolerance
    checks: list[OutputCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict:
        runtimes = sorted({c.runtime for c in self.checks})
        return {
            "passed": self.passed,
            "reference": self.reference,
            "tolerance": {**asdict(self.tolerance), "rule": self.tolerance.describe()},
            "summary": {rt: {"passed": all(c.passed for c in self.checks if c.runtime == rt),
                             "worst_max_abs": max(c.max_abs for c in self.checks if c.runtime == rt),
                             "worst_cosine": min(c.cosine for c in self.checks if c.runtime == rt),
                             "checks": sum(1 for c in self.checks if c.runtime == rt)}
                        for rt in runtimes},
            "checks": [asdict(c) for c in self.checks],
        }

    def table(self) -> str:
        """Per runtime and output, the worst case over samples."""
        rows = [("runtime", "output", "max_abs", "max_rel", "cosine", "verdict")]
        seen: dict[tuple[str, str], list[OutputCheck]] = {}
        for c in self.checks:
            seen.setdefault((c.runtime, c.output), []).append(c)
        for (runtime, output), checks in seen.items():
            rows.append((runtime, output, f"{max(c.max_abs for c in checks):.3g}",
                         f"{max(c.max_rel for c in checks):.3g}", f"{min(c.cosine for c in checks):.7f}",
                         "pass" if all(c.passed for c in checks) else "FAIL"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)


def compare_arrays(expected: np.ndarray, actual: np.ndarray, tol: Tolerance) -> dict:
    if expected.shape != actual.shape:
        return dict(max_abs=float("inf"), max_rel=float("inf"), cosine=0.0, mismatched=int(expected.size),
                    total=int(expected.size), passed=False,
                    note=f"shape {list(actual.shape)} != expected {list(expected.shape)}")
    e = expected.astype(np.float64).ravel()
    a = actual.astype(np.float64).ravel()
    if e.size == 0:
        return dict(max_abs=0.0, max_rel=0.0, cosine=1.0, mismatched=0, total=0, passed=True, note="empty")
    diff = np.abs(a - e)
    nonfinite = ~np.isfinite(a) | ~np.isfinite(e)
    same_nonfinite = nonfinite & ((a == e) | (np.isnan(a) & np.isnan(e)))
    diff = np.where(same_nonfinite, 0.0, diff)
    diff = np.where(nonfinite & ~same_nonfinite, np.inf, diff)
    bad = diff > tol.atol + tol.rtol * np.abs(np.where(np.isfinite(e), e, 0.0))
    rel = diff / np.maximum(np.abs(e), 1e-12)
    norm = np.linalg.norm(a[np.isfinite(a)]) * np.linalg.norm(e[np.isfinite(e)])
    cosine = float(np.dot(np.nan_to_num(a), np.nan_to_num(e)) / norm) if norm > 0 else (1.0 if not diff.any() else 0.0)
    return dict(max_abs=float(diff.max()), max_rel=float(rel.max()), cosine=cosine, mismatched=int(bad.sum()),
                total=int(e.size), passed=not bad.any(), note="")


class Comparator:
    """Compares runners' outputs with reference outputs on named samples."""

    def __init__(self, tolerance: Tolerance, reference: str = "eager") -> None:
        self.tolerance = tolerance
        self.reference = reference

    def compare(self, runners: Iterable[Runner], feeds: dict[str, Feed],
                expected: dict[str, dict[str, np.ndarray]], report: ParityReport | None = None) -> ParityReport:
        report = report or ParityReport(self.reference, self.tolerance)
        for runner in runners:
            for sample, feed in feeds.items():
                actual = runner.infer(feed)
                for output, reference in expected[sample].items():
                    got = actual.get(output)
                    if got is None:
                        report.checks.append(OutputCheck(sample, runner.name, output, list(reference.shape),
                                                         float("inf"), float("inf"), 0.0, reference.size,
                                                         reference.size, False, "output missing"))
                        continue
                    metrics = compare_arrays(reference, got, self.tolerance)
                    report.checks.append(OutputCheck(sample, runner.name, output, list(reference.shape), **metrics))
                worst = [c for c in report.checks if c.runtime == runner.name and c.sample == sample]
                log.info("  %-11s vs %s on %-9s max_abs %.2e  min cosine %.7f  %s", runner.name, self.reference,
                         sample, max(c.max_abs for c in worst), min(c.cosine for c in worst),
                         "pass" if all(c.passed for c in worst) else "FAIL")
        return report
