"""Matching metrics on hand-computed tiny examples."""

import re

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import average_precision_score

from scvi_ext.metrics import (
    foscttm,
    matched_label_fraction,
    matching_aupr,
    matching_log_likelihood,
    matching_score,
    matching_top_k,
)

# Rows: RNA cells, columns: ATAC cells, the true pair on the diagonal.
P = sp.csr_matrix(np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8]]))


def test_matching_score_is_the_mean_probability_on_the_true_pair():
    assert matching_score(P) == pytest.approx((0.5 + 1.0 + 0.8) / 3)
    assert matching_score(P.toarray()) == pytest.approx((0.5 + 1.0 + 0.8) / 3)


def test_log_likelihood_is_the_mean_log_probability_on_the_true_pair_with_a_floor():
    assert matching_log_likelihood(P) == pytest.approx(np.log([0.5, 1.0, 0.8]).mean())
    wrong = sp.csr_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))  # sure of the wrong cells
    assert matching_log_likelihood(wrong) == pytest.approx(np.log(1e-6))
    assert matching_log_likelihood(wrong, floor=1e-3) == pytest.approx(np.log(1e-3))
    assert matching_log_likelihood(np.full((4, 4), 0.25)) == pytest.approx(np.log(0.25))


def test_uniform_matching_scores_one_over_n():
    n = 50
    assert matching_score(np.full((n, n), 1 / n)) == pytest.approx(1 / n)


def test_top_k_counts_ties_against_the_true_pair():
    assert matching_top_k(P, 1) == pytest.approx(2 / 3)  # row 0 ties 0.5 / 0.5
    assert matching_top_k(P, 2) == pytest.approx(1.0)
    zero_true = sp.csr_matrix(np.array([[0.0, 1.0], [0.0, 1.0]]))
    assert matching_top_k(zero_true, 2) == pytest.approx(0.5)  # probability 0 is never found


def test_matched_label_fraction_is_the_mass_on_cells_of_the_same_label():
    labels = np.array(["a", "a", "b"])
    assert matched_label_fraction(P, labels, labels) == pytest.approx((1.0 + 1.0 + 0.8) / 3)


def test_aupr_by_hand_and_equal_to_sklearn_with_unstored_true_pairs():
    # thresholds 1.0 (TP), 0.8 (TP), 0.5 (TP + FP): AP = 1/3 + 1/3 + 1/3 * 3/4
    assert matching_aupr(P) == pytest.approx(1 / 3 + 1 / 3 + 0.25)
    rng = np.random.default_rng(0)
    dense = rng.random((7, 7)) * (rng.random((7, 7)) > 0.6)
    dense[1, 1] = dense[4, 4] = 0.0
    assert matching_aupr(sp.csr_matrix(dense)) == pytest.approx(
        average_precision_score(np.eye(7).ravel(), dense.ravel())
    )


def test_foscttm_by_hand_in_each_direction():
    x = np.array([[0.0], [1.0], [3.0]])
    y = np.array([[2.0], [0.0], [3.0]])
    # x -> y: cell 0 has y1 closer than y0 (1 of 2 others); ties are not closer
    assert foscttm(x, y, direction="x_to_y") == pytest.approx((0.5 + 0 + 0) / 3)
    assert foscttm(x, y, direction="y_to_x") == pytest.approx((1.0 + 0.5 + 0) / 3)
    assert foscttm(x, y) == pytest.approx((1 / 6 + 1 / 2) / 2)
    assert foscttm(x, y, block_size=1) == pytest.approx(foscttm(x, y))


def test_foscttm_of_identical_embeddings_is_zero_and_of_random_ones_about_half():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    assert foscttm(x, x, metric="cosine") == 0.0
    assert foscttm(x, rng.normal(size=(300, 5))) == pytest.approx(0.5, abs=0.05)


def test_bad_shapes_are_errors_that_say_what_is_needed():
    with pytest.raises(ValueError, match=r"P has shape \(2, 3\); matching metrics need"):
        matching_score(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="FOSCTTM needs the same cells"):
        foscttm(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="metric must be"):
        foscttm(np.ones((3, 2)), np.ones((3, 2)), metric="manhattan")


def test_matched_label_fraction_reads_rectangular_matrices_one_label_per_row_and_column():
    rows = P[:2]  # 2 RNA cells matched to 3 ATAC cells
    # row 0: 0.5 on column 0 (a); row 1: all on column 1 (b)
    assert matched_label_fraction(rows, ["a", "a"], ["a", "b", "a"]) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("row_labels", "column_labels", "message"),
    [
        (
            list("aabb"),
            list("aab"),
            "row_labels has shape (4,) but P has 3 rows; pass one label per row of P.",
        ),
        (
            list("aab"),
            list("ab"),
            "column_labels has shape (2,) but P has 3 columns; pass one label per column of P.",
        ),
        (
            np.array([list("aab")]),
            list("aab"),
            "row_labels has shape (1, 3) but P has 3 rows; pass one label per row of P.",
        ),
    ],
)
def test_labels_not_one_per_row_and_column_are_errors(row_labels, column_labels, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        matched_label_fraction(P, row_labels, column_labels)


METRICS = {
    "score": matching_score,
    "log_likelihood": matching_log_likelihood,
    "top_k": lambda matrix: matching_top_k(matrix, 1),
    "aupr": matching_aupr,
    "label_fraction": lambda matrix: matched_label_fraction(matrix, ["a"], ["a"]),
}


@pytest.mark.parametrize("metric", METRICS.values(), ids=METRICS)
@pytest.mark.parametrize("dimensions", [1, 3])
def test_a_matrix_that_is_not_two_dimensional_is_an_error(metric, dimensions):
    message = f"P must be a 2-D matrix (RNA cells x ATAC cells), not {dimensions}-D."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        metric(np.ones((1,) * dimensions))  # 1-D would otherwise read as a 1 x 1 matrix


@pytest.mark.parametrize("metric", [matching_score, matching_log_likelihood])
def test_probability_metrics_refuse_a_matrix_that_is_not_row_stochastic(metric):
    need = "pass probabilities (non-negative, each row summing to 1), e.g. from "
    need += "CrossAttentionMatcher.match."
    with pytest.raises(ValueError, match=f"^{re.escape(f'Row 0 of P sums to 2; {need}')}$"):
        metric(2 * P)
    with pytest.raises(ValueError, match=f"^{re.escape(f'Row 1 of P sums to 0; {need}')}$"):
        metric(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=f"^{re.escape(f'Row 0 of P sums to nan; {need}')}$"):
        metric(np.array([[np.nan, 0.0], [0.0, 1.0]]))
    negative = np.array([[1.5, -0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match=f"^{re.escape(f'P has negative entries; {need}')}$"):
        metric(negative)
    with pytest.raises(ValueError, match=f"^{re.escape(f'Row 0 of P sums to 2; {need}')}$"):
        matched_label_fraction(2 * P, list("aab"), list("aab"))


def test_ranking_metrics_read_any_scores():
    assert matching_top_k(5 * P, 1) == matching_top_k(P, 1)
    assert matching_aupr(5 * P) == pytest.approx(matching_aupr(P))
