"""Foreign-image sets (crystalscope.data.ood_sets): seeded PNG folders with a manifest."""

from __future__ import annotations

import hashlib

import pytest

from crystalscope.data.ood_sets import generate, set_folders
from crystalscope.errors import CrystalscopeError


def digest(folder) -> str:
    return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(folder.rglob("*.png")))).hexdigest()


def test_sets_are_seeded_and_listed_in_the_manifest(tmp_path):
    sets = ("uniform", "noise", "checkerboard")
    summary = generate(tmp_path / "a", per_set=3, seed=5, sets=sets)
    generate(tmp_path / "b", per_set=3, seed=5, sets=sets)
    generate(tmp_path / "c", per_set=3, seed=6, sets=sets)
    assert list(summary["sets"]) == list(sets)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    found = set_folders(tmp_path / "a")
    assert {name: kind for name, (_, kind) in found.items()} == {s: summary["sets"][s]["kind"] for s in sets}
    assert all(len(list(folder.glob("*.png"))) == 3 for folder, _ in found.values())
    assert set_folders(tmp_path) is None  # no manifest: not an OOD folder


def test_bad_options_and_manifests_are_one_line_errors(tmp_path):
    with pytest.raises(CrystalscopeError, match="--sets cats: unknown"):
        generate(tmp_path / "x", sets=("cats",))
    with pytest.raises(CrystalscopeError, match="--per-set 0"):
        generate(tmp_path / "x", per_set=0, sets=("noise",))
    generate(tmp_path / "y", per_set=1, sets=("noise",))
    (tmp_path / "y" / "ood_sets.json").write_text("{not json")
    with pytest.raises(CrystalscopeError, match="not a readable OOD-set manifest"):
        set_folders(tmp_path / "y")


def test_one_writer_at_a_time_and_a_killed_runs_staging_is_cleaned(tmp_path):
    from crystalscope.safety import lock_path

    out = tmp_path / "ood"
    stale = tmp_path / ".ood.999999999.abc.partial"  # the staging folder of a run killed with -9
    stale.mkdir()
    lock_path(out).write_text("1")  # pid 1 always runs: another writer holds the output
    with pytest.raises(CrystalscopeError, match="being written by another crystalscope process"):
        generate(out, per_set=1, sets=("noise",))
    lock_path(out).unlink()
    generate(out, per_set=1, sets=("noise",))
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ood"]
