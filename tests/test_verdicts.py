"""The float64-referenced verdict (torch._dynamo.utils.same with fp64_ref) and the selection rule, on numbers
worked out by hand; the same rule on real exports is in test_verdicts_models.py."""

import json
import math
from xml.etree import ElementTree as ET

import numpy as np

from autoexport.backends.runner import Runner
from autoexport.verify import (Comparator, ParityPolicy, Tolerance, float64_referenced, measure_against_float64,
                               rmse, selection)

TOL = Tolerance(1e-4, 1e-4)
EXACT = np.array([1.0, 2.0, 3.0])
EAGER32 = np.array([1.0 + 3e-4, 2.0, 3.0], np.float32)  # the reference's own rounding: RMSE 3e-4/sqrt(3)


def test_rmse_treats_equal_non_finite_values_as_equal():
    assert rmse(np.array([np.nan, np.inf, 1.0]), np.array([np.nan, np.inf, 1.0])) == 0.0
    assert math.isinf(rmse(np.array([np.nan, 1.0]), np.array([0.0, 1.0])))
    assert abs(rmse(np.array([0.0, 0.0]), np.array([3.0, 4.0])) - math.sqrt(12.5)) < 1e-12


def test_the_float64_rule_passes_rounding_the_reference_shares():
    runtime = np.array([1.0 + 3e-4, 2.0 + 5e-4, 3.0], np.float32)  # 1 element outside 1e-4 + 1e-4|b| of eager
    m = float64_referenced(EAGER32, runtime, EXACT, TOL, 2.0)
    f = m["float64"]
    assert m["mismatched"] == 1 and m["rule"] == "float64" and m["passed"]
    assert abs(f["eager_fp32_rmse"] - 3e-4 / math.sqrt(3)) < 1e-7  # 1.0003 rounded to float32
    assert abs(f["runtime_rmse"] - math.sqrt((9e-8 + 25e-8) / 3)) < 1e-7
    assert abs(f["bound"] - (2 * 3e-4 / math.sqrt(3) + 1e-5)) < 2e-7 and 1.9 < f["ratio"] < 2.0


def test_the_float64_rule_fails_an_error_the_reference_does_not_share():
    runtime = np.array([1.0 + 3e-4, 2.0 + 1e-3, 3.0], np.float32)  # RMSE 6.07e-4 > 2 x 1.73e-4 + 1e-5
    m = float64_referenced(EAGER32, runtime, EXACT, TOL, 2.0)
    assert not m["passed"] and m["rule"] == "float64" and m["float64"]["ratio"] > 3.4
    # An fp16 artifact gets 3x: 6.07e-4 > 3 x 1.73e-4 + 1e-5 = 5.3e-4 still fails; 4.9e-4 passes at 3x, not at 2x.
    assert not float64_referenced(EAGER32, runtime, EXACT, TOL, 3.0)["passed"]
    closer = np.array([1.0 + 3e-4, 2.0 + 7.5e-4, 3.0], np.float32)
    assert float64_referenced(EAGER32, closer, EXACT, TOL, 3.0)["passed"]
    assert not float64_referenced(EAGER32, closer, EXACT, TOL, 2.0)["passed"]


def test_an_exact_reference_leaves_only_atol_over_ten():
    """Eager fp32 equal to float64 (RMSE 0): the artifact may be off by atol/10 in RMSE, no more."""
    exact = np.zeros(100)
    assert float64_referenced(exact.astype(np.float32), np.full(100, 2e-4, np.float32), exact, TOL, 2.0)["passed"] is False
    inside = np.zeros(100, np.float32)
    inside[0] = 9e-5  # RMSE 9e-6 <= 1e-5, also within the elementwise tolerance
    assert float64_referenced(exact.astype(np.float32), inside, exact, TOL, 2.0)["rule"] == "elementwise"


def test_selection_passes_a_choice_float64_made_and_fails_one_it_did_not():
    exact = np.array([4, 9, 2, 7])
    eager = np.array([4, 8, 2, 7])  # eager fp32 took the other side of a near-tie at position 1
    assert selection(eager, exact.copy(), exact)["passed"]
    m = float64_referenced(eager, np.array([4, 9, 2, 7]), exact, TOL, 2.0)
    assert m["passed"] and m["rule"] == "selection" and m["float64"]["eager_fp32_off_float64"] == 1
    wrong = float64_referenced(eager, np.array([4, 9, 3, 7]), exact, TOL, 2.0)
    assert not wrong["passed"] and wrong["float64"]["differing"] == 2 and wrong["float64"]["as_float64"] == 1


class _Fixed(Runner):
    name = "fixed"

    def __init__(self, outputs: dict) -> None:
        super().__init__(["x"], list(outputs))
        self.outputs = outputs

    def infer(self, feed):
        return dict(self.outputs)


def _decided(policy: ParityPolicy, runtime: np.ndarray):
    comparator = Comparator(TOL, policy=policy)
    report = comparator.compare([_Fixed({"y": runtime})], {"s": {"x": EXACT}}, {"s": {"y": EAGER32}})
    measure_against_float64(report, comparator.failed_outputs, {"s": {"y": EAGER32}}, {"s": {"y": EXACT}})
    return report


def test_reports_say_which_rule_decided_with_both_rmses_and_their_ratio():
    report = _decided(ParityPolicy(), np.array([1.0 + 3e-4, 2.0 + 5e-4, 3.0], np.float32))
    assert report.passed
    data = json.loads(json.dumps(report.to_json()))
    check = data["checks"][0]
    assert check["rule"] == "float64" and check["passed"] and check["mismatched"] == 1
    assert abs(check["float64"]["runtime_rmse"] - 3.367e-4) < 1e-7 and data["summary"]["fixed"]["decided_by"] == {"float64": 1}
    assert data["policy"]["mode"] == "float64" and data["policy"]["multipliers"]["fp16"] == 3.0
    md = report.to_markdown()
    assert "| y | 3 | fixed |" in md and "| pass (1 elements outside the elementwise tolerance) | float64 | 0.000337 | 0.000173 | 1.94 |" in md
    props = {p.get("name"): p.get("value") for p in ET.fromstring(report.to_junit()).iter("property")}
    assert props["rule"] == "float64" and props["rmse_ratio"] == "1.94"


def test_strict_and_per_output_elementwise_keep_todays_rule():
    runtime = np.array([1.0 + 3e-4, 2.0 + 5e-4, 3.0], np.float32)
    for policy in (ParityPolicy("strict"), ParityPolicy(per_output={"y": "elementwise"})):
        report = _decided(policy, runtime)
        check = report.checks[0]
        assert not report.passed and check.rule == "elementwise" and check.float64["passed"]  # measured, not used
    assert ParityPolicy().rule_for("y", "int8") == "elementwise"


def test_a_reference_that_disagrees_with_itself_is_reported_and_fails():
    from autoexport.verify import eager_consistency

    feeds = {"s": {"x": np.linspace(0, 1, 1000, dtype=np.float32)}}
    expected = {"s": {"y": feeds["s"]["x"] * 3}}
    steady = eager_consistency(lambda f: {"y": f["x"] * 3}, feeds, expected, TOL)
    assert steady["consistent"] and steady["repeat"]["bitwise"] and steady["repeat"]["max_abs"] == 0.0
    calls = iter(range(1, 10))  # every run drifts by another 1e-3
    drifting = eager_consistency(lambda f: {"y": f["x"] * 3 + 1e-3 * next(calls)}, feeds, expected, TOL)
    assert not drifting["consistent"] and drifting["repeat"]["differing"] == ["s/y"]
    assert abs(drifting["repeat"]["max_abs"] - 1e-3) < 1e-6 and not drifting["repeat"]["bitwise"]
    report = _decided(ParityPolicy(), EAGER32.copy())
    assert report.passed
    report.consistency = drifting
    assert not report.passed and "disagrees with itself" in report.to_markdown()
    suite = ET.fromstring(report.to_junit()).find("testsuite")
    assert suite.get("failures") == "1" and suite.find("testcase[@name='self_consistency']") is not None
