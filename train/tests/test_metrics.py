"""Metric formulas on hand-computable cases (the runtime recomputes them from bundles)."""

import numpy as np

from train import metrics


def test_classification_metrics_by_hand():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    y = np.array([0, 0, 1, 1])
    m = metrics.classification(y, probs=probs, ref_probs=np.array([[1, 0], [0, 1], [0, 1], [0, 1.0]]))
    assert m["accuracy"] == 0.5
    np.testing.assert_allclose(m["nll"], -np.mean(np.log([0.9, 0.4, 0.3, 0.8])))
    np.testing.assert_allclose(m["brier"], np.mean([0.02, 0.72, 0.98, 0.08]))
    # confidences 0.9, 0.6, 0.7, 0.8 fall in bins 13, 9, 10, 12: one each
    np.testing.assert_allclose(m["ece"], np.mean([0.1, 0.6, 0.7, 0.2]))
    assert m["agreement"] == 0.75
    np.testing.assert_allclose(m["tv"], np.mean([0.1, 0.4, 0.7, 0.2]))


def test_map_metrics_from_logits_use_log_softmax():
    logits = np.array([[1000.0, 0.0], [0.0, 1000.0]])  # probabilities round to exactly 0 and 1
    m = metrics.classification(np.array([1, 1]), logits=logits)
    np.testing.assert_allclose(m["nll"], 500.0)  # finite: no clipping, no log(0)


def test_regression_metrics():
    y = np.array([[0.0], [1.0], [5.0]])
    m = metrics.regression(y, np.zeros((3, 1)), np.ones((3, 1)))
    np.testing.assert_allclose(m["rmse"], np.sqrt(26 / 3))
    np.testing.assert_allclose(m["nll"], 0.5 * np.log(2 * np.pi) + 26 / 6)
    np.testing.assert_allclose(m["coverage90"], 2 / 3)


def test_split_rhat_flags_disagreeing_chains():
    from train.posterior import split_rhat
    rng = np.random.default_rng(0)
    same = rng.standard_normal((4, 200, 3))
    assert np.all(split_rhat(same) < 1.05)
    shifted = same + np.arange(4)[:, None, None]
    assert np.all(split_rhat(shifted) > 1.5)
