"""Dataset audit: dihedral duplicate finding with pixel verification, leakage, shortcuts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.data.audit import parallel
from crystalscope.data.audit import (audit_dataset, candidate_pairs, dihedral_phash, dihedral_views,
                                     find_duplicate_groups, find_duplicates, scan_images)
from crystalscope.errors import CrystalscopeError


def texture(rng: np.random.Generator, h: int, w: int, brightness: int = 0) -> np.ndarray:
    """A smooth random grey texture (coarse noise upsampled + fine noise) as uint8 RGB."""
    coarse = rng.uniform(0, 200, size=(h // 8 + 2, w // 8 + 2))
    smooth = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((w, h), Image.BILINEAR))
    grey = np.clip(smooth + rng.normal(0, 12, size=(h, w)) + brightness, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    """cex: 12 distinct 40x40 crops + an exact copy; pg: 4 crystals x 3 dihedral views of
    varying sizes, 3 distinct singles, a near-miss (3 pixels changed), a corrupt PNG; a text file."""
    rng = np.random.default_rng(7)
    root = tmp_path / "data"
    cex = [save(texture(rng, 40, 40), root / "cex" / f"CEX ({i + 1}).png") for i in range(12)]
    exact_copy = root / "cex" / "CEX (13).png"
    exact_copy.write_bytes(cex[0].read_bytes())
    groups, number = [], 1
    for h, w in [(48, 56), (60, 44), (52, 52), (57, 63)]:
        crystal = texture(rng, h, w, brightness=40)
        views = [crystal, np.rot90(crystal), crystal[:, ::-1]]
        groups.append([save(v, root / "pg" / f"PG ({number + k}).png") for k, v in enumerate(views)])
        number += len(views)
    singles = [save(texture(rng, 45 + 3 * k, 50, brightness=40), root / "pg" / f"PG ({20 + k}).png")
               for k in range(3)]
    near = np.array(Image.open(groups[0][0]))
    near[5, 5] ^= 0xFF
    near[20, 30] ^= 0x0F
    near[40, 10] ^= 0x01
    near_miss = save(near, root / "pg" / "PG (30).png")
    corrupt = root / "pg" / "PG (31).png"
    corrupt.write_bytes(groups[1][0].read_bytes()[:100])
    (root / "cex" / "notes.txt").write_text("not an image")
    expected = [sorted(map(str, g)) for g in groups] + [sorted([str(cex[0]), str(exact_copy)])]
    return {"root": root, "expected": sorted(expected), "near_miss": near_miss, "corrupt": corrupt,
            "groups": groups, "cex": cex, "singles": singles}


def test_hash_of_every_rotation_and_mirror_matches_one_of_the_eight():
    image = texture(np.random.default_rng(0), 37, 53)
    hashes = set(dihedral_phash(image).tolist())
    views = list(dihedral_views(image))
    assert len({v.tobytes() + bytes(v.shape) for v in views}) == 8  # all views differ
    for view in views:
        assert int(dihedral_phash(np.ascontiguousarray(view))[0]) in hashes


def test_duplicate_groups_are_exactly_the_dihedral_and_exact_copies(dataset):
    paths = sorted(p for p in dataset["root"].rglob("*") if p.suffix == ".png")
    groups = find_duplicate_groups(paths)
    assert sorted(sorted(map(str, g)) for g in groups) == dataset["expected"]
    grouped = {p for g in groups for p in g}
    assert dataset["near_miss"] not in grouped
    assert not grouped & set(dataset["singles"])


def test_near_miss_is_a_hash_candidate_but_pixel_check_rejects_it(dataset):
    records = scan_images(sorted((dataset["root"] / "pg").glob("*.png")))
    report = find_duplicates(records)
    near = dataset["near_miss"]
    assert report.n_near_miss_pairs >= 1
    assert any(near in (a, b) for a, b, _ in report.near_misses)
    assert all(near not in g for g in report.groups)


def test_hash_collisions_never_become_duplicates(dataset):
    # max_distance=64 makes every same-sized pair a candidate: only the pixel check decides
    records = scan_images(sorted(p for p in dataset["root"].rglob("*.png")))
    loose = find_duplicates(records, max_distance=64)
    strict = find_duplicates(records)
    assert loose.n_candidate_pairs > strict.n_candidate_pairs + 50
    assert sorted(sorted(map(str, g)) for g in loose.groups) == dataset["expected"]


def test_copies_in_different_chunks_are_checked_by_a_second_decode(dataset, monkeypatch):
    paths = sorted(dataset["root"].rglob("*.png"))
    in_chunk = find_duplicates(scan_images(paths))
    assert in_chunk.n_decoded_again == 0  # one chunk: every candidate checked during the scan
    monkeypatch.setattr(parallel, "CHUNK", 2)  # splits the dihedral groups across chunks
    across = find_duplicates(scan_images(paths))
    assert across.n_decoded_again > 0
    assert across.groups == in_chunk.groups and across.exact_groups == in_chunk.exact_groups
    assert sorted(sorted(map(str, g)) for g in across.groups) == dataset["expected"]


def test_exact_groups_are_only_identical_copies(dataset):
    report = find_duplicates(scan_images(sorted(dataset["root"].rglob("*.png"))))
    assert [sorted(map(str, g)) for g in report.exact_groups] == [
        sorted([str(dataset["cex"][0]), str(dataset["root"] / "cex" / "CEX (13).png")])]


def test_rotated_real_crop_is_found(real_samples, tmp_path):
    crop = np.array(Image.open(real_samples / "PG (567).png").convert("RGB"))
    paths = [save(crop, tmp_path / "a.png"), save(np.rot90(crop, 3), tmp_path / "b.png"),
             save(np.rot90(crop[::-1]), tmp_path / "c.png"),
             save(np.array(Image.open(real_samples / "PG (590).png").convert("RGB")), tmp_path / "d.png")]
    assert find_duplicate_groups(paths) == [paths[:3]]


def test_parallel_scan_matches_serial(dataset, monkeypatch):
    paths = sorted(dataset["root"].rglob("*.png"))
    serial = scan_images(paths, workers=1)
    monkeypatch.setattr(parallel, "SERIAL_BELOW", 0)
    monkeypatch.setattr(parallel, "CHUNK", 5)
    pooled = scan_images(paths, workers=2)
    assert [r.path for r in pooled] == paths
    assert [r.phash.tolist() if r.readable else r.error for r in pooled] == \
           [r.phash.tolist() if r.readable else r.error for r in serial]


def test_candidates_only_pair_images_of_the_same_size_up_to_transpose(dataset):
    records = scan_images(sorted((dataset["root"] / "pg").glob("*.png")))
    for a, b, _ in candidate_pairs(records, max_distance=64):
        ra, rb = records[a], records[b]
        assert sorted((ra.width, ra.height)) == sorted((rb.width, rb.height))


def test_audit_of_class_folders_writes_report_with_required_keys(dataset, tmp_path):
    out = tmp_path / "report"
    result = audit_dataset(dataset["root"], out_dir=out, progress=False)
    saved = json.loads((out / "audit.json").read_text())
    for key in ("duplicate_groups", "cross_split_groups", "metadata_baseline_accuracy", "unreadable"):
        assert key in saved
    assert {"audit.json", "audit.md", "sizes.png", "intensity.png"} <= {p.name for p in out.iterdir()}
    assert saved["layout"] == "class-folders"
    assert saved["counts"] == {"all": {"cex": 13, "pg": 17}}
    assert saved["unreadable"] == ["pg/PG (31).png"]
    assert saved["non_image_files"] == ["cex/notes.txt"]
    assert len(saved["duplicate_groups"]) == 5 and saved["cross_split_groups"] == []
    assert ["pg/PG (1).png", "pg/PG (2).png", "pg/PG (3).png"] in saved["duplicate_groups"]
    assert saved["class_stats"]["cex"]["most_common_sizes"][0] == {"size": "40x40", "fraction": 1.0}
    # every cex is 40x40 and no pg is: metadata alone separates the classes
    assert saved["metadata_baseline_accuracy"] >= 0.9 and saved["shortcut_warning"] is True
    assert "SHORTCUT WARNING" in (out / "audit.md").read_text()
    assert result.run_time_s > 0 and saved == json.loads(json.dumps(result.to_json()))


def test_no_shortcut_warning_when_sizes_and_brightness_match(tmp_path):
    rng = np.random.default_rng(3)
    for class_name in ("a", "b"):
        for i in range(20):
            save(texture(rng, 32, 32), tmp_path / "data" / class_name / f"{i}.png")
    result = audit_dataset(tmp_path / "data", out_dir=tmp_path / "out", progress=False)
    baseline = result.metadata_baseline
    assert baseline.chance_accuracy == 0.5
    assert baseline.accuracy < baseline.warning_threshold and not result.shortcut_warning
    assert "no strong shortcut" in baseline.message


def test_cross_split_groups_are_leakage(dataset, tmp_path):
    split = tmp_path / "split"
    crystal = dataset["groups"][0]
    save(np.array(Image.open(crystal[0])), split / "train" / "pg" / "x.png")
    save(np.array(Image.open(crystal[1])), split / "test" / "pg" / "y.png")
    save(np.array(Image.open(crystal[2])), split / "train" / "pg" / "z.png")
    for name in ("train", "val", "test"):
        for k, path in enumerate(dataset["cex"][:3]):
            save(np.rot90(np.array(Image.open(path)), ["train", "val", "test"].index(name) + k),
                 split / name / "cex" / f"{name}{k}.png")
    result = audit_dataset(split, out_dir=tmp_path / "out", progress=False)
    assert result.layout == "split"
    assert result.counts["train"] == {"cex": 3, "pg": 2}
    cross = sorted(sorted(g) for g in result.cross_split_groups)
    # the pg crystal and each cex crop (rotated copies placed in all three splits) leak
    assert ["test/pg/y.png", "train/pg/x.png", "train/pg/z.png"] in cross and len(cross) == 4
    assert "LEAKAGE WARNING: 4 duplicate groups span more than one split; 4 test files" in (tmp_path / "out" / "audit.md").read_text()


def test_a_duplicate_under_two_labels_is_flagged(dataset, tmp_path):
    (dataset["root"] / "pg" / "PG (40).png").write_bytes(dataset["cex"][3].read_bytes())
    result = audit_dataset(dataset["root"], out_dir=tmp_path / "out", progress=False)
    assert result.mixed_class_groups == [["cex/CEX (4).png", "pg/PG (40).png"]]
    assert "LABEL WARNING: 1 duplicate groups" in (tmp_path / "out" / "audit.md").read_text()


def test_out_dir_safety(dataset, tmp_path):
    with pytest.raises(CrystalscopeError, match="inside the class folders"):
        audit_dataset(dataset["root"], out_dir=dataset["root"] / "report", progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(CrystalscopeError, match="did not write"):
        audit_dataset(dataset["root"], out_dir=busy, progress=False)
    out = tmp_path / "again"
    audit_dataset(dataset["root"], out_dir=out, progress=False)
    audit_dataset(dataset["root"], out_dir=out, progress=False)  # an earlier audit is replaced
    assert (out / "audit.json").exists() and len(list(tmp_path.glob(".again*"))) == 0


def test_default_out_dir_is_beside_not_inside_the_data(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = audit_dataset(dataset["root"], progress=False)
    assert Path(result.out_dir) == tmp_path / "audit-data"
    assert (tmp_path / "audit-data" / "audit.json").exists()


def test_audit_errors_are_one_line(tmp_path):
    with pytest.raises(CrystalscopeError, match="does not exist"):
        audit_dataset(tmp_path / "missing", progress=False)
    (tmp_path / "empty" / "cex").mkdir(parents=True)
    with pytest.raises(CrystalscopeError, match="no images found"):
        audit_dataset(tmp_path / "empty", progress=False)


def test_cli_audit_smoke(dataset, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-report"
    result = runner.invoke(app, ["audit", str(dataset["root"]), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "SHORTCUT WARNING" in result.output and "duplicate groups" in result.output
    assert (out / "audit.json").exists()
    missing = runner.invoke(app, ["audit", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "does not exist" in missing.output and "Traceback" not in missing.output
