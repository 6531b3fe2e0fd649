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
