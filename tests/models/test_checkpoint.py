"""models/checkpoint.py: self-describing checkpoints, saved atomically, loaded without unpickling."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError
from crystalscope.formats import CHECKPOINT_FORMAT
from crystalscope.models import checkpoint
from crystalscope.models.factory import HeadSpec, build_model

HEAD = HeadSpec(hidden=[16], dropout=[0.1])
PRE = Preprocessing(image_size=32, resize="pad")


def _checkpoint(seed: int = 0, **extra) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    model = build_model("efficientnet_lite0", 2, HEAD).eval()
    ckpt = checkpoint.make_checkpoint(model, backbone="efficientnet_lite0", head=HEAD, class_names=["cex", "pg"],
                                      positive_class="pg", preprocessing=PRE, **extra)
    return model, ckpt


def test_make_checkpoint_describes_the_model_with_plain_values():
    model, ckpt = _checkpoint(temperature=1.5, training={"epoch": 3})
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["backbone"] == "efficientnet_lite0"
    assert ckpt["head"] == HEAD.to_dict() and ckpt["class_names"] == ["cex", "pg"]
    assert ckpt["positive_class"] == "pg" and ckpt["temperature"] == 1.5 and ckpt["training"] == {"epoch": 3}
    assert ckpt["preprocessing"] == PRE.to_dict()
    weights = ckpt["model_state"]
    assert set(weights) == set(model.state_dict()) and all(t.device.type == "cpu" for t in weights.values())
    with torch.no_grad():
        model.head[-1].weight.add_(1.0)  # later training must not change a checkpoint already made
    assert not torch.equal(weights[f"head.{len(model.head) - 1}.weight"], model.head[-1].weight)
    assert _checkpoint()[1]["training"] == {} and _checkpoint()[1]["temperature"] == 1.0


def test_save_load_rebuild_round_trip_gives_the_same_outputs(tmp_path):
    model, ckpt = _checkpoint(seed=1)
    path = checkpoint.save_checkpoint(ckpt, tmp_path / "weights" / "best.ckpt")
    assert path == tmp_path / "weights" / "best.ckpt" and sorted(p.name for p in path.parent.iterdir()) == ["best.ckpt"]
    torch.load(path, weights_only=True)  # plain types only
    loaded = checkpoint.load_checkpoint(path)
    rebuilt = checkpoint.model_from_checkpoint(loaded)
    assert not rebuilt.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert checkpoint.preprocessing_from_checkpoint(loaded) == PRE


def test_one_save_to_several_paths_serialises_once(tmp_path, monkeypatch):
    saves = []
    real = torch.save
    monkeypatch.setattr(checkpoint.torch, "save", lambda *a, **k: saves.append(1) or real(*a, **k))
    first = checkpoint.save_checkpoint(_checkpoint(seed=0)[1], tmp_path / "best.ckpt", tmp_path / "last.ckpt")
    assert first == tmp_path / "best.ckpt" and len(saves) == 1
    assert first.read_bytes() == (tmp_path / "last.ckpt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_failed_save_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    path = checkpoint.save_checkpoint(_checkpoint(seed=0)[1], tmp_path / "last.ckpt")
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_bytes", disk_full)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(_checkpoint(seed=1)[1], path)
    assert path.read_bytes() == before


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CrystalscopeError, match=r"nope\.ckpt: checkpoint not found"):
        checkpoint.load_checkpoint(tmp_path / "nope.ckpt")


def test_a_file_that_is_not_a_torch_file_is_refused(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(CrystalscopeError, match=r"notes\.ckpt: not a readable crystalscope checkpoint \("):
        checkpoint.load_checkpoint(path)


def test_another_tools_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CrystalscopeError, match=r"other\.ckpt: not a crystalscope checkpoint \(expected format "
                                                r"crystalscope-checkpoint/1\)"):
        checkpoint.load_checkpoint(path)


def test_a_pickled_object_is_not_unpickled(tmp_path):
    path = tmp_path / "pickle.ckpt"
    # any class outside torch's weights_only allow-list: unpickling it could run code
    torch.save({"format": CHECKPOINT_FORMAT, "payload": Fraction(1, 3)}, path)
    with pytest.raises(CrystalscopeError, match="not a readable crystalscope checkpoint"):
        checkpoint.load_checkpoint(path)


@pytest.mark.parametrize("key,value", [("temperature", float("nan")), ("temperature", 0.0), ("temperature", -1.0),
                                       ("class_names", ["cex", "cex"]), ("positive_class", "salt")])
def test_a_checkpoint_with_a_bad_value_is_refused_on_load(tmp_path, key, value):
    _, ckpt = _checkpoint()
    ckpt[key] = value
    path = checkpoint.save_checkpoint(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(CrystalscopeError, match=key) as err:
        checkpoint.load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_a_checkpoint_with_std_zero_is_refused_on_load(tmp_path):
    _, ckpt = _checkpoint()
    ckpt["preprocessing"]["std"] = [0.2, 0.0, 0.2]
    path = checkpoint.save_checkpoint(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(CrystalscopeError, match="preprocessing.std"):
        checkpoint.load_checkpoint(path)
