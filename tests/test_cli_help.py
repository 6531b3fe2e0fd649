"""Every command is registered, prints its --help, and every option and argument says what it is for.

Cheap guards for the cli/ package: a group module that is not imported, or an option without
help text, shows up here instead of in a user's terminal.
"""

from __future__ import annotations

import click
import pytest
import typer
from typer.testing import CliRunner

from crystalscope.cli import app

COMMAND = typer.main.get_command(app)
COMMANDS = sorted(COMMAND.commands)
# the commands the README documents; a group module that fails to register loses its commands
EXPECTED = {"synth", "split", "audit", "synth-ood", "train", "demo", "evaluate", "export", "predict", "merge",
            "ood-eval", "embed", "drift", "explain", "synth-process", "monitor", "serve"}


def test_every_documented_command_is_registered():
    assert EXPECTED <= set(COMMANDS), f"missing: {sorted(EXPECTED - set(COMMANDS))}"


def test_the_root_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_works(name):
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and name in result.output
    command = COMMAND.commands[name]
    assert (command.help or "").strip(), f"{name} has no docstring"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_and_argument_has_help(name):
    command = COMMAND.commands[name]
    missing = [param.name for param in command.params
               if not (getattr(param, "help", None) or "").strip()]
    assert not missing, f"{name}: no help text for {missing}"


@pytest.mark.parametrize("name", COMMANDS)
def test_option_names_are_unique_and_long(name):
    """Each option has a --long name and no two options of a command share a flag."""
    options = [p for p in COMMAND.commands[name].params if isinstance(p, click.Option)]
    flags = [flag for option in options for flag in option.opts + option.secondary_opts]
    assert len(flags) == len(set(flags)), f"{name}: a flag is declared twice"
    for option in options:
        assert any(flag.startswith("--") for flag in option.opts), f"{name}: {option.opts} has no --long name"


def test_the_version_option_prints_the_version():
    from crystalscope.version import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
