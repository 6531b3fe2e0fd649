"""TrainConfig: defaults = reference recipe, YAML < CLI precedence, unknown keys rejected."""

import pytest
import yaml
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.config import TrainConfig, load_config, save_config
from crystalscope.errors import CrystalscopeError


def test_defaults_are_the_reference_recipe():
    cfg = TrainConfig()
    assert (cfg.backbone, cfg.weights, cfg.trainable_fraction) == ("resnet101", "imagenet", 0.1)
    assert (cfg.lr, cfg.momentum, cfg.batch_size, cfg.image_size, cfg.epochs) == (0.1, 0.9, 64, 224, 100)
    assert (cfg.rotation, cfg.shift, cfg.zoom, cfg.hflip, cfg.vflip) == (30.0, 0.2, 0.3, True, True)
    assert (cfg.f1_threshold, cfg.f1_patience, cfg.patience, cfg.resize) == (0.997, 1, 10, "stretch")


def test_yaml_then_overrides_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone: resnet18\nlr: 1e-2\nepochs: 7\nbatch-size: 16\nhflip: false\n")
    cfg = load_config(path, {"epochs": 3, "backbone": None})
    assert cfg.backbone == "resnet18"  # from YAML; a None override does not count
    assert cfg.lr == 0.01 and isinstance(cfg.lr, float)  # YAML 1.1 reads 1e-2 as a string
    assert cfg.epochs == 3  # the CLI wins
    assert cfg.batch_size == 16 and cfg.hflip is False


def test_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.01\n")
    with pytest.raises(CrystalscopeError, match=r"unknown key 'learning_rate'") as err:
        load_config(path, {})
    assert "\n" not in str(err.value)


def test_bad_values_are_one_line_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: many\n")
    with pytest.raises(CrystalscopeError, match="epochs='many'"):
        load_config(path, {})
    with pytest.raises(CrystalscopeError, match="--trainable-fraction 0"):
        load_config(None, {"cache_features": True})
    with pytest.raises(CrystalscopeError, match="--resize"):
        load_config(None, {"resize": "crop"})
    with pytest.raises(CrystalscopeError, match="not found"):
        load_config(tmp_path / "missing.yaml", {})


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(None, {"backbone": "resnet18", "head_hidden": [64], "head_dropout": [0.1], "seed": 5})
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 5
    assert load_config(tmp_path / "config.yaml", {}) == cfg


def test_cli_unknown_yaml_key_is_one_line_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epoch: 3\n")
    (tmp_path / "data").mkdir()
    result = CliRunner().invoke(app, ["train", str(tmp_path / "data"), "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown key 'epoch'" in result.output and "did you mean 'epochs'" in result.output
    assert "Traceback" not in result.output
