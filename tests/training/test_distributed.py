"""Two gloo processes on the CPU: one run folder, the metrics of a one-process evaluation, and a
killed rank that stops the other with one line (training/distributed.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crystalscope.training.distributed import StoppedByPeer, World, first_failure, shard_indices
from crystalscope.formats import MANIFEST_FILE, RUN_FILES
from lines_and_discs import make_split

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--f1-threshold", "1.1", "--cache-dir", "off", "--no-onnx", "--device", "cpu"]


def crystalscope(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.Popen([sys.executable, "-m", "crystalscope", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return make_split(tmp_path_factory.mktemp("data") / "split")


def test_shards_cover_each_row_once_and_padded_shards_are_equal():
    for n in (0, 1, 7, 84):
        for size in (1, 2, 3):
            shards = [shard_indices(n, World(rank, size)) for rank in range(size)]
            assert sorted(np.concatenate(shards).tolist()) == list(range(n))
            if n:
                padded = [shard_indices(n, World(rank, size), pad=True) for rank in range(size)]
                assert len({len(p) for p in padded}) == 1 and set(np.concatenate(padded)) == set(range(n))


def test_two_processes_write_one_run_with_the_metrics_of_a_one_process_evaluation(split, tmp_path):
    out = tmp_path / "runs" / "ddp"
    proc = crystalscope("train", str(split), *TINY, "--epochs", "1", "--out", str(out), "--nproc", "2")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "2 processes: effective batch 16 (8 per process)" in output
    assert "Traceback" not in output
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]  # one run folder, written by rank 0 only
    assert {p.name for p in out.iterdir()} <= {*RUN_FILES, MANIFEST_FILE}
    assert {p.name for p in (out / "weights").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert "nproc: 2" in (out / "config.yaml").read_text()
    ddp = json.loads((out / "test_results.json").read_text())
    # the one-process evaluation of the same checkpoint (the `evaluate` command's library function)
    from crystalscope.inference.evaluate import evaluate_checkpoint

    single = evaluate_checkpoint(out / "weights" / "best.ckpt", split / "test", tmp_path / "eval", device="cpu",
                                 progress=False)
    assert ddp["n_images"] == single["n_images"] == 16  # every test image once, none twice
    assert ddp["n_missed"] == single["n_missed"]
    assert ddp["macro"]["f1"] == pytest.approx(single["macro"]["f1"], abs=1e-9)
    for name, scores in single["per_class"].items():
        assert ddp["per_class"][name]["f1"] == pytest.approx(scores["f1"], abs=1e-9)


class _Failure:  # the two fields of torch's ProcessFailure that first_failure reads
    def __init__(self, exitcode: int, timestamp: int):
        self.exitcode, self.timestamp = exitcode, timestamp


def test_the_first_failure_is_the_cause_not_a_rank_that_stopped_because_of_it():
    killed, follower = _Failure(-signal.SIGKILL, 100), _Failure(StoppedByPeer.exit_code, 100)
    # same second (torch's timestamps are whole seconds): the rank that stopped because of the other is not named
    assert first_failure({0: follower, 1: killed})[0] == 1
    assert first_failure({0: _Failure(-signal.SIGTERM, 99), 1: killed})[0] == 1
    # two real failures: the earlier one, then the lower rank
    assert first_failure({0: _Failure(1, 101), 1: _Failure(1, 100)})[0] == 1
    assert first_failure({0: _Failure(1, 100), 1: _Failure(-signal.SIGKILL, 100)})[0] == 0
    # only followers (the cause was not seen): still one rank, the earliest
    assert first_failure({0: _Failure(StoppedByPeer.exit_code, 101), 1: _Failure(StoppedByPeer.exit_code, 100)})[0] == 1


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker with ``RANK=rank`` started (directly) by ``launcher``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_killing_one_rank_stops_the_other_with_a_clean_error(split, tmp_path):
    out = tmp_path / "run"
    proc = crystalscope("train", str(split), *TINY, "--epochs", "500", "--patience", "1000", "--out", str(out),
                        "--nproc", "2")
    try:
        deadline = time.monotonic() + 180
        while not (out / "weights" / "last.ckpt").is_file():  # both ranks are in the epochs now
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=90)  # bounded: the other rank must not hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output
    assert "error: train --nproc 2: rank 1 was killed by SIGKILL" in output
    assert "error: rank 0:" in output  # the survivor says why it stopped
    assert "Traceback" not in output
    assert (out / "weights" / "last.ckpt").is_file()  # what rank 0 saved is kept for --resume
