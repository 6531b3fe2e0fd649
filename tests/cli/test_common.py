"""What every command shares (cli/common.py): the one error boundary and the log handler.

(The progress bar is runtime.progress_bar, tested in tests/test_runtime.py.)
"""

from __future__ import annotations

import errno
import logging

import pytest
import typer
from typer.testing import CliRunner

from crystalscope.cli.common import log_to_terminal, user_errors
from crystalscope.errors import CrystalscopeError


def _command(exc: BaseException):
    demo = typer.Typer()

    @demo.command()
    @user_errors
    def run():
        raise exc

    return demo


@pytest.mark.parametrize("exc, code, words", [
    (CrystalscopeError("--out x: give a folder"), 2, "error: --out x: give a folder"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/a/x.png"), 1, "no space left on device while writing runs/a/x.png"),
    (MemoryError(), 1, "out of memory"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_the_cli_boundary_turns_expected_errors_into_one_line(exc, code, words):
    result = CliRunner().invoke(_command(exc), [])
    assert result.exit_code == code
    assert words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_an_error_may_carry_its_own_exit_code():
    class Refused(CrystalscopeError):
        exit_code = 3

    result = CliRunner().invoke(_command(Refused("no")), [])
    assert result.exit_code == 3 and "error: no" in result.output


def test_a_programming_error_is_not_swallowed():
    result = CliRunner().invoke(_command(ZeroDivisionError("bug")), [])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


def test_log_records_reach_the_terminal_as_bare_messages(capsys):
    logger = logging.getLogger("crystalscope")
    before = (list(logger.handlers), logger.level)
    try:
        log_to_terminal(verbose=False)
        logging.getLogger("crystalscope.demo").info("1/5 synth")
        logging.getLogger("crystalscope.demo").debug("hidden detail")
        log_to_terminal(verbose=True)
        log_to_terminal(verbose=True)  # called once per command: never two handlers
        logging.getLogger("crystalscope.demo").debug("shown detail")
    finally:
        logger.handlers[:], logger.level = before
    assert capsys.readouterr().err.splitlines() == ["1/5 synth", "shown detail"]



@pytest.mark.parametrize("text", ["split of data [/b] -> out", "PG [red]x.png", "[link=x]y", "back\\slash [/]",
                                  ":smile: [bold]"])
def test_the_cli_console_prints_user_text_literally(text):
    from rich.table import Table

    from crystalscope.cli.common import console

    out = console()
    with out.capture() as captured:
        out.print(text)
        table = Table(title=f"audit of {text}")
        table.add_column(text)
        table.add_row(text)
        out.print(table)
    assert captured.get().count(text) >= 3, captured.get()


def test_an_error_message_with_markup_is_one_literal_line():
    result = CliRunner().invoke(_command(CrystalscopeError("data [/b]/x.png: not found")), [])
    assert result.exit_code == 2 and result.output.strip() == "error: data [/b]/x.png: not found"
