"""Runtime plumbing (crystalscope/runtime.py): workers, devices, error text, progress."""

from __future__ import annotations

import os

import pytest

from crystalscope.errors import CrystalscopeError
from crystalscope.runtime import (
    MAX_WORKERS,
    counter,
    cpu_count,
    default_workers,
    first_line,
    progress_bar,
    resolve_device,
    run_chunks,
)


def test_cpu_count_follows_the_affinity_mask():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cpu_count() == max(1, expected)


def test_default_workers_is_the_request_or_every_cpu_up_to_the_cap(monkeypatch):
    assert default_workers(3) == 3 and default_workers("2") == 2
    monkeypatch.setattr("crystalscope.runtime.cpu_count", lambda: 64)
    assert default_workers() == MAX_WORKERS and default_workers(cap=4) == 4
    monkeypatch.setattr("crystalscope.runtime.cpu_count", lambda: 1)
    assert default_workers() == 1
    with pytest.raises(CrystalscopeError, match="--workers 0"):
        default_workers(0)


def test_resolve_device_names_the_option_on_a_bad_device():
    import torch

    assert str(resolve_device("cpu")) == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CrystalscopeError, match="--device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CrystalscopeError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_first_line_is_the_message_head_or_the_type_name():
    assert first_line(ValueError("\n  bad value\nmore")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("x" * 300)) == "x" * 200
    assert first_line(OSError("x" * 300), limit=120) == "x" * 120
    assert first_line(OSError("x" * 300), limit=None) == "x" * 300


def test_progress_bar_reports_through_a_callback(capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    with progress_bar("decode", total=3, enabled=False) as advance:
        advance(1, 3)
    assert capsys.readouterr().err == ""  # disabled: silent even on a terminal
    with progress_bar("decode", total=None, transient=False) as advance:  # total unknown at first
        advance(1)
        advance(2, 4)  # the callback's total replaces it
    assert "2/4" in capsys.readouterr().err


def test_progress_bar_stays_silent_without_a_terminal(capsys, monkeypatch):
    """A pipe or a log file gets no bar (it would leave blank lines); a terminal gets one."""
    with progress_bar("decode", total=2) as advance:  # pytest's captured stderr is not a terminal
        advance(2, 2)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    with progress_bar("decode", total=2, transient=False) as advance:
        advance(2, 2)
    assert "decode" in capsys.readouterr().err


def test_counter_adds_up_batches_and_tolerates_no_callback():
    seen = []
    step = counter(lambda done, total: seen.append((done, total)), total=10)
    step(4)
    step()
    assert seen == [(4, 10), (5, 10)]
    counter(None)(3)  # no callback: nothing to report, no error


@pytest.mark.parametrize("workers, serial_below", [(1, 0), (2, 0), (2, 100)])
def test_run_chunks_gives_results_in_chunk_order_in_or_out_of_process(workers, serial_below):
    chunks = [[1, 2], [3], [4, 5, 6], [7]]
    assert run_chunks(sum, chunks, [2, 1, 3, 1], "adding", progress=False, workers=workers,
                      serial_below=serial_below) == [3, 3, 15, 7]


def test_first_line_can_drop_the_file_name_a_row_already_shows():
    error = OSError("scan_0001.png: not a readable image (truncated)\nmore")
    assert first_line(error, without="scan_0001.png") == "not a readable image (truncated)"
    assert first_line(error, without="other.png") == "scan_0001.png: not a readable image (truncated)"


def test_a_worker_whose_parent_is_gone_ends_itself():
    import subprocess
    import sys

    code = "from crystalscope.runtime import die_with_parent; die_with_parent(1); print('still here')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "still here" not in proc.stdout


def test_stop_pool_ends_a_busy_worker_now():
    import time
    from concurrent.futures import ProcessPoolExecutor

    from crystalscope.runtime import stop_pool

    pool = ProcessPoolExecutor(max_workers=1)
    pool.submit(time.sleep, 60)
    time.sleep(0.5)
    processes = list(pool._processes.values())
    started = time.monotonic()
    stop_pool(pool)
    assert time.monotonic() - started < 10 and not any(p.is_alive() for p in processes)
