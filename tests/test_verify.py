import numpy as np
import torch

from autoexport.backends.runner import Runner
from autoexport.verify import Comparator, Tolerance, compare_arrays, compare_row_set

TOL = Tolerance(1e-4, 1e-4)


def test_identical_arrays_pass_with_cosine_one():
    a = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    m = compare_arrays(a, a.copy(), TOL)
    assert m["passed"] and m["max_abs"] == 0.0 and abs(m["cosine"] - 1.0) < 1e-12


def test_rule_is_atol_plus_rtol_times_reference():
    expected = np.array([0.0, 100.0], np.float32)
    inside = expected + np.array([0.9e-4, 0.9e-4 + 100 * 0.9e-4], np.float32)
    assert compare_arrays(expected, inside, TOL)["passed"]
    outside = expected + np.array([0.0, 1e-4 + 100 * 1e-4 + 1e-3], np.float32)
    m = compare_arrays(expected, outside, TOL)
    assert not m["passed"] and m["mismatched"] == 1


def test_one_perturbed_element_fails_and_nan_fails():
    a = np.ones((1000,), np.float32)
    b = a.copy()
    b[17] += 0.01
    m = compare_arrays(a, b, TOL)
    assert not m["passed"] and m["mismatched"] == 1 and abs(m["max_abs"] - 0.01) < 1e-6
    b = a.copy()
    b[3] = np.nan
    assert not compare_arrays(a, b, TOL)["passed"]


def test_shape_mismatch_fails():
    m = compare_arrays(np.zeros((2, 3)), np.zeros((3, 2)), TOL)
    assert not m["passed"] and "shape" in m["note"]



def _boxes(n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"boxes": rng.uniform(-40, 40, size=(n, 7)).astype(np.float32),
            "labels": rng.integers(0, 3, size=n), "scores": rng.uniform(size=n).astype(np.float32)}


def test_a_row_set_in_another_order_matches_and_is_compared_under_the_permutation():
    expected = _boxes()
    order = np.random.default_rng(6).permutation(40)
    actual = {k: v[order] for k, v in expected.items()}
    actual["boxes"] = actual["boxes"] * np.float32(1 + 5e-5)  # within 1e-4 + 1e-4*|b|, not 0
    in_order = compare_arrays(expected["boxes"], actual["boxes"], TOL)
    assert not in_order["passed"]
    results = compare_row_set(expected, actual, TOL)
    assert all(m["passed"] for m in results.values())
    assert results["boxes"]["rows_moved"] == int((order != np.arange(40)).sum()) > 30
    # Measured on the matched rows (5e-5 * the largest |coordinate|), not on the misordered ones (tens of metres).
    assert abs(results["boxes"]["max_abs"] - 5e-5 * np.abs(expected["boxes"]).max()) < 1e-4


def test_a_row_set_fails_on_one_row_outside_tolerance_a_swapped_label_or_another_count():
    expected = _boxes()
    order = np.arange(40)[::-1]
    moved = {k: v[order].copy() for k, v in expected.items()}
    moved["boxes"][7, 2] += 0.5  # one box coordinate off: no row of the reference is within tolerance of it
    results = compare_row_set(expected, moved, TOL)
    assert not any(m["passed"] for m in results.values())
    assert "1 of 40 rows match no row" in results["boxes"]["note"]
    relabeled = {k: v[order].copy() for k, v in expected.items()}
    relabeled["labels"][3] = (relabeled["labels"][3] + 1) % 3  # boxes and scores equal, the label differs
    assert not compare_row_set(expected, relabeled, TOL)["labels"]["passed"]
    fewer = {k: v[:39] for k, v in expected.items()}
    assert "39 rows != expected 40" in compare_row_set(expected, fewer, TOL)["scores"]["note"]


class _Offset(Runner):
    name = "offset"

    def __init__(self, offset: float) -> None:
        super().__init__(["x"], ["y"])
        self.offset = offset

    def infer(self, feed):
        return {"y": feed["x"] * 2 + self.offset}


def test_comparator_reports_each_runner_sample_and_output():
    feeds = {"s0": {"x": np.arange(4, dtype=np.float32)}, "s1": {"x": np.ones(3, np.float32)}}
    expected = {k: {"y": v["x"] * 2} for k, v in feeds.items()}
    report = Comparator(TOL).compare([_Offset(0.0), _Offset(1e-2)], feeds, expected)
    assert len(report.checks) == 4
    assert not report.passed
    assert {(c.sample, c.passed) for c in report.checks if c.runtime == "offset"} == {("s0", True), ("s1", True), ("s0", False), ("s1", False)}
    summary = report.to_json()["summary"]["offset"]
    assert summary["checks"] == 4 and abs(summary["worst_max_abs"] - 1e-2) < 1e-6


def test_failed_fp32_checks_are_measured_against_float64():
    """A failure is put against eager float64: here eager fp32 is itself 3e-4 off the exact value (rounding at the
    tolerance's scale) while the runtime is 5e-4 off on another element; under --parity strict the verdict stays
    failed (the default float64 rule passes this case: test_the_float64_rule_passes_rounding_the_reference_shares)."""
    from autoexport.verify import ParityPolicy, measure_against_float64

    exact = np.array([1.0, 2.0, 3.0])
    eager32 = np.array([1.0 + 3e-4, 2.0, 3.0], np.float32)
    runtime = np.array([1.0 + 3e-4, 2.0 + 5e-4, 3.0], np.float32)

    class _Fixed(Runner):
        name = "fixed"

        def __init__(self) -> None:
            super().__init__(["x"], ["y"])

        def infer(self, feed):
            return {"y": runtime}

    comparator = Comparator(TOL, policy=ParityPolicy("strict"))
    report = comparator.compare([_Fixed()], {"s": {"x": exact}}, {"s": {"y": eager32}})
    assert not report.passed and set(comparator.failed_outputs) == {("fixed", "s", "y")}
    measure_against_float64(report, comparator.failed_outputs, {"s": {"y": eager32}}, {"s": {"y": exact}})
    check = report.failures()[0]
    assert check.float64["eager_fp32_mismatched"] == 1 and check.float64["runtime_mismatched"] == 2
    assert abs(check.float64["eager_fp32_max_abs"] - 3e-4) < 1e-6
    assert abs(check.float64["runtime_max_abs"] - 5e-4) < 1e-6
    assert "against eager float64" in check.note and not report.passed


def test_a_row_set_treats_equal_nan_as_equal_and_refuses_to_match_too_many_rows(monkeypatch):
    import autoexport.verify as verify

    expected = _boxes(6)
    expected["boxes"][2, 4] = np.nan  # a NaN in both, as compare_arrays allows, moves with its row
    actual = {k: v[::-1].copy() for k, v in expected.items()}
    assert all(m["passed"] and m["rows_moved"] == 6 for m in compare_row_set(expected, actual, TOL).values())
    actual["boxes"][3, 4] = 0.0  # the NaN row's value replaced: that row now matches nothing
    assert "1 of 6 rows match no row" in compare_row_set(expected, actual, TOL)["boxes"]["note"]
    monkeypatch.setattr(verify, "MAX_MATCHED_ROWS", 4)
    reversed_rows = {k: v[::-1].copy() for k, v in expected.items()}
    assert "too many to match (> 4)" in compare_row_set(expected, reversed_rows, TOL)["labels"]["note"]


def test_float64_yardstick_keeps_mmdet3d_points_in_float64():
    """BasePoints casts to float32, which a float64 model run cannot pass (MVX-Net's point fusion rotates wrapped
    points by a float64 matrix): inside the yardstick's context a float64 tensor stays float64 and unrounded."""
    from mmdet3d.structures import LiDARPoints

    from autoexport.pipeline import float64_points

    exact = torch.tensor([[0.1, 0.2, 0.3, 1.0 / 3.0]], dtype=torch.float64)
    with float64_points():
        kept = LiDARPoints(exact, points_dim=4)
        from_float32 = LiDARPoints(exact.float(), points_dim=4)
        kept.rotate(torch.eye(3, dtype=torch.float64))  # float @ double raised here before
    assert kept.tensor.dtype == torch.float64 and torch.equal(kept.tensor, exact)
    assert kept.tensor.data_ptr() != exact.data_ptr()  # a copy, as BasePoints makes
    assert from_float32.tensor.dtype == torch.float32
    assert LiDARPoints(exact, points_dim=4).tensor.dtype == torch.float32  # mmdet3d's own behaviour restored
