"""Shared fixtures: tiny generated data and the real sample crops when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REAL_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "real_samples"


@pytest.fixture
def real_samples() -> Path:
    """The real crops in ../shared/real_samples (skipped in a user's checkout)."""
    if not REAL_SAMPLES.is_dir():
        pytest.skip("../shared/real_samples is not present")
    return REAL_SAMPLES


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the decode cache of test runs out of the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread: on a busy 2-core machine two OpenMP threads spin-wait (10x slowdowns measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the reliability attacks (tests/test_reliability*.py, harness in tests/attacks.py) -------

@pytest.fixture
def tmpfs(tmp_path):
    """``make(size, ro=False)`` mounts a tmpfs under tmp_path (root only), unmounted afterwards."""
    import os
    import shutil
    import subprocess

    mounts = []

    def make(size: str, ro: bool = False, fill=None) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounts.append(point)
        if fill:
            fill(point)
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny split (8/4/4 per class, 32 px), a checkpoint and its ONNX export (untrained resnet18).

    Shared by every attack module: attacks must not change these files (they snapshot them).
    """
    from attacks import RUNNER
    from crystalscope.cli import app
    from crystalscope.data.transforms import Preprocessing
    from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint
    from crystalscope.models.factory import HeadSpec, build_model
    from lines_and_discs import make_split

    root = tmp_path_factory.mktemp("assets")
    split = make_split(root / "split", {"train": (8, 8), "val": (4, 4), "test": (4, 4)}, size=32)
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    ckpt = make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", preprocessing=Preprocessing(image_size=32))
    ckpt_path = save_checkpoint(ckpt, root / "model.ckpt")
    RUNNER.invoke(app, ["export", str(ckpt_path), "--out", str(root / "model.onnx")])
    return {"root": root, "split": split, "ckpt": ckpt_path, "onnx": root / "model.onnx",
            "images": split / "test" / "CEX"}


def pytest_sessionfinish(session, exitstatus):
    """With CRYSTALSCOPE_RELIABILITY_TABLE=FILE, write the attack table of every attack that ran."""
    import os
    import sys

    target = os.environ.get("CRYSTALSCOPE_RELIABILITY_TABLE")
    attacks = sys.modules.get("attacks")
    if not target or attacks is None or not attacks.ATTACKS:
        return
    from reliability_table import render

    previous = Path(target).read_text() if Path(target).is_file() else ""
    # a failed attack test is a wrong outcome (a code, a line or a file other than asserted)
    Path(target).write_text(render(attacks.ATTACKS, attacks.FIXES, previous, failed=session.testsfailed))
