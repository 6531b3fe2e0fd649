"""The test report files: names in the right rows, numbers, edge cases, real PNGs."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.calibration import softmax
from crystalscope.evaluation.report import REPORT_FILES, write_test_report

JSON_KEYS = {"accuracy", "accuracy_ci95", "per_class", "macro", "weighted", "macro_f1_ci95",
             "confusion_matrix", "class_names", "roc_auc", "n_images", "n_missed", "ece",
             "ece_uncalibrated", "temperature", "positive_class"}


def confident_logits(predicted, n_classes, margin=6.0):
    logits = np.zeros((len(predicted), n_classes))
    logits[np.arange(len(predicted)), predicted] = margin
    return logits


def report_row(text, name):
    """The classification-report row of one class: precision, recall, f1, support."""
    match = re.search(rf"^\s+{re.escape(name)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$",
                      text, flags=re.M)
    assert match, f"no classification-report row for {name!r}"
    return [float(g) for g in match.groups()[:3]] + [int(match.group(4))]


def assert_real_png(path):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100


def test_perfect_model_names_each_class_with_its_own_support(tmp_path):
    # 7 cex (index 0) and 3 pg (index 1): swapped target names would show cex with support 3.
    y_true = np.array([0] * 7 + [1] * 3)
    paths = [f"test/cex/CEX ({i}).png" for i in range(7)] + [f"test/pg/PG ({i}).png"
                                                            for i in range(3)]
    result = write_test_report(tmp_path, y_true=y_true, logits=confident_logits(y_true, 2),
                               class_names=["cex", "pg"], positive_class="pg", paths=paths,
                               n_bootstrap=50, meta={"model": "resnet18", "run": "runs/a"})
    text = (tmp_path / "test_results.txt").read_text()
    assert report_row(text, "cex") == [1.0, 1.0, 1.0, 7]
    assert report_row(text, "pg") == [1.0, 1.0, 1.0, 3]
    assert "cex - Precision: 1.0000, Recall: 1.0000, F1-Score: 1.0000" in text
    assert "model: resnet18" in text and "Test images missed: 0 of 10" in text
    saved = json.loads((tmp_path / "test_results.json").read_text())
    assert saved == result
    assert JSON_KEYS <= set(saved)
    assert saved["per_class"]["cex"]["support"] == 7 and saved["per_class"]["pg"]["support"] == 3
    assert saved["accuracy"] == 1.0 and saved["accuracy_ci95"] == [1.0, 1.0]
    assert saved["per_class"]["pg"]["f1_ci95"] == [1.0, 1.0]
    assert saved["confusion_matrix"] == [[7, 0], [0, 3]]
    assert saved["roc_auc"] == 1.0 and saved["n_missed"] == 0
    assert (tmp_path / "misclassified.csv").read_text() == "path,true,predicted,confidence\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)  # no temp files
    for name in ("confusion_matrix.png", "roc_auc.png", "calibration.png"):
        assert_real_png(tmp_path / name)


def test_numbers_match_sklearn_and_mistakes_are_listed_by_name(tmp_path):
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 120)
    logits = rng.normal(0.0, 1.0, (120, 2))
    logits[np.arange(120), y_true] += 1.5
    temperature = 1.7
    paths = [f"img,{i}.png" for i in range(120)]  # a comma in a path must survive the CSV
    result = write_test_report(tmp_path, y_true=y_true, logits=logits, class_names=["cex", "pg"],
                               positive_class="pg", paths=paths, temperature=temperature,
                               n_bootstrap=200, seed=3)
    probs = softmax(logits, temperature)
    y_pred = probs.argmax(1)
    assert result["roc_auc"] == pytest.approx(roc_auc_score(y_true == 1, probs[:, 1]))
    assert result["n_missed"] == int(np.sum(y_pred != y_true)) > 0
    assert result["accuracy_ci95"][0] <= result["accuracy"] <= result["accuracy_ci95"][1]
    assert result["temperature"] == temperature
    assert result["ece"] != result["ece_uncalibrated"]
    rows = list(csv.DictReader((tmp_path / "misclassified.csv").open()))
    assert len(rows) == result["n_missed"]
    for row in rows:
        index = paths.index(row["path"])
        assert row["true"] == ["cex", "pg"][y_true[index]]
        assert row["predicted"] == ["cex", "pg"][y_pred[index]] != row["true"]
        assert float(row["confidence"]) == pytest.approx(probs[index, y_pred[index]], abs=1e-6)
    text = (tmp_path / "test_results.txt").read_text()
    assert f"Test images missed: {result['n_missed']} of 120" in text
    cm = result["confusion_matrix"]
    assert re.search(rf"^true cex\s+{cm[0][0]}\s+{cm[0][1]}$", text, flags=re.M)
    assert re.search(rf"^true pg\s+{cm[1][0]}\s+{cm[1][1]}$", text, flags=re.M)
    assert "ECE before temperature scaling (T = 1)" in text and "T = 1.7000" in text


def test_positive_class_selects_the_roc_column(tmp_path):
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 2, 60)
    logits = rng.normal(0.0, 1.0, (60, 2)) + 1.2 * np.eye(2)[y_true]
    result = write_test_report(tmp_path, y_true=y_true, logits=logits, class_names=["cex", "pg"],
                               positive_class="cex", paths=None, n_bootstrap=20)
    assert result["positive_class"] == "cex"
    assert result["roc_auc"] == pytest.approx(roc_auc_score(y_true == 0, softmax(logits)[:, 0]))
    default = write_test_report(tmp_path / "d", y_true=y_true, logits=logits,
                                class_names=["cex", "pg"], positive_class=None, paths=None,
                                n_bootstrap=20)
    assert default["positive_class"] == "pg"


def test_three_classes_report_one_vs_rest_roc(tmp_path):
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 3, 90)
    logits = rng.normal(0.0, 1.0, (90, 3)) + 2.0 * np.eye(3)[y_true]
    names = ["cex", "pg", "mixed"]
    result = write_test_report(tmp_path, y_true=y_true, logits=logits, class_names=names,
                               positive_class=None, paths=None, n_bootstrap=50)
    probs = softmax(logits)
    assert set(result["roc_auc"]) == {"cex", "pg", "mixed", "macro"}
    for i, name in enumerate(names):
        assert result["roc_auc"][name] == pytest.approx(roc_auc_score(y_true == i, probs[:, i]))
    assert result["roc_auc"]["macro"] == pytest.approx(
        roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))
    assert np.array(result["confusion_matrix"]).shape == (3, 3)
    text = (tmp_path / "test_results.txt").read_text()
    assert report_row(text, "mixed")[3] == int(np.sum(y_true == 2))
    assert "ROC AUC (one-vs-rest):" in text and "  mixed: " in text
    assert_real_png(tmp_path / "roc_auc.png")


@pytest.mark.parametrize("names", [["cex", "pg"], ["cex", "pg", "mixed"]])
def test_class_absent_from_test_set_gives_null_roc_without_warnings(tmp_path, names):
    y_true = np.array([0, 0, 0, 0])  # no pg (and no mixed) images at all
    logits = confident_logits(np.array([0, 0, 1, 0]), len(names))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = write_test_report(tmp_path, y_true=y_true, logits=logits, class_names=names,
                                   positive_class="pg", paths=None, n_bootstrap=30)
    auc = result["roc_auc"] if len(names) == 2 else result["roc_auc"]["pg"]
    assert auc is None
    assert "no pg images" in result["roc_auc_note"]
    assert result["per_class"]["pg"]["support"] == 0
    assert result["per_class"]["cex"]["f1_ci95"] is not None
    text = (tmp_path / "test_results.txt").read_text()
    assert "n/a" in text and "ROC AUC undefined for pg: the test set has no pg" in text
    assert json.loads((tmp_path / "test_results.json").read_text())["roc_auc_note"]


def test_single_image_report(tmp_path):
    result = write_test_report(tmp_path, y_true=[1], logits=np.array([[0.3, 0.1]]),
                               class_names=["cex", "pg"], positive_class="pg",
                               paths=["only.png"], n_bootstrap=20)
    assert result["n_images"] == 1 and result["n_missed"] == 1
    assert result["accuracy"] == 0.0 and result["accuracy_ci95"] == [0.0, 0.0]
    assert result["roc_auc"] is None
    rows = list(csv.reader((tmp_path / "misclassified.csv").open()))
    assert rows[1][:3] == ["only.png", "pg", "cex"]
    for name in ("confusion_matrix.png", "roc_auc.png", "calibration.png"):
        assert_real_png(tmp_path / name)


@pytest.mark.parametrize("kwargs,message", [
    ({"paths": ["a.png"]}, "1 image paths for 3 labels"),
    ({"logits": np.zeros((2, 2))}, "3 true labels but 2 rows"),
    ({"positive_class": "PG"}, "positive class 'PG' is not one of the class names"),
    ({"temperature": 0.0}, "temperature must be a positive number"),
    ({"logits": np.array([[np.nan, 0.0]] * 3)}, "NaN or infinity"),
    ({"y_true": [], "logits": np.zeros((0, 2)), "paths": []}, "empty"),
])
def test_bad_inputs_raise_and_write_nothing(tmp_path, kwargs, message):
    arguments = {"y_true": [0, 1, 1], "logits": np.zeros((3, 2)), "class_names": ["cex", "pg"],
                 "positive_class": "pg", "paths": ["a", "b", "c"], "n_bootstrap": 10}
    arguments.update(kwargs)
    with pytest.raises(CrystalscopeError, match=message):
        write_test_report(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_evaluation_package_never_imports_torch_or_pyplot(tmp_path):
    code = ("import sys, numpy as np\n"
            "from crystalscope.evaluation.report import write_test_report\n"
            "for i in range(3):\n"
            f"    write_test_report(r'{tmp_path}', y_true=[0, 1], logits=np.eye(2), "
            "class_names=['cex', 'pg'], positive_class='pg', paths=None, n_bootstrap=5)\n"
            "print('torch' in sys.modules, 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False False"  # figures never enter pyplot's registry: no leak
