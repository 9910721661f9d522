import math
import re

import numpy as np
import pandas as pd
import pytest

from scvi_ext.metrics import (
    accuracy,
    balanced_accuracy,
    classification_report,
    expected_calibration_error,
    macro_f1,
    novelty_auroc,
    novelty_precision_coverage,
    reliability_curve,
    weighted_f1,
)

# 6 cells: class a (4 cells, 3 right), class b (2 cells, 1 right, 1 called a).
Y_TRUE = ["a", "a", "a", "a", "b", "b"]
Y_PRED = ["a", "a", "a", "b", "b", "a"]


def test_accuracy_and_balanced_accuracy_on_strings():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    # recall a = 3/4, recall b = 1/2
    assert balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert accuracy(pd.Categorical(Y_TRUE), np.array(Y_PRED)) == pytest.approx(4 / 6)


def test_f1_scores_hand_computed():
    # a: precision 3/4, recall 3/4 -> F1 3/4; b: precision 1/2, recall 1/2 -> F1 1/2
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx((0.75 + 0.5) / 2)
    assert weighted_f1(Y_TRUE, Y_PRED) == pytest.approx((4 * 0.75 + 2 * 0.5) / 6)


def test_macro_f1_counts_predicted_classes_absent_from_truth():
    assert macro_f1(["a", "a"], ["a", "c"]) == pytest.approx((2 / 3 + 0) / 2)


def test_classification_metrics_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="different lengths"):
        accuracy(["a", "b"], ["a"])


def test_ece_is_zero_when_perfectly_calibrated():
    # 10 predictions at 0.8 with 8 right, 5 at 0.6 with 3 right.
    confidence = [0.8] * 10 + [0.6] * 5
    y_true = ["x"] * 15
    y_pred = ["x"] * 8 + ["y"] * 2 + ["x"] * 3 + ["y"] * 2
    assert expected_calibration_error(y_true, y_pred, confidence) == pytest.approx(0.0)


def test_ece_hand_computed():
    # bin [0.9, 1.0]: 4 cells at 0.95, 2 right -> gap 0.45; bin [0.3, 0.4): 2 cells at
    # 0.35, both right -> gap 0.65. ECE = 4/6 * 0.45 + 2/6 * 0.65.
    confidence = [0.95, 0.95, 0.95, 0.95, 0.35, 0.35]
    y_true = ["a"] * 6
    y_pred = ["a", "a", "b", "b", "a", "a"]
    expected = 4 / 6 * 0.45 + 2 / 6 * 0.65
    assert expected_calibration_error(y_true, y_pred, confidence, n_bins=10) == pytest.approx(
        expected
    )


def test_ece_of_always_wrong_confident_classifier_is_confidence():
    assert expected_calibration_error(["a"] * 3, ["b"] * 3, [0.7] * 3) == pytest.approx(0.7)


@pytest.mark.parametrize("n_bins", [10, 15])
def test_a_confidence_on_a_bin_edge_opens_that_bin(n_bins):
    """Bins are [k / n, (k + 1) / n): k / n itself belongs to bin k (0.3, 0.6 and 0.7 lie
    a rounding error below their linspace edges)."""
    edges = [k / n_bins for k in range(n_bins)]
    curve = reliability_curve(["a"] * n_bins, ["a"] * n_bins, edges, n_bins=n_bins)
    assert curve["count"].tolist() == [1] * n_bins


def test_reliability_curve_bins_and_last_bin_holds_one():
    curve = reliability_curve(["a"] * 4, ["a", "a", "b", "a"], [1.0, 0.05, 0.55, 0.5], n_bins=10)
    assert list(curve.columns) == [
        "bin_lower",
        "bin_upper",
        "count",
        "accuracy",
        "mean_confidence",
    ]
    assert len(curve) == 10
    assert curve["bin_lower"].iloc[0] == 0.0 and curve["bin_upper"].iloc[-1] == 1.0
    assert curve["count"].tolist() == [1, 0, 0, 0, 0, 2, 0, 0, 0, 1]
    assert curve["accuracy"].iloc[5] == pytest.approx(0.5)
    assert curve["mean_confidence"].iloc[5] == pytest.approx(0.525)
    assert curve["accuracy"].iloc[9] == 1.0
    assert np.isnan(curve["accuracy"].iloc[1])


@pytest.mark.parametrize(
    ("confidence", "message"),
    [
        ([0.5, 1.2], r"confidence must be in \[0, 1\]"),
        ([-0.1, 0.5], r"confidence must be in \[0, 1\]"),
        ([np.nan, 0.5], r"confidence must be in \[0, 1\]"),
        ([0.5], "same length"),
    ],
)
def test_ece_rejects_bad_input(confidence, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(["a", "b"], ["a", "a"], confidence)


def test_novelty_auroc():
    is_novel = [False, False, True, True]
    assert novelty_auroc(is_novel, [0.1, 0.2, 0.8, 0.9]) == pytest.approx(1.0)
    assert novelty_auroc(is_novel, [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.0)
    assert novelty_auroc(is_novel, [0.1, 0.8, 0.2, 0.9]) == pytest.approx(0.75)


def test_novelty_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="only one class"):
        novelty_auroc([True, True], [0.1, 0.2])


@pytest.mark.parametrize(
    ("is_novel", "message"),
    [
        (
            ["False", "True", "False"],
            "is_novel must be booleans (or 0/1), not strings such as 'False'; convert them "
            "first, e.g. with == 'True'.",
        ),
        (
            [0.0, np.nan, 1.0],
            "is_novel must be booleans (or 0/1); it has 1 missing values (NaN or None). Give "
            "each entry True or False.",
        ),
        ([True, None, False], "is_novel must be booleans (or 0/1); it has 1 missing values"),
        ([0, 2, 1], "is_novel must be booleans (or 0/1); found 2."),
        ([0.0, 0.5, 1.0], "is_novel must be booleans (or 0/1); found 0.5."),
    ],
)
def test_novelty_auroc_refuses_flags_that_are_not_booleans(is_novel, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        novelty_auroc(is_novel, [0.1, 0.5, 0.9])


def test_novelty_flags_may_be_0_1_or_a_pandas_column():
    assert novelty_auroc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
    assert novelty_auroc(pd.Series([0.0, 1.0], dtype=object), [0.2, 0.8]) == 1.0
    column = pd.Series([False, True], dtype="boolean")
    assert novelty_auroc(column, [0.2, 0.8]) == 1.0
    result = novelty_precision_coverage({"a": 0.1, "b": 0.5}, {"a": 1, "b": 0})
    assert (result["n_novel"], result["precision"]) == (1, 1.0)


@pytest.mark.parametrize(
    ("has_novel", "message"),
    [
        (
            {"a": "False", "b": "True"},
            "has_novel must be booleans (or 0/1), not strings such as 'False'; convert them "
            "first, e.g. with == 'True'.",
        ),
        (
            {"a": True, "b": np.nan},
            "has_novel must be booleans (or 0/1); it has 1 missing values (NaN or None). "
            "Give each entry True or False.",
        ),
        (["no", "yes"], "has_novel must be booleans (or 0/1), not strings such as 'no'"),
    ],
)
def test_novelty_precision_coverage_refuses_flags_that_are_not_booleans(has_novel, message):
    scores = {"a": 0.1, "b": 0.5} if isinstance(has_novel, dict) else [0.1, 0.5]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        novelty_precision_coverage(scores, has_novel)


def test_novelty_precision_coverage_hand_computed():
    scores = [0.1, 0.2, 0.3, 0.05, 0.9]
    has_novel = [True, False, True, True, False]
    # flagged (< 0.25): datasets 0, 1, 3; novel among them: 0, 3 -> precision 2/3
    # novel datasets: 0, 2, 3; flagged among them: 0, 3 -> coverage 2/3
    result = novelty_precision_coverage(scores, has_novel)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["coverage"] == pytest.approx(2 / 3)
    assert (result["n_flagged"], result["n_novel"], result["n_datasets"]) == (3, 3, 5)
    strict = novelty_precision_coverage(scores, has_novel, threshold=0.15)
    assert strict["precision"] == 1.0 and strict["coverage"] == pytest.approx(2 / 3)


def test_novelty_precision_coverage_aligns_mappings_by_name():
    result = novelty_precision_coverage(
        {"d1": 0.1, "d2": 0.9, "d3": 0.2}, {"d3": False, "d1": True, "d2": True}
    )
    assert result["precision"] == pytest.approx(0.5)
    assert result["coverage"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same datasets"):
        novelty_precision_coverage({"d1": 0.1}, {"d2": True})


def test_novelty_precision_coverage_undefined_is_nan():
    result = novelty_precision_coverage([0.5, 0.6], [False, False])
    assert math.isnan(result["precision"]) and math.isnan(result["coverage"])


def test_classification_report_keys():
    report = classification_report(Y_TRUE, Y_PRED)
    assert set(report) == {"accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"}
    assert report["accuracy"] == pytest.approx(4 / 6)
    with_ece = classification_report(Y_TRUE, Y_PRED, confidence=[0.9] * 6)
    assert with_ece["ece"] == pytest.approx(abs(4 / 6 - 0.9))
