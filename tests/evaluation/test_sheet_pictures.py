"""Picture sheets (evaluation/sheets.py): the predict command's sheet and the test report's
misclassified sheet are real pictures with the right frames. Moved from tests/test_insight.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")

from crystalscope.cli import app  # noqa: E402
from crystalscope.evaluation.sheets import COLOURS, prediction_sheet  # noqa: E402
from crystalscope.inference.predictor import Prediction  # noqa: E402
from pictures import picture_ok  # noqa: E402
from tiny_onnx import untrained_model_files  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> dict[str, Path]:
    """Untrained resnet18 at 48 px, as .ckpt and .onnx."""
    return untrained_model_files(tmp_path_factory.mktemp("sheet-model"))


def test_predict_sheet_draws_every_image_and_the_rejected_flag(tiny_model, real_samples, tmp_path):
    sheet = tmp_path / "predictions.png"
    result = CliRunner().invoke(app, ["predict", str(tiny_model["onnx"]), str(real_samples), "--out",
                                      str(tmp_path / "p.csv"), "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    pixels = picture_ok(sheet, (8 * 160, 160))  # 8 images in one row of 160 px cells
    assert tuple(pixels[80, 2]) == COLOURS["ok"]  # accepted: green frame (below the title)
    rows = [Prediction("a.png", "pg", 0.9, {"cex": 0.1, "pg": 0.9}, status="rejected (score 12.3 > 4.5)"),
            Prediction(str(sorted(real_samples.glob("*.png"))[0]), "cex", 0.8, {"cex": 0.8, "pg": 0.2}),
            Prediction("gone.png", status="error: file not found")]
    drawn = np.asarray(prediction_sheet(rows, tmp_path / "flags.png"))
    assert tuple(drawn[20, 2]) == COLOURS["rejected"] and tuple(drawn[20, 162]) == COLOURS["ok"]
    assert tuple(drawn[20, 322]) == COLOURS["error"]
    # capped: the rejected and unreadable rows come first
    capped = np.asarray(prediction_sheet(rows[::-1], tmp_path / "capped.png", limit=2))
    assert capped.shape[1] == 2 * 160
    assert {tuple(capped[60, 2]), tuple(capped[60, 162])} == {COLOURS["rejected"], COLOURS["error"]}


def test_predict_sheet_bad_name_is_a_one_line_error(tiny_model, real_samples, tmp_path):
    result = CliRunner().invoke(app, ["predict", str(tiny_model["onnx"]), str(real_samples), "--out",
                                      str(tmp_path / "p.csv"), "--sheet", str(tmp_path / "sheet.jpg")])
    assert result.exit_code == 2 and "--sheet" in result.output and ".png" in result.output
    assert not (tmp_path / "p.csv").exists()


def test_report_writes_misclassified_sheet(real_samples, tmp_path):
    from crystalscope.evaluation.report import write_test_report

    files = sorted(real_samples.glob("*.png"))[:6]
    y_true = np.array([0, 0, 0, 1, 1, 1])
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0], [4.0, 0.0], [0.0, 2.0]])
    write_test_report(tmp_path, y_true=y_true, logits=logits, class_names=["cex", "pg"], positive_class="pg",
                      paths=[str(f) for f in files])
    pixels = picture_ok(tmp_path / "misclassified.png", (320, 160))
    assert pixels.shape[1] == 2 * 160  # the two wrong images, side by side
    assert tuple(pixels[40, 2]) == COLOURS["wrong"]
