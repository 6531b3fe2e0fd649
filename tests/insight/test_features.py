"""The one feature extractor (insight/features.py): features per readable file, reasons for the others."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from crystalscope.errors import CrystalscopeError  # noqa: E402
from crystalscope.inference.predictor import Predictor  # noqa: E402
from crystalscope.insight.features import extract_features, l2_normalise  # noqa: E402


def test_l2_normalise_gives_unit_rows_and_keeps_zero_rows():
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]]))
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feature-images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (folder / "broken.png").write_bytes(b"not a png")
    return paths, folder / "broken.png"


def test_features_and_probabilities_of_a_model_in_file_order(tiny_model, images):
    paths, broken = images
    predictor = Predictor.load(tiny_model["onnx"])
    batches = []
    files = [paths[0], broken, *paths[1:]]
    fs = extract_features(predictor, files, batch_size=2, on_batch=batches.append)
    assert fs.paths == [str(p) for p in paths]  # unreadable files are left out, the order is kept
    assert set(fs.errors) == {str(broken)} and str(broken) not in fs.errors[str(broken)]
    assert fs.features.shape[0] == 5 and np.isfinite(fs.features).all()
    assert sum(batches) == len(files)
    assert np.allclose(fs.probabilities.sum(axis=1), 1.0)
    direct = predictor.predict(paths)
    assert fs.predicted == [p.predicted for p in direct]
    # the same file gives the same features whatever batch it is in
    alone = extract_features(predictor, [paths[3]])
    assert np.allclose(alone.features[0], fs.features[3], atol=1e-5)


def test_bad_inputs_are_one_line(tiny_model, images):
    paths, broken = images
    predictor = Predictor.load(tiny_model["onnx"])
    with pytest.raises(CrystalscopeError, match="--batch-size 0"):
        extract_features(predictor, paths, batch_size=0)
    with pytest.raises(CrystalscopeError, match=r"none of the 1 files could be read .*broken\.png: not a readable image"):
        extract_features(predictor, [broken])
