"""cli/data.py: synth, split, audit and synth-ood at the command line (bad input, help, the split table)."""

from __future__ import annotations

import pytest
from cli_checks import error_line, help_text, invoke
from lines_and_discs import make_split


@pytest.mark.parametrize("command, options", [
    ("synth", ["--per-class", "--seed", "--difficulty", "--workers", "--force"]),
    ("split", ["--ratios", "--seed", "--mode", "--group-by", "--workers", "--force"]),
    ("audit", ["--out", "--workers", "--quiet"]),
    ("synth-ood", ["--per-set", "--seed", "--crystals", "--force"]),
])
def test_help_lists_the_key_options(command, options):
    text = help_text(command)
    assert [option for option in options if option not in text] == []


def test_split_of_a_missing_folder_names_it(tmp_path):
    line = error_line(invoke("split", tmp_path / "nope", tmp_path / "out"))
    assert "nope" in line and "does not exist" in line
    assert not (tmp_path / "out").exists()


def test_split_with_two_ratios_names_the_option(tmp_path):
    source = make_split(tmp_path / "data", counts={"all": (4, 4)}, size=32) / "all"
    line = error_line(invoke("split", source, tmp_path / "out", "--ratios", "0.5,0.5"))
    assert line.startswith("error: --ratios '0.5,0.5' needs three numbers")


def test_synth_with_an_unknown_difficulty_writes_nothing(tmp_path):
    line = error_line(invoke("synth", tmp_path / "s", "--per-class", "2", "--difficulty", "extreme"))
    assert "--difficulty 'extreme'" in line and "easy, realistic, hard" in line
    assert not (tmp_path / "s").exists()


def test_audit_of_a_missing_folder_names_it(tmp_path):
    line = error_line(invoke("audit", tmp_path / "gone", "--out", tmp_path / "report", "-q"))
    assert "gone" in line and not (tmp_path / "report").exists()


def test_synth_ood_without_crystal_images_names_the_option(tmp_path):
    (tmp_path / "empty").mkdir()
    line = error_line(invoke("synth-ood", tmp_path / "ood", "--crystals", tmp_path / "empty", "--per-set", "1"))
    assert line.startswith("error: --crystals ") and "no images found" in line


def test_split_renders_the_class_by_split_table(tmp_path):
    source = make_split(tmp_path / "data", counts={"all": (10, 10)}, size=32) / "all"
    result = invoke("split", source, tmp_path / "out", "--group-by", "none", "--workers", "1", "-q")
    assert result.exit_code == 0, result.output
    assert "split of" in result.output and "(seed 42)" in result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 4}
    assert {"cex", "pg", "all"} <= set(rows)
    train, val, test, total = (int(cell) for cell in rows["all"].split("│")[2:-1])
    assert train + val + test == total == 20 and train > val > 0  # every file in exactly one split
    assert sum(1 for _ in (tmp_path / "out").rglob("*.png")) == 20


def test_synth_says_what_it_wrote_and_where(tmp_path):
    out = tmp_path / "s"
    result = invoke("synth", out, "--per-class", "2", "--workers", "1", "-q")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("wrote 2 CEX + 2 PG crops (")
    assert f"to {out / 'cropped' / 'cropped'} in " in result.output
    assert f"ground truth: {out / 'synth_manifest.csv'}" in result.output
    assert sorted(p.parent.name for p in (out / "cropped" / "cropped").rglob("*.png")) == ["cex"] * 2 + ["pg"] * 2
