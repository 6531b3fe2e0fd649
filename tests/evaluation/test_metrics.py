"""Classification metrics and bootstrap intervals: hand-checked numbers and sklearn agreement."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.metrics import (bootstrap_intervals, classification_metrics, wilson_interval,
                                             confusion_matrix, format_class_lines)


def one_hot_scores(y_pred, n_classes):
    scores = np.full((len(y_pred), n_classes), 0.1)
    scores[np.arange(len(y_pred)), y_pred] = 0.8
    return scores


def test_hand_computed_confusion_matrix_and_f1():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    assert confusion_matrix(y_true, y_pred, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]

    m = classification_metrics(y_true, one_hot_scores(y_pred, 3), ["cex", "pg", "other"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    cex, pg, other = m["per_class"]["cex"], m["per_class"]["pg"], m["per_class"]["other"]
    assert (cex["precision"], cex["recall"], cex["f1"], cex["support"]) == pytest.approx(
        (1.0, 2 / 3, 0.8, 3))
    assert (pg["precision"], pg["recall"], pg["f1"], pg["support"]) == pytest.approx(
        (0.5, 0.5, 0.5, 2))
    assert (other["precision"], other["recall"], other["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert m["macro"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted"]["f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert list(m["per_class"]) == ["cex", "pg", "other"]  # class index order is kept


@pytest.mark.parametrize("n_classes,absent", [(2, None), (3, None), (4, 3)])
def test_agrees_with_sklearn_including_an_absent_class(n_classes, absent):
    rng = np.random.default_rng(n_classes)
    y_true = rng.integers(0, n_classes, 300)
    if absent is not None:
        y_true[y_true == absent] = 0
    probs = rng.dirichlet(np.ones(n_classes), 300)
    names = [f"c{i}" for i in range(n_classes)]
    m = classification_metrics(y_true, probs, names)
    y_pred = probs.argmax(axis=1)
    labels = list(range(n_classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, name in enumerate(names):
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i]))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                     average=average, zero_division=0)
        assert (m[average]["precision"], m[average]["recall"], m[average]["f1"]) == \
            pytest.approx((p, r, f))
    assert m["accuracy"] == pytest.approx(np.mean(y_true == y_pred))


def test_format_class_lines_matches_reference_style():
    metrics = {"per_class": {
        "cex": {"precision": 0.99823, "recall": 0.99884, "f1": 0.998535, "support": 343},
        "pg": {"precision": 0.99876, "recall": 0.99824, "f1": 0.99850, "support": 341},
    }}
    assert format_class_lines(metrics) == [
        "cex - Precision: 0.9982, Recall: 0.9988, F1-Score: 0.9985",
        "pg - Precision: 0.9988, Recall: 0.9982, F1-Score: 0.9985",
    ]


@pytest.mark.parametrize("y_true,scores,names,message", [
    ([0, 1, 1], [[0.9, 0.1], [0.1, 0.9]], ["cex", "pg"], "3 true labels but 2 rows"),
    ([0, 1], [[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]], ["cex", "pg"], "2 class names"),
    ([0, 2], [[0.9, 0.1], [0.1, 0.9]], ["cex", "pg"], "must lie in 0..1"),
    ([0, 1], [[0.9, 0.1], [0.1, 0.9]], ["pg", "pg"], "unique"),
    ([0.5, 1], [[0.9, 0.1], [0.1, 0.9]], ["cex", "pg"], "integer class indices"),
])
def test_bad_inputs_raise_one_line_errors(y_true, scores, names, message):
    with pytest.raises(CrystalscopeError, match=message) as info:
        classification_metrics(np.array(y_true), np.array(scores), names)
    assert "\n" not in str(info.value)


def noisy_predictions(n_images, accuracy, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, n_images)
    wrong = rng.random(n_images) > accuracy
    return y_true, np.where(wrong, 1 - y_true, y_true)


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_data():
    widths = []
    for n_images in (60, 2000):
        y_true, y_pred = noisy_predictions(n_images, 0.85, seed=n_images)
        ci = bootstrap_intervals(y_true, y_pred, 2, n_bootstrap=300, seed=0)
        point = classification_metrics(y_true, one_hot_scores(y_pred, 2), ["cex", "pg"])
        assert ci["accuracy"][0] <= point["accuracy"] <= ci["accuracy"][1]
        assert ci["macro_f1"][0] <= point["macro"]["f1"] <= ci["macro_f1"][1]
        for i, name in enumerate(["cex", "pg"]):
            assert ci["f1"][i][0] <= point["per_class"][name]["f1"] <= ci["f1"][i][1]
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): sqrt(2000/60) is about 5.8
    # The normal approximation's width for 2000 images at p = 0.85 is about 0.031.
    assert 0.02 < widths[1] < 0.045


def test_bootstrap_is_seeded_and_chunking_does_not_change_results(monkeypatch):
    y_true, y_pred = noisy_predictions(200, 0.9, seed=1)
    first = bootstrap_intervals(y_true, y_pred, 2, n_bootstrap=200, seed=7)
    assert bootstrap_intervals(y_true, y_pred, 2, n_bootstrap=200, seed=7) == first
    assert bootstrap_intervals(y_true, y_pred, 2, n_bootstrap=200, seed=8) != first
    import crystalscope.evaluation.metrics as metrics_module
    monkeypatch.setattr(metrics_module, "_BOOTSTRAP_CELLS_PER_CHUNK", 200 * 7)  # 7 per chunk
    assert bootstrap_intervals(y_true, y_pred, 2, n_bootstrap=200, seed=7) == first


def test_bootstrap_degenerate_cases_are_valid():
    perfect = np.array([0, 1, 1, 0, 1])
    ci = bootstrap_intervals(perfect, perfect, 3, n_bootstrap=50, seed=0)
    assert ci["accuracy"] == [1.0, 1.0]
    assert ci["f1"][0] == [1.0, 1.0] and ci["f1"][1] == [1.0, 1.0]
    assert ci["f1"][2] is None  # class 2 is never present nor predicted: F1 undefined
    single = bootstrap_intervals(np.array([1]), np.array([0]), 2, n_bootstrap=20, seed=0)
    assert single["accuracy"] == [0.0, 0.0]
    with pytest.raises(CrystalscopeError, match="n_bootstrap"):
        bootstrap_intervals(perfect, perfect, 2, n_bootstrap=0)


def test_wilson_interval_covers_the_proportion_and_stays_in_zero_one():
    low, high = wilson_interval(5, 10)
    assert low < 0.5 < high and high - low < 0.65
    low, high = wilson_interval(5, 100)
    assert low < 0.05 < high and 0 < low and high < 0.12
    # at 0 and n the interval touches the bound and no more; no data says nothing
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(0, 50)[1] == pytest.approx(0.0714, abs=1e-3)
    assert wilson_interval(50, 50)[1] == 1.0 and wilson_interval(3, 0) == (0.0, 1.0)
    # the textbook value: 8 of 20 -> (0.2188, 0.6134)
    assert wilson_interval(8, 20) == pytest.approx((0.2188, 0.6134), abs=1e-4)
