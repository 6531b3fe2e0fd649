"""Runtime plumbing shared by every layer: devices, worker counts, progress, error text.

Written once here so that commands agree (the same worker default, the same device rules, the
same first line of an exception) instead of each module carrying its own copy. Nothing here
imports torch or rich at module level: a plant PC that only runs ``predict`` with ONNX Runtime
imports this module without them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator

from crystalscope.errors import CrystalscopeError

log = logging.getLogger("crystalscope")

# decoding small PNGs scales well with processes, but beyond 8 the pool's start-up dominates
MAX_WORKERS = 8

# a library reports progress by calling on_progress(done, total); total None = unknown
ProgressCallback = Callable[[int, "int | None"], None]


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask when the OS has one, else all; at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def default_workers(requested: int | None = None, cap: int = MAX_WORKERS) -> int:
    """Worker processes or threads to use: ``requested`` if given, else every CPU up to ``cap``.

    Example:
        >>> default_workers(3)
        3
        >>> 1 <= default_workers() <= MAX_WORKERS
        True
    """
    if requested is not None:
        if int(requested) < 1:
            raise CrystalscopeError(f"--workers {requested}: must be at least 1")
        return int(requested)
    return max(1, min(cap, cpu_count()))


def resolve_device(name: str = "auto"):
    """A ``torch.device`` from ``auto``/``cpu``/``cuda[:N]``/``mps``; one line of error if unusable.

    ``auto`` means CUDA when a GPU is visible, else the CPU.

    Example:
        >>> str(resolve_device("cpu"))
        'cpu'
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CrystalscopeError(f"--device {name!r} is not a device: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrystalscopeError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def first_line(exc: BaseException, limit: int | None = 200, without: str | None = None) -> str:
    """The first non-empty line of an exception's message (its type name when it has none).

    ``without``: a file name to drop from the start ("NAME: reason" -> "reason"), where the
    row or record that shows the line already names the file.

    Example:
        >>> first_line(ValueError("bad value\\nmore detail"))
        'bad value'
        >>> first_line(KeyError())
        'KeyError'
        >>> first_line(OSError("a.png: not a readable image"), without="a.png")
        'not a readable image'
    """
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if without is not None:
        line = line.removeprefix(f"{without}: ")
    return line[:limit] if limit else line


def counter(on_progress: ProgressCallback | None, total: int | None = None) -> Callable[..., None]:
    """An ``on_batch(n=1)`` for a loop that adds up what is done and reports it to ``on_progress``.

    Example:
        >>> seen = []
        >>> step = counter(lambda done, total: seen.append((done, total)), total=5)
        >>> step(2); step()
        >>> seen
        [(2, 5), (3, 5)]
    """
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total)

    return advance


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None, enabled: bool = True,
                 transient: bool = True) -> Iterator[ProgressCallback]:
    """A rich progress bar on stderr, as an ``on_progress(done, total)`` callback.

    The one bar of the project: libraries take an ``on_progress`` callback (or this), so they
    never depend on how progress is shown. Disabled, or when stderr is not a terminal, it yields a
    callback that does nothing.

    Example:
        >>> with progress_bar("decode", total=3, enabled=False) as advance:
        ...     advance(3, 3)
    """
    import sys

    # no terminal (a pipe, a log file, CI): a bar would only leave blank lines between log lines
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total=None: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    # markup=False: a description may hold a file name, and "[/b]" in it would raise in rich
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=transient) as bar:
        task = bar.add_task(description, total=total)

        def advance(done: int, new_total: int | None = None) -> None:
            bar.update(task, completed=done, total=new_total if new_total is not None else total)

        yield advance


def run_chunks(func: Callable, chunks: list, sizes: list[int], description: str,
               progress: bool, workers: int | None, serial_below: int = 0) -> list:
    """``[func(c) for c in chunks]`` in worker processes, in order, with a progress bar.

    Args:
        func: a module-level function (it is pickled to the workers).
        chunks: its arguments, one per task.
        sizes: images per chunk (what the bar counts).
        description: the bar's label.
        progress: show the bar.
        workers: processes (default :func:`default_workers`).
        serial_below: run in this process when there are fewer items than this (worker
            start-up would dominate).

    Example:
        >>> run_chunks(len, [[1, 2], [3]], [2, 1], "counting", progress=False, workers=1)
        [2, 1]
    """
    workers = default_workers(workers)
    total = sum(sizes)
    results = []
    if workers <= 1 or total < serial_below:
        with progress_bar(description, total, enabled=progress) as advance:
            done = 0
            for chunk, size in zip(chunks, sizes):
                results.append(func(chunk))
                done += size
                advance(done)
        return results
    # the pool is created (and its workers forked) before the bar: rich refreshes the bar from a
    # thread, and forking a process while another thread holds a lock can deadlock the child
    pool = ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        with _sigterm_as_exit():
            futures = [pool.submit(func, chunk) for chunk in chunks]
            with progress_bar(description, total, enabled=progress) as advance:
                done = 0
                for future, size in zip(futures, sizes):
                    results.append(future.result())
                    done += size
                    advance(done)
    except BaseException:
        stop_pool(pool)
        raise
    pool.shutdown()
    return results


#: seconds between a worker's looks at its parent where the OS cannot signal it (not Linux)
PARENT_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker as soon as the process that started it is gone.

    Why: a ``kill -9`` of ``synth``/``split``/``audit`` would otherwise leave its workers
    running, still writing into a folder that a rerun is about to clean or write. On Linux
    the kernel sends SIGKILL the moment the parent dies (``PR_SET_PDEATHSIG``); everywhere a
    daemon thread also checks every :data:`PARENT_POLL_S` s that the parent is still ours.

    Example:
        >>> die_with_parent(os.getppid())  # doctest: +SKIP
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="crystalscope-parent-watch", daemon=True).start()


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now (an error, Ctrl-C or SIGTERM)."""
    # the executor keeps no public list of its processes: read it, tolerating its absence
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=5)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) in the main thread, so the pool and staging folders are cleaned up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
