"""The attack harness of the reliability tests (``tests/test_reliability*.py``).

Each attack runs a real command on tiny data and asserts its outcome: the exit code, no
traceback, the error line's key words, that every file that existed before is byte-identical
afterwards and, for attacks run in a subprocess, that the command ended within its time limit
(a hang is a failure). Every attack is recorded in :data:`ATTACKS`; with
``CRYSTALSCOPE_RELIABILITY_TABLE=docs/reliability.md`` the session writes the table of
``docs/reliability.md`` from them (``tests/conftest.py``). Each test module adds the rows of
"where each class of fault is fixed" it covers to :data:`FIXES`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

RUNNER = CliRunner()
#: one dict per attack run in this session (see :func:`record`)
ATTACKS: list[dict] = []
#: (class of fault, cause, fix) rows for docs/reliability.md, added by each attack module
FIXES: list[tuple[str, str, str]] = []


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every regular file under ``roots`` (the files a user has before an attack)."""
    files = {}
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def record(name: str, command: str, *, exit_code: int | None, expected: int, output: str, changed: int,
           traceback: bool, hang: bool = False) -> None:
    """Add one attack's outcome to :data:`ATTACKS` (``exit_code`` None: it hung and was killed)."""
    error = next((line for line in output.splitlines() if line.startswith("error:")), "")
    ATTACKS.append({"attack": name, "command": command, "exit": exit_code, "expected": expected, "error": error,
                    "changed": changed, "traceback": traceback, "hang": hang})


def check_attack(name: str, args: list, *, code: int, words: tuple[str, ...] = (), roots: tuple[Path, ...] = (),
                 shown: str | None = None):
    """Run ``crystalscope ARGS`` in this process and assert the outcome; record it."""
    from crystalscope.cli import app

    before = snapshot(*roots)
    result = RUNNER.invoke(app, [str(a) for a in args])
    after = snapshot(*roots)
    output = result.output
    changed = sorted(p for p, digest in before.items() if after.get(p) != digest)
    traceback = "Traceback" in output or not isinstance(result.exception, (SystemExit, type(None)))
    record(name, shown or "crystalscope " + " ".join(str(a) for a in args), exit_code=result.exit_code,
           expected=code, output=output, changed=len(changed), traceback=traceback)
    assert result.exit_code == code, output
    assert not traceback, output
    for word in words:
        assert word in output, output
    assert not changed, f"{name}: pre-existing files changed: {changed}"
    return result


def check_attack_process(name: str, args: list, *, code: int, words: tuple[str, ...] = (),
                         roots: tuple[Path, ...] = (), timeout: float = 120, cwd: Path | None = None,
                         env: dict | None = None, shown: str | None = None) -> subprocess.CompletedProcess:
    """Like :func:`check_attack`, in a subprocess (``python -m crystalscope``) with a time limit:
    for attacks that could hang (FIFOs, devices), kill the parent or need a real stdout."""
    before = snapshot(*roots)
    command = [sys.executable, "-m", "crystalscope", *[str(a) for a in args]]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
        exit_code, output, hang = proc.returncode, proc.stdout + proc.stderr, False
    except subprocess.TimeoutExpired as exc:
        proc, exit_code, hang = None, None, True
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
    after = snapshot(*roots)
    changed = sorted(p for p, digest in before.items() if after.get(p) != digest)
    record(name, shown or "crystalscope " + " ".join(str(a) for a in args), exit_code=exit_code, expected=code,
           output=output, changed=len(changed), traceback="Traceback" in output, hang=hang)
    assert not hang, f"{name}: no answer within {timeout} s"
    assert exit_code == code, output
    assert "Traceback" not in output, output
    for word in words:
        assert word in output, output
    assert not changed, f"{name}: pre-existing files changed: {changed}"
    return proc


def dead_pid() -> int:
    """The pid of a process that has already exited (what a kill -9'd writer leaves behind)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
