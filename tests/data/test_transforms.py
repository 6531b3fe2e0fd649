"""The one preprocessing object: serialisation, letterbox geometry, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError


def test_round_trip_through_a_dict_keeps_every_field():
    pre = Preprocessing(image_size=48, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), resize="pad",
                        interpolation="bicubic", pad_value=7)
    again = Preprocessing.from_dict({**pre.to_dict(), "unknown_future_key": 1})
    assert again == pre and again.to_dict()["mean"] == [0.1, 0.2, 0.3]


def test_pad_keeps_the_aspect_and_fills_the_bars():
    pre = Preprocessing(image_size=20, resize="pad", pad_value=9)
    out = np.asarray(pre.resize_image(Image.new("RGB", (40, 20), (200, 200, 200))))
    assert out.shape == (20, 20, 3)
    left, top, width, height = pre.content_box((40, 20))
    assert (left, top, width, height) == (0, 5, 20, 10)
    assert (out[:top] == 9).all() and (out[top + height:] == 9).all()
    assert (out[top:top + height] == 200).all()
    stretched = Preprocessing(image_size=20).resize_image(Image.new("RGB", (40, 20), (200, 200, 200)))
    assert (np.asarray(stretched) == 200).all()


def test_numpy_and_torch_normalisation_agree():
    pre = Preprocessing(image_size=8, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = ((batch / 255.0 - np.array(pre.mean)) / np.array(pre.std)).transpose(0, 3, 1, 2)
    assert np.allclose(pre.normalize(batch), expected, atol=1e-5)
    assert np.allclose(pre.normalize_torch(torch.from_numpy(batch)).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [({"resize": "crop"}, "--resize 'crop'"),
                                             ({"interpolation": "area"}, "interpolation 'area'"),
                                             ({"image_size": 4}, "--image-size 4 is too small")])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(CrystalscopeError, match=message):
        Preprocessing(**kwargs)


@pytest.mark.parametrize("changes", [{"std": (0.2, 0.0, 0.2)}, {"std": (0.2, -0.1, 0.2)}, {"mean": (0.5, 0.5)},
                                     {"std": (0.2, float("nan"), 0.2)}, {"mean": (0.5, float("inf"), 0.5)}])
def test_a_preprocessing_that_would_divide_by_zero_or_misalign_channels_is_refused(changes):
    with pytest.raises(CrystalscopeError, match="must be 3 finite numbers"):
        Preprocessing(image_size=32, **changes)
