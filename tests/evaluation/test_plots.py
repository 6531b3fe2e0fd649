"""Figures of the run folder: the training curves read metrics.csv through the formats contract."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.plots import plot_training_curves
from crystalscope.formats import metrics_columns


def assert_real_png(path):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100


def write_metrics_csv(path, n_epochs, class_names=("cex", "pg"), drop=()):
    """A metrics.csv as ``train`` writes it (header from the contract in crystalscope.formats)."""
    header = [c for c in metrics_columns(list(class_names)) if c not in drop]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for epoch in range(1, n_epochs + 1):
            loss, accuracy = 1.0 / epoch, 1.0 - 0.5 / epoch
            values = dict(zip(metrics_columns(list(class_names)), [epoch, loss, accuracy, loss * 1.1, accuracy - 0.02, 0.9]
                              + [0.9] * 3 * len(class_names) + [0.9, 0.1, 12.5]))
            writer.writerow([values[c] for c in header])


@pytest.mark.parametrize("n_epochs, class_names", [(1, ("cex", "pg")), (5, ("a", "b", "c"))])
def test_training_curves_plot_is_a_real_image(tmp_path, n_epochs, class_names):
    write_metrics_csv(tmp_path / "metrics.csv", n_epochs, class_names)
    out = plot_training_curves(tmp_path / "metrics.csv", tmp_path / "metrics_plot.png")
    assert out == tmp_path / "metrics_plot.png"
    assert_real_png(out)
    with Image.open(out) as image:
        assert image.width > image.height  # two panels side by side


def test_training_curves_reject_bad_metrics_files(tmp_path):
    with pytest.raises(CrystalscopeError, match="metrics file not found"):
        plot_training_curves(tmp_path / "missing.csv", tmp_path / "plot.png")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(CrystalscopeError, match="missing column"):
        plot_training_curves(tmp_path / "other.csv", tmp_path / "plot.png")
    write_metrics_csv(tmp_path / "empty.csv", 0)
    with pytest.raises(CrystalscopeError, match="no epochs"):
        plot_training_curves(tmp_path / "empty.csv", tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()


def test_a_metrics_csv_missing_a_contract_column_is_refused(tmp_path):
    """The layout comes from formats.metrics_columns: a per-class column missing is named."""
    write_metrics_csv(tmp_path / "metrics.csv", 2, drop=("val_recall_pg",))
    with pytest.raises(CrystalscopeError, match="missing column.*val_recall_pg"):
        plot_training_curves(tmp_path / "metrics.csv", tmp_path / "plot.png")
    write_metrics_csv(tmp_path / "metrics.csv", 2)
    text = (tmp_path / "metrics.csv").read_text().replace("0.5,", "half,", 1)
    (tmp_path / "metrics.csv").write_text(text)
    with pytest.raises(CrystalscopeError, match="line 2: train_accuracy='half' is not a number"):
        plot_training_curves(tmp_path / "metrics.csv", tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()
