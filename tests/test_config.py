"""TrainConfig: defaults = reference recipe, YAML < CLI precedence, unknown keys rejected."""

import pytest
import yaml
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.config import TrainConfig, load_config, save_config
from crystalscope.errors import CrystalscopeError


def test_defaults_are_the_reference_recipe():
    cfg = TrainConfig()
    m, o, a, s = cfg.model, cfg.optimiser, cfg.augmentation, cfg.stopping
    assert (m.backbone, m.weights, m.trainable_fraction) == ("resnet101", "imagenet", 0.1)
    assert (o.lr, o.momentum, o.batch_size, m.image_size, o.epochs) == (0.1, 0.9, 64, 224, 100)
    assert (a.rotation, a.shift, a.zoom, a.hflip, a.vflip) == (30.0, 0.2, 0.3, True, True)
    assert (s.f1_threshold, s.f1_patience, s.patience, m.resize) == (0.997, 1, 10, "stretch")


def test_yaml_then_overrides_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone: resnet18\nlr: 1e-2\nepochs: 7\nbatch-size: 16\nhflip: false\n")
    cfg = load_config(path, {"epochs": 3, "backbone": None})
    assert cfg.model.backbone == "resnet18"  # from YAML; a None override does not count
    assert cfg.optimiser.lr == 0.01 and isinstance(cfg.optimiser.lr, float)  # YAML 1.1 reads 1e-2 as a string
    assert cfg.optimiser.epochs == 3  # the CLI wins
    assert cfg.optimiser.batch_size == 16 and cfg.augmentation.hflip is False


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


@pytest.mark.parametrize("text, expected", [
    ("head_hidden: 512\n", "head_hidden=512 is not valid (Input should be a valid list)"),
    ("workers: four\n", "workers='four' is not valid"),
    ("head_dropout: [0.4, high]\n", "head_dropout=[0.4, 'high'] is not valid"),
    ("precision: fp16\n", "precision='fp16' is not known; use auto, fp32 or bf16"),
    ("device: tpu\n", "device='tpu' is not known; use auto, cpu or cuda"),
    ("seed: [1]\n", "seed=[1] is not valid"),
])
def test_every_field_is_type_checked_with_one_line(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CrystalscopeError) as err:
        load_config(path, {})
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_quoted_numbers_are_read_as_numbers(tmp_path):
    # YAML 1.1 quotes some numbers (1e-2): a quoted integer is read as one, as the CLI would
    path = tmp_path / "c.yaml"
    path.write_text('workers: "4"\nepochs: "2"\n')
    cfg = load_config(path, {})
    assert (cfg.runtime.workers, cfg.optimiser.epochs) == (4, 2)


def test_yaml_in_sections_and_flat_keys_agree(tmp_path):
    flat, sectioned = tmp_path / "flat.yaml", tmp_path / "sections.yaml"
    flat.write_text("lr: 0.02\nbackbone: resnet18\nworkers: 2\nrotation: 10\n")
    sectioned.write_text("optimiser: {lr: 0.02}\nmodel: {backbone: resnet18}\nruntime: {workers: 2}\n"
                         "augmentation: {rotation: 10}\n")
    assert load_config(flat, {}) == load_config(sectioned, {})
    assert load_config(flat, {}).to_dict()["lr"] == 0.02


def test_flat_keys_map_to_one_section_each():
    from crystalscope.config import SECTION_OF, SECTIONS

    assert set(SECTIONS) == {"model", "optimiser", "augmentation", "stopping", "runtime"}
    assert SECTION_OF["lr"] == "optimiser" and SECTION_OF["workers"] == "runtime"
    assert SECTION_OF["rotation"] == "augmentation" and SECTION_OF["patience"] == "stopping"
    assert set(TrainConfig().to_dict()) == set(SECTION_OF)


def test_a_flat_config_yaml_of_an_older_run_still_loads(tmp_path):
    # run folders written before the sections hold a flat config.yaml: --resume must read it
    old = {**TrainConfig().to_dict(), "backbone": "resnet18", "epochs": 4}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_config(tmp_path / "config.yaml", {"epochs": 6})
    assert (cfg.model.backbone, cfg.optimiser.epochs) == ("resnet18", 6)


def test_choices_are_named_once():
    from crystalscope.config import choices

    assert choices("precision") == ("auto", "fp32", "bf16")
    assert choices("prefix_runtime") == ("auto", "onnxruntime", "torch")
    assert choices("lr") == ()


@pytest.mark.parametrize("override,expected", [
    ({"seed": -1}, "--seed: -1 is out of range: must be in [0, 4294967295]"),
    ({"seed": 2**32}, "--seed: 4294967296 is out of range: must be in [0, 4294967295]"),
    ({"head_dropout": [0.2, 1.0]}, "--head-dropout: 1.0 is out of range: each value must be in [0, 1)"),
    ({"head_hidden": [64, 0]}, "--head-hidden: 0 is out of range: each value must be in [1, inf)"),
    ({"rotation": -5}, "--rotation: -5 is out of range: must be in [0, 180]"),
    ({"zoom": 1.0}, "--zoom: 1.0 is out of range: must be in [0, 1)"),
    ({"shift": float("nan")}, "--shift: nan is out of range: must be in [0, 1)"),
])
def test_values_out_of_their_domain_name_the_key_and_the_range(override, expected):
    with pytest.raises(CrystalscopeError) as err:
        load_config(None, override)
    assert str(err.value) == expected


@pytest.mark.parametrize("content,words", [
    (b"lr: 0.1\nbackbone: r\xe9snet\n", "not UTF-8"),
    (b"- lr\n- 0.1\n", "expected a mapping of option: value, not a list"),
    (b"'just a string'\n", "not a str"),
    (b"optimiser: [1, 2]\n", "optimiser must be a mapping"),
])
def test_a_yaml_that_is_not_a_utf8_mapping_is_one_line(tmp_path, content, words):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(CrystalscopeError) as err:
        load_config(path)
    assert words in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_the_bounds_are_reachable():
    cfg = load_config(None, {"seed": 2**32 - 1, "head_dropout": [0.0, 0.99], "rotation": 180, "zoom": 0})
    assert cfg.seed == 2**32 - 1 and cfg.augmentation.rotation == 180


def test_docs_list_every_constrained_range():
    from pathlib import Path

    from crystalscope.config import SECTION_OF, allowed_range, field_bounds

    docs = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text(encoding="utf-8")
    constrained = [name for name in SECTION_OF if field_bounds(name)]
    assert {"seed", "head_hidden", "head_dropout", "rotation", "shift", "zoom"} <= set(constrained)
    for name in constrained:
        row = next(line for line in docs.splitlines() if line.startswith(f"| `{name}` |"))
        assert allowed_range(name) in row, row
