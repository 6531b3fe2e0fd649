"""The decision module: its image statistics follow the numpy reference, its score the detector's."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from crystalscope.data.synth import DIFFICULTIES, render_cex, render_pg
from crystalscope.data.transforms import Preprocessing
from crystalscope.evaluation.ood import OODDetector, fit_detector, image_statistics
from crystalscope.models.factory import build_model
from crystalscope.models.rejection import ImageStatistics, decision_model, spectrum_bases


def varied_images(size: int) -> np.ndarray:
    """Crystal crops, a blank frame, colour noise, grey noise, a clipped frame: uint8 (N, size, size, 3)."""
    rng = np.random.default_rng(3)
    pre = Preprocessing(image_size=size)
    crops = [pre.resize_uint8(Image.fromarray(render(rng, DIFFICULTIES["realistic"])))
             for render in (render_cex, render_pg, render_cex)]
    grey_noise = np.repeat(rng.integers(90, 160, (size, size, 1)), 3, axis=2)
    clipped = np.where(rng.random((size, size, 1)) < 0.5, 0, 255).repeat(3, axis=2)
    return np.stack(crops + [np.full((size, size, 3), 128), rng.integers(0, 256, (size, size, 3)),
                             grey_noise, clipped]).astype(np.uint8)


def test_statistics_of_the_input_tensor_equal_the_numpy_reference():
    for size in (32, 48):
        pre = Preprocessing(image_size=size)
        images = varied_images(size)
        module = ImageStatistics(size, pre.mean, pre.std)
        got = module(torch.from_numpy(pre.normalize(images))).double().numpy()
        assert got.shape == (len(images), 42)
        assert np.abs(got - image_statistics(images)).max() < 1e-4


def test_spectrum_bases_reproduce_rfft2():
    rng = np.random.default_rng(0)
    grey = rng.random((12, 10))
    bases = spectrum_bases(12, 10)
    real = bases["ch"] @ grey @ bases["cw"] - bases["sh"] @ grey @ bases["sw"]
    imaginary = bases["sh"] @ grey @ bases["cw"] + bases["ch"] @ grey @ bases["sw"]
    assert np.allclose(real ** 2 + imaginary ** 2, np.abs(np.fft.rfft2(grey)) ** 2)
    assert np.allclose(bases["rings"].sum(axis=0)[bases["rings"].sum(axis=0) > 0], 1.0)


def test_decision_model_scores_as_the_detector_and_accepts_at_or_below_the_threshold():
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    pre = Preprocessing(image_size=32)
    images = np.concatenate([varied_images(32)] * 6)
    batch = torch.from_numpy(pre.normalize(images))
    with torch.no_grad():
        features = model.embed(batch)
        logits = model.head[-1](features).numpy()
    stats = image_statistics(images)
    detector = fit_detector(features.numpy()[:28], np.arange(28) % 2, features.numpy()[28:], logits[28:], 2, 0.1,
                            train_image_stats=stats[:28], val_image_stats=stats[28:])
    detector = OODDetector.from_dict(detector.to_dict())
    expected = detector.score(features.numpy(), logits, stats)
    with torch.no_grad():
        out_logits, _, probabilities, scores, accepted = decision_model(model, pre, 1.5, detector)(batch)
    assert np.allclose(scores.numpy(), expected, rtol=1e-4)
    assert np.array_equal(accepted.numpy(), scores.numpy() <= detector.threshold)
    assert not accepted.all() and accepted.any()  # the comparison is not vacuous
    assert np.allclose(probabilities.numpy(), torch.softmax(out_logits / 1.5, dim=1).numpy())
