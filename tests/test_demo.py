"""The demo end to end at a toy size: synth -> split -> audit -> train -> report -> ONNX -> predict.

The same pipeline as ``make demo`` with 40 crops per class, a random-weight resnet18 at 32 px
and one epoch (a few seconds on one CPU thread), so the scores only have to be valid numbers,
not good ones. The command's own rendering is tested in tests/cli/test_demo.py.
"""

from __future__ import annotations

import csv
import json
import logging

import pytest

from crystalscope import formats
from crystalscope.errors import CrystalscopeError

PER_CLASS = 40


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from crystalscope.demo import run_demo

    steps, records = [], []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("crystalscope.demo")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    out = tmp_path_factory.mktemp("demo")
    try:
        result = run_demo(out, per_class=PER_CLASS, backbone="resnet18", weights="none", image_size=32, epochs=1,
                          batch_size=32, progress=False, on_step=lambda name, step: steps.append((name, step)))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    return result, steps, [record.getMessage() for record in records]


def test_demo_writes_every_deliverable(demo_run):
    result, _, _ = demo_run
    missing = [path.name for path in result.deliverables() if not path.is_file()]
    assert not missing
    assert (result.audit_dir / "audit.md").is_file() and (result.audit_dir / "audit.json").is_file()
    for split in formats.SPLITS:
        assert (result.out / "split" / split).is_dir()


def test_demo_summary_numbers_are_in_range(demo_run):
    result, _, _ = demo_run
    test = result.test
    assert 0.0 <= test["accuracy"] <= 1.0 and 0.0 <= test["macro"]["f1"] <= 1.0
    n_test_files = sum(1 for p in (result.out / "split" / "test").rglob("*.png"))
    assert test["n_images"] == n_test_files > 0
    assert result.predictions.n_images == n_test_files
    assert sum(result.predictions.counts.values()) + result.predictions.n_rejected == n_test_files
    assert result.seconds > 0
    assert result.train["epochs_run"] == 1
    saved = json.loads((result.run_dir / "test_results.json").read_text())
    assert saved["macro"]["f1"] == pytest.approx(test["macro"]["f1"])


def test_demo_predictions_name_every_test_image(demo_run):
    result, _, _ = demo_run
    with open(result.run_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result.test["n_images"]
    for row in rows:
        assert row["status"] != "ok" or row["predicted"] in ("cex", "pg")
        assert float(row["p_cex"]) + float(row["p_pg"]) == pytest.approx(1.0, abs=1e-5)


def test_demo_reports_split_and_audit_as_they_finish(demo_run):
    result, steps, _ = demo_run
    assert [name for name, _ in steps] == ["split", "audit"]
    split = steps[0][1]
    assert split is result.split and split.n_files == 2 * PER_CLASS


def test_demo_refuses_an_earlier_run_without_force(tmp_path):
    from crystalscope.demo import run_demo

    (tmp_path / "run").mkdir()
    with pytest.raises(CrystalscopeError, match="--force"):
        run_demo(tmp_path, per_class=10, force=False)
    assert not (tmp_path / "data").exists()  # refused before generating anything


def test_demo_logs_one_line_per_step(demo_run):
    _, _, messages = demo_run
    assert [m.split(" ", 1)[0] for m in messages] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert "resnet18" in messages[3]


def test_every_demo_folder_is_recorded_in_its_manifest(demo_run):
    from crystalscope.demo import SUB_FOLDERS
    from crystalscope.io import foreign_entry, read_manifest

    result, _, _ = demo_run
    for name, command in SUB_FOLDERS:
        assert foreign_entry(result.out / name, command) is None, name
    recorded = read_manifest(result.run_dir)["files"]
    assert {"predictions.csv", "weights/best.ckpt", "model.onnx", "config.yaml"} <= set(recorded)


def test_a_demo_rerun_replaces_only_what_the_demo_wrote(tmp_path):
    from crystalscope.demo import run_demo

    options = dict(per_class=10, backbone="resnet18", weights="none", image_size=32, epochs=1, batch_size=32,
                   progress=False)
    run_demo(tmp_path, **options)
    (tmp_path / "notes.txt").write_text("the user's, beside the demo's folders")
    run_demo(tmp_path, **options)  # every sub-folder is the demo's own: replaced
    assert (tmp_path / "notes.txt").read_text().startswith("the user's")
    (tmp_path / "run" / "weights" / "tuned.ckpt").write_bytes(b"the user's model")
    with pytest.raises(CrystalscopeError, match="weights/tuned.ckpt"):
        run_demo(tmp_path, **options)
    assert (tmp_path / "run" / "weights" / "tuned.ckpt").read_bytes() == b"the user's model"
