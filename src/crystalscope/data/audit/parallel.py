"""Chunks of images in worker processes, in order, with one progress bar.

Used by the fingerprinting pass (:mod:`.scan`) and by the second decode that verifies
duplicates across chunks (:mod:`.duplicates`). Read ``CHUNK`` and ``SERIAL_BELOW`` through this
module (``parallel.CHUNK``) so a test can change them in one place.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Callable

from crystalscope.runtime import default_workers, progress_bar

#: Images per worker task: large enough to hide process overhead, small for a smooth bar.
CHUNK = 64
#: Below this many images the work runs in-process (worker start-up would dominate).
SERIAL_BELOW = 2 * CHUNK


def run_chunks(func: Callable, chunks: list, sizes: list[int], description: str,
               progress: bool, workers: int | None) -> list:
    """``[func(c) for c in chunks]`` in worker processes, in order, with a progress bar.

    Args:
        func: a module-level function (it is pickled to the workers).
        chunks: its arguments, one per task.
        sizes: images per chunk (what the bar counts).
        description: the bar's label.
        progress: show the bar.
        workers: processes (default :func:`~crystalscope.runtime.default_workers`).

    Example:
        >>> run_chunks(len, [[1, 2], [3]], [2, 1], "counting", progress=False, workers=1)
        [2, 1]
    """
    workers = default_workers(workers)
    total = sum(sizes)
    results = []
    if workers <= 1 or total < SERIAL_BELOW:
        with progress_bar(description, total, enabled=progress) as advance:
            done = 0
            for chunk, size in zip(chunks, sizes):
                results.append(func(chunk))
                done += size
                advance(done)
        return results
    # the pool is created (and its workers forked) before the bar: rich refreshes the bar from a
    # thread, and forking a process while another thread holds a lock can deadlock the child
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(func, chunk) for chunk in chunks]
        with progress_bar(description, total, enabled=progress) as advance:
            done = 0
            for future, size in zip(futures, sizes):
                results.append(future.result())
                done += size
                advance(done)
    return results
