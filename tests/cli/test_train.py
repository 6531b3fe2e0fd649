"""The `train` command's options against the config: same names, same defaults, every key reachable."""

import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.cli import train as train_cli
from crystalscope.config import SECTION_OF, SECTIONS, TrainConfig, choices

# config keys only a --config YAML file (or the benchmarks' --set) sets: recipe details a user
# rarely changes, and the frozen prefix's runtime (auto picks ONNX Runtime only when it agrees)
YAML_ONLY = {"head_hidden", "head_dropout", "momentum", "rotation", "shift", "zoom", "hflip", "vflip",
             "prefix_runtime"}


def _train_params() -> dict:
    command = typer.main.get_command(app).commands["train"]
    return {p.name: p for p in command.params}


def _config_type(key: str) -> type:
    section = SECTION_OF[key]
    annotation = (SECTIONS[section] if section else TrainConfig).model_fields[key].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return str
    return next(a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None))


def test_every_config_key_is_an_option_or_yaml_only():
    params = _train_params()
    keys = set(SECTION_OF)
    assert keys - YAML_ONLY <= set(params), f"config keys with no option: {keys - YAML_ONLY - set(params)}"
    assert not YAML_ONLY & set(params), "a key is both an option and declared YAML-only"
    assert set(params) - keys == {"config"}, "every option but --config sets a config key"


@pytest.mark.parametrize("key", sorted(set(SECTION_OF) - YAML_ONLY - {"data_dir"}))
def test_option_name_type_and_default_follow_the_config(key):
    param = _train_params()[key]
    default = TrainConfig().to_dict()[key]
    assert "--" + key.replace("_", "-") in param.opts
    # None: a typed option overrides the YAML file, an untyped one does not
    assert param.default is None
    option_type = typing.get_args(typing.get_type_hints(train_cli.train)[key])[0]
    assert option_type == _config_type(key) or (option_type is Path and _config_type(key) is str)
    if default is not None and key not in ("out", "resume"):
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        assert f"(default: {shown})" in " ".join(param.help.split())
    for choice in choices(key) if key != "device" else ():
        assert choice in param.help


def test_help_shows_the_config_defaults():
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=400)
    assert result.exit_code == 0
    assert "(default: resnet101)" in result.output and "(default: 0.997)" in result.output
