"""models/description.py: the one check of a loaded model's description (checkpoint and ONNX metadata)."""

from __future__ import annotations

import math

import pytest

from crystalscope.errors import CrystalscopeError
from crystalscope.formats import KNOWN_ONNX_FORMATS, ONNX_FORMAT
from crystalscope.models.description import validate_description, validate_metadata


def _meta(**changes) -> dict:
    meta = {"format": ONNX_FORMAT, "backbone": "resnet18", "class_names": ["cex", "pg"], "positive_class": "pg",
            "temperature": 1.5, "output_name": "logits",
            "preprocessing": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}}
    for key, value in changes.items():
        if key.startswith("pre_"):
            meta["preprocessing"][key[4:]] = value
        else:
            meta[key] = value
    return meta


INPUTS = [("input", ["batch", 3, 32, 32])]
OUTPUTS = [("logits", ["batch", 2]), ("features", ["batch", 512])]


def test_a_valid_description_and_graph_pass():
    validate_description(_meta(), "m.ckpt")
    validate_metadata(_meta(), INPUTS, OUTPUTS, "m.onnx")
    validate_metadata(_meta(temperature=None), INPUTS, OUTPUTS, "m.onnx")  # an older, uncalibrated model
    assert ONNX_FORMAT in KNOWN_ONNX_FORMATS


@pytest.mark.parametrize("changes,key", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": 0}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": True}, "temperature"), ({"temperature": "1.0"}, "temperature"),
    ({"class_names": ["cex", "cex"]}, "class_names"), ({"class_names": ["cex"]}, "class_names"),
    ({"class_names": ["cex", " "]}, "class_names"), ({"class_names": "cex,pg"}, "class_names"),
    ({"class_names": ["cex", 3]}, "class_names"), ({"positive_class": "salt"}, "positive_class"),
    ({"pre_std": [0.2, 0.0, 0.2]}, "preprocessing.std"), ({"pre_std": [0.2, -1, 0.2]}, "preprocessing.std"),
    ({"pre_mean": [0.5, 0.5]}, "preprocessing.mean"), ({"pre_mean": "0.5"}, "preprocessing.mean"),
    ({"pre_mean": [0.5, math.nan, 0.5]}, "preprocessing.mean"), ({"pre_image_size": 0}, "image_size"),
    ({"pre_image_size": "32"}, "image_size"), ({"pre_resize": "squash"}, "preprocessing"),
    ({"pre_pad_value": 300}, "pad_value"), ({"preprocessing": None}, "preprocessing"),
    ({"backbone": 5}, "backbone"),
])
def test_each_bad_value_is_one_line_naming_the_key_and_the_allowed_values(changes, key):
    with pytest.raises(CrystalscopeError) as err:
        validate_description(_meta(**changes), "m.ckpt")
    message = str(err.value)
    assert message.startswith("m.ckpt: ") and key in message and "\n" not in message


@pytest.mark.parametrize("meta,inputs,outputs,key", [
    (_meta(format="crystalscope-onnx/99"), INPUTS, OUTPUTS, "format"),
    ({k: v for k, v in _meta().items() if k != "format"}, INPUTS, OUTPUTS, "format"),
    ([1, 2], INPUTS, OUTPUTS, "metadata"),
    (_meta(pre_image_size=64), INPUTS, OUTPUTS, "image_size"),
    (_meta(), [("input", ["batch", 1, 32, 32])], OUTPUTS, "image_size"),
    (_meta(class_names=["a", "b", "c"], positive_class=None), INPUTS, OUTPUTS, "class_names"),
    # outputs are found by name, not position: a 'probabilities' output of the wrong width is refused too
    (_meta(), INPUTS, [("features", ["batch", 512]), ("probabilities", ["batch", 3])], "class_names"),
])
def test_metadata_is_checked_against_the_graph(meta, inputs, outputs, key):
    with pytest.raises(CrystalscopeError, match=key):
        validate_metadata(meta, inputs, outputs, "m.onnx")


def test_more_outputs_and_a_dynamic_size_are_accepted():
    outputs = [("logits", ["batch", 2]), ("features", ["batch", 512]), ("probabilities", ["batch", 2]),
               ("ood_score", ["batch"]), ("accepted", ["batch"])]
    validate_metadata(_meta(), [("input", ["batch", 3, "h", "w"])], outputs, "m.onnx")  # accepted: no error
    # the same graph with a probabilities width other than the class count is not
    wrong = [(name, ["batch", 3] if name == "probabilities" else shape) for name, shape in outputs]
    with pytest.raises(CrystalscopeError, match="probabilities"):
        validate_metadata(_meta(), [("input", ["batch", 3, "h", "w"])], wrong, "m.onnx")
