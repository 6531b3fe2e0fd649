"""inference/provenance.py: the sidecar of a predictions CSV, resume and shard checks."""

from __future__ import annotations

import hashlib
import json

import pytest

from crystalscope.errors import CrystalscopeError
from crystalscope.formats import PREDICTIONS_FORMAT, predictions_sidecar
from crystalscope.inference.provenance import (check_resume, check_shards, differences, file_sha256, provenance,
                                               read_provenance, write_provenance)


@pytest.fixture
def record(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"0123456789" * 100_000)
    (tmp_path / "crops").mkdir()
    return provenance(model, ["cex", "pg"], [tmp_path / "crops"], recursive=True, reject=True, shard=(1, 4))


def test_provenance_holds_what_decides_the_rows(record, tmp_path):
    assert record["format"] == PREDICTIONS_FORMAT
    assert record["model_sha256"] == hashlib.sha256(b"0123456789" * 100_000).hexdigest()
    assert record["inputs"] == [str((tmp_path / "crops").resolve())] and record["shard"] == "1/4"
    assert file_sha256(tmp_path / "m.onnx") == record["model_sha256"]


def test_written_and_read_back_beside_the_csv(record, tmp_path):
    csv_path = tmp_path / "p.csv"
    assert write_provenance(csv_path, record) == predictions_sidecar(csv_path) == tmp_path / "p.csv.json"
    assert read_provenance(csv_path, "--resume") == json.loads((tmp_path / "p.csv.json").read_text())


def test_resume_names_every_difference(record, tmp_path):
    csv_path = tmp_path / "p.csv"
    write_provenance(csv_path, record)
    check_resume(csv_path, dict(record))  # the same run: no error
    with pytest.raises(CrystalscopeError, match=r"--reject/--no-reject \(was True, now False\); --shard"):
        check_resume(csv_path, {**record, "reject": False, "shard": None})
    assert differences(record, {**record, "class_names": ["a", "b"]}) == ["the model's classes (was cex,pg, now a,b)"]


def test_read_refuses_a_missing_or_foreign_sidecar(tmp_path):
    with pytest.raises(CrystalscopeError, match="has no p.csv.json"):
        read_provenance(tmp_path / "p.csv", "merge")
    (tmp_path / "p.csv.json").write_text("[1, 2]")
    with pytest.raises(CrystalscopeError, match="not a crystalscope predictions record"):
        read_provenance(tmp_path / "p.csv", "merge")


def test_shards_must_be_one_campaign_each_once(record, tmp_path):
    parts = [tmp_path / f"{i}.csv" for i in range(3)]
    records = [{**record, "shard": f"{i}/4"} for i in (0, 1, 3)]
    with pytest.raises(CrystalscopeError, match="shard 2/4 missing"):
        check_shards(parts, records, allow_partial=False)
    assert check_shards(parts, records, allow_partial=True) == {"count": 4, "given": [0, 1, 3], "missing": [2]}
    with pytest.raises(CrystalscopeError, match="both shard 1/4"):
        check_shards(parts, [{**record, "shard": s} for s in ("0/4", "1/4", "1/4")], allow_partial=True)
    with pytest.raises(CrystalscopeError, match="predicted differently: the model"):
        check_shards(parts[:2], [records[0], {**records[1], "model_sha256": "x"}], allow_partial=True)
