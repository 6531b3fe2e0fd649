"""training/record.py: environment.json's content and the global RNG states a resume restores."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from crystalscope.training import record


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_weights_hash_is_a_content_hash_of_names_shapes_and_values():
    first, same, other = _tiny_model(0), _tiny_model(0), _tiny_model(1)
    digest = record.weights_hash(first)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert record.weights_hash(same) == digest and record.weights_hash(other) != digest
    with torch.no_grad():
        same[0].weight[0, 0] += 1e-6  # one value, slightly
    assert record.weights_hash(same) != digest
    # a buffer (here BatchNorm's step counter) counts too, not only the parameters
    first[1].num_batches_tracked += 1
    assert record.weights_hash(first) != digest


def test_git_commit_names_this_checkout():
    source = Path(record.__file__).resolve().parents[3]
    if not (source / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout
    assert record.git_commit() == head.strip() and len(head.strip()) == 40


def test_environment_record_is_json_and_names_what_reproduces_the_run():
    hashes = {"train": "sha256:aa", "val": "sha256:bb"}
    env = record.environment_record(seed=7, device=torch.device("cpu"), data_hashes=hashes,
                                    initial_weights="sha256:cc", weights_source="none")
    assert json.loads(json.dumps(env)) == env
    assert env["seed"] == 7 and env["device"] == "cpu" and env["cuda"] is None
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["data_sha256"] == hashes and env["data_sha256"] is not hashes  # a copy
    assert env["initial_weights_sha256"] == "sha256:cc" and env["weights_source"] == "none"
    assert env["torch_threads"] == torch.get_num_threads()


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_restoring_the_rng_states_repeats_the_same_random_numbers():
    states = record.rng_states()
    first = _draws()
    record.restore_rng_states(states)
    assert _draws() == first


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    states = record.rng_states()
    first = _draws()
    torch.save({"rng": states}, tmp_path / "states.pt")
    loaded = torch.load(tmp_path / "states.pt", weights_only=True)["rng"]
    record.restore_rng_states(loaded)
    assert _draws() == first


def test_restore_leaves_missing_generators_alone():
    record.restore_rng_states(None)
    record.restore_rng_states({})
    states = record.rng_states()
    torch_first, numpy_first, _ = _draws()
    random.seed(5)
    python_expected = [random.random() for _ in range(3)]
    random.seed(5)
    record.restore_rng_states({"torch": states["torch"], "numpy": states["numpy"]})  # no "python" entry
    torch_again, numpy_again, python_now = _draws()
    assert (torch_again, numpy_again) == (torch_first, numpy_first) and python_now == python_expected
