"""Softmax, temperature fitting and expected calibration error on synthetic logits."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.calibration import (expected_calibration_error, fit_temperature,
                                                 negative_log_likelihood, reliability_bins,
                                                 softmax)


def sample_labels(logits, temperature, seed):
    """Labels drawn from softmax(logits / temperature): the true temperature is known."""
    rng = np.random.default_rng(seed)
    probs = softmax(logits, temperature)
    cumulative = probs.cumsum(axis=1)
    return (rng.random((len(probs), 1)) > cumulative).sum(axis=1)


def test_softmax_is_stable_and_sums_to_one():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0], [-5.0, 5.0, 0.0]])
    probs = softmax(logits)
    assert np.all(np.isfinite(probs))
    assert probs.sum(axis=1) == pytest.approx(np.ones(3))
    assert probs[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert probs[1].tolist() == pytest.approx([1 / 3] * 3)
    expected = np.exp([-2.5, 2.5, 0.0]) / np.exp([-2.5, 2.5, 0.0]).sum()
    assert softmax(logits, temperature=2.0)[2] == pytest.approx(expected)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_softmax_rejects_bad_temperature(temperature):
    with pytest.raises(CrystalscopeError, match="temperature"):
        softmax(np.zeros((1, 2)), temperature)


@pytest.mark.parametrize("true_temperature", [2.0, 0.5])
def test_fit_temperature_recovers_a_known_temperature(true_temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(6000, 3))
    labels = sample_labels(logits, true_temperature, seed=1)
    fitted = fit_temperature(logits, labels)
    assert isinstance(fitted, float)
    assert fitted == pytest.approx(true_temperature, rel=0.08)
    # The fitted value is a minimum of the NLL.
    best = negative_log_likelihood(logits, labels, fitted)
    assert best <= negative_log_likelihood(logits, labels, fitted * 1.2)
    assert best <= negative_log_likelihood(logits, labels, fitted / 1.2)


def test_temperature_scaling_reduces_ece_of_over_confident_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(0.0, 4.0, size=(4000, 2))
    labels = sample_labels(logits, 2.5, seed=3)  # the model is 2.5x too sure of itself
    fitted = fit_temperature(logits, labels)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, fitted), labels)
    assert fitted > 1.5
    assert before > 0.08
    assert after < before / 3
    # Scaling never changes which class wins.
    assert np.array_equal(softmax(logits).argmax(1), softmax(logits, fitted).argmax(1))


def test_fit_temperature_stays_inside_its_bounds():
    # Small logits keep the NLL distinguishable from 0 all the way down to T = 0.05.
    logits = np.array([[0.2, -0.2], [-0.2, 0.2]] * 20)
    labels = np.array([0, 1] * 20)  # always right: the NLL keeps falling as T shrinks
    assert fit_temperature(logits, labels) == pytest.approx(0.05, abs=1e-3)
    wrong = np.array([1, 0] * 20)  # always wrong: the NLL keeps falling as T grows
    assert fit_temperature(logits, wrong) == pytest.approx(20.0, rel=1e-3)


def test_fit_temperature_rejects_bad_input():
    with pytest.raises(CrystalscopeError, match="labels"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(CrystalscopeError, match="zero validation images"):
        fit_temperature(np.zeros((0, 2)), np.array([], dtype=int))
    with pytest.raises(CrystalscopeError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))


def test_ece_hand_computed_and_bins():
    probs = np.array([[0.9, 0.1]] * 10)
    labels = np.array([0] * 8 + [1] * 2)  # 80 % right at 90 % confidence
    assert expected_calibration_error(probs, labels) == pytest.approx(0.1)
    mixed = np.array([[0.9, 0.1]] * 10 + [[0.4, 0.6]] * 10)
    mixed_labels = np.array([0] * 9 + [1] + [1] * 3 + [0] * 7)  # bin 0.9: exact; bin 0.6: 0.3
    assert expected_calibration_error(mixed, mixed_labels, n_bins=10) == pytest.approx(0.15)
    bins = reliability_bins(mixed, mixed_labels, n_bins=10)
    assert bins["count"].tolist() == [0, 0, 0, 0, 0, 10, 0, 0, 10, 0]
    assert bins["accuracy"][8] == pytest.approx(0.9)
    assert bins["confidence"][5] == pytest.approx(0.6)
    assert np.isnan(bins["accuracy"][0])


def test_ece_of_a_perfectly_calibrated_model_is_near_zero():
    rng = np.random.default_rng(4)
    confidence = rng.uniform(0.5, 1.0, 20000)
    probs = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.where(rng.random(20000) < confidence, 0, 1)  # right exactly p of the time
    assert expected_calibration_error(probs, labels) < 0.015


def test_calibration_imports_neither_scipy_nor_torch():
    code = ("import sys, crystalscope.evaluation.calibration as c, numpy as np; "
            "c.softmax(np.zeros((1, 2))); "
            "print(sorted(m for m in ('scipy', 'torch', 'sklearn', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
