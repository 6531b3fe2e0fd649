"""cli/demo.py: the demo command passes its recipe to ``run_demo`` and renders the result it returns.

The demo pipeline itself runs (small) in tests/test_demo.py; here ``run_demo`` is replaced where
only the command's own work is checked.
"""

from __future__ import annotations

import logging

from cli_checks import error_line, help_text, invoke

import crystalscope.demo
from crystalscope.demo import DemoResult
from crystalscope.errors import CrystalscopeError


def _result(out) -> DemoResult:
    test = {"accuracy": 0.875, "macro": {"f1": 0.8642}, "n_images": 16}
    return DemoResult(out=out, run_dir=out / "run", seconds=12.0, split=None, audit=None, train={"test": test},
                      predictions=None)  # (the command does not render the predictions)


def test_help_lists_the_recipe_options():
    text = help_text("demo")
    options = ("--out", "--per-class", "--backbone", "--image-size", "--epochs", "--seed")
    assert [option for option in options if option not in text] == []


def test_demo_command_renders_the_result(tmp_path, monkeypatch):
    """The library announces its steps through logging; the command renders the returned result.

    (Moved from tests/test_demo.py; a stand-in result instead of the real demo run.)
    """
    result = _result(tmp_path / "d")
    seen = {}

    def fake_run_demo(out, **kwargs):
        seen.update(kwargs, out=out)
        logging.getLogger("crystalscope.demo").info("1/5 synth: (stand-in)")
        return result

    monkeypatch.setattr(crystalscope.demo, "run_demo", fake_run_demo)
    outcome = invoke("demo", "--out", tmp_path / "d")
    assert outcome.exit_code == 0, outcome.output
    # the CLI's defaults are the demo's documented recipe
    assert (seen["per_class"], seen["backbone"], seen["image_size"], seen["epochs"]) == (1000, "efficientnet_lite0",
                                                                                           160, 30)
    assert seen["out"] == tmp_path / "d"
    assert "1/5 synth" in outcome.output  # the log record reached the terminal through the CLI handler
    assert f"{result.test['macro']['f1']:.4f}" in outcome.output and "on 16 images" in outcome.output
    assert "weights/best.ckpt" in outcome.output and "predictions.csv" in outcome.output
    assert f"{tmp_path / 'd' / 'audit'}/audit.md" in outcome.output


def test_the_options_reach_run_demo(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(crystalscope.demo, "run_demo", lambda out, **kw: seen.update(kw) or _result(out))
    outcome = invoke("demo", "--out", tmp_path, "--per-class", "12", "--backbone", "resnet18", "--image-size", "32",
                     "--epochs", "2", "--seed", "5")
    assert outcome.exit_code == 0, outcome.output
    assert (seen["per_class"], seen["backbone"], seen["image_size"], seen["epochs"], seen["seed"]) == (
        12, "resnet18", 32, 2, 5)


def test_too_few_crops_is_a_usage_error_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(crystalscope.demo, "run_demo", lambda *a, **kw: (_ for _ in ()).throw(AssertionError))
    outcome = invoke("demo", "--out", tmp_path / "d", "--per-class", "5")
    assert outcome.exit_code == 2 and "--per-class" in outcome.output and "Traceback" not in outcome.output


def test_a_library_error_is_one_line(tmp_path, monkeypatch):
    def refused(out, **kwargs):
        raise CrystalscopeError(f"{out}/run exists: pass --force to replace the demo output")

    monkeypatch.setattr(crystalscope.demo, "run_demo", refused)
    line = error_line(invoke("demo", "--out", tmp_path / "d"))
    assert line == f"error: {tmp_path / 'd'}/run exists: pass --force to replace the demo output"


def test_an_output_path_that_is_a_file_is_named(tmp_path):
    (tmp_path / "taken").write_text("a user's file")
    line = error_line(invoke("demo", "--out", tmp_path / "taken", "--per-class", "10"))
    assert "taken" in line and "is a file, not a folder" in line
    assert (tmp_path / "taken").read_text() == "a user's file"
