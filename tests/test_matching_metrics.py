"""Matching metrics on hand-computed tiny examples."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import average_precision_score

from scvi_ext.metrics import (
    foscttm,
    matched_label_fraction,
    matching_aupr,
    matching_score,
    matching_top_k,
)

# Rows: RNA cells, columns: ATAC cells, the true pair on the diagonal.
P = sp.csr_matrix(np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8]]))


def test_matching_score_is_the_mean_probability_on_the_true_pair():
    assert matching_score(P) == pytest.approx((0.5 + 1.0 + 0.8) / 3)
    assert matching_score(P.toarray()) == pytest.approx((0.5 + 1.0 + 0.8) / 3)


def test_log_likelihood_is_the_mean_log_probability_on_the_true_pair_with_a_floor():
    from scvi_ext.metrics import matching_log_likelihood

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
