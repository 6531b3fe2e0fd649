"""File contracts (crystalscope/formats.py): the metrics.csv header and its inverse, run-folder names."""

from __future__ import annotations

import pytest

from crystalscope import formats


@pytest.mark.parametrize("classes", [["cex", "pg"], ["a"], ["needle", "plate", "prism_2"]])
def test_metrics_class_names_inverts_metrics_columns(classes):
    columns = formats.metrics_columns(classes)
    assert formats.metrics_class_names(columns) == classes
    assert len(columns) == len(set(columns)) == 9 + len(formats.METRICS_PER_CLASS) * len(classes)
    assert columns[0] == "epoch" and columns[-1] == "epoch_time_s"


def test_metrics_columns_hold_every_per_class_score():
    columns = formats.metrics_columns(["cex", "pg"])
    for name in ("cex", "pg"):
        for metric in formats.METRICS_PER_CLASS:
            assert f"val_{metric}_{name}" in columns
    assert columns.index("val_macro_f1") < columns.index("val_precision_cex") < columns.index("val_weighted_f1")


def test_run_files_name_every_file_a_run_writes_once():
    assert len(formats.RUN_FILES) == len(set(formats.RUN_FILES))
    assert set(formats.REPORT_FILES) <= set(formats.RUN_FILES)
    for name in (formats.CONFIG_FILE, formats.METRICS_FILE, formats.WEIGHTS_DIR, formats.ONNX_FILE):
        assert name in formats.RUN_FILES
    assert formats.SPLITS == ("train", "val", "test")


def test_format_strings_carry_a_version():
    for value in (formats.CHECKPOINT_FORMAT, formats.ONNX_FORMAT):
        name, _, version = value.rpartition("/")
        assert name.startswith("crystalscope-") and version.isdigit()
