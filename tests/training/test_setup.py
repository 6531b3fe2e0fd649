"""training/setup.py: the parts a run builds once (data index, learner, state, decoded data, cached features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_training import COUNTS, tiny_config, tiny_parts, tiny_split

from crystalscope.data.augment import AugmentSpec
from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.ood import IMAGE_STATISTICS, image_statistics
from crystalscope.models.factory import default_preprocessing
from crystalscope.training import features, setup
from crystalscope.training.distributed import World
from crystalscope.training.epoch import checkpoint
from crystalscope.training.record import weights_hash


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return tiny_split(tmp_path_factory.mktemp("setup") / "split")


def test_index_data_lists_the_classes_positive_class_and_the_backbones_preprocessing(split):
    data = setup.index_data(tiny_config(split, resize="pad"), None)
    assert data.class_names == ["cex", "pg"] and data.positive_class == "pg"
    assert data.preprocessing == default_preprocessing("resnet18", 32, "pad")
    assert {name: len(folder) for name, folder in data.splits.items()} == {s: sum(n) for s, n in COUNTS.items()}
    assert data.inputs == {}  # nothing decoded yet


def test_index_data_refuses_a_resume_onto_other_classes(split):
    cfg = tiny_config(split)
    cfg.resume = "runs/old"
    with pytest.raises(CrystalscopeError, match=r"--resume runs/old: the data's classes \(cex, pg\) differ "
                                                r"from the run's \(cat, dog\)"):
        setup.index_data(cfg, {"class_names": ["cat", "dog"]})


def test_build_learner_optimises_only_the_trainable_part(split):
    _, _, learner, state = tiny_parts(split, trainable_fraction=0.1)
    optimised = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in learner.model.parameters() if p.requires_grad}
    assert optimised == trainable and 0 < len(trainable) < len(list(learner.model.parameters()))
    assert learner.trained is learner.model and learner.forward is learner.model and learner.prefix is None
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.05) and learner.step is None
    assert not learner.bf16  # precision auto on the CPU: fp32
    assert state.epoch == 0 and state.weights_source == "random initialisation"  # --weights none
    assert state.initial_weights == weights_hash(learner.model)  # nothing trained yet


def test_build_learner_is_seeded(split):
    first = tiny_parts(split, seed=3)[2].model.state_dict()
    second = tiny_parts(split, seed=3)[2].model.state_dict()
    other = tiny_parts(split, seed=4)[2].model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_cache_frozen_splits_the_model_into_a_prefix_and_the_trained_tail(split):
    _, _, learner, _ = tiny_parts(split, trainable_fraction=0.1, cache_frozen=True)
    assert learner.prefix is not None and learner.trained is not learner.model
    assert all(not p.requires_grad for p in learner.prefix.parameters())
    # the optimiser holds the tail's and the head's trainable parameters, nothing of the prefix
    prefix_ids = {id(p) for p in learner.prefix.parameters()}
    optimised = [p for group in learner.optimizer.param_groups for p in group["params"]]
    assert optimised and not prefix_ids & {id(p) for p in optimised}
    assert {id(p) for p in learner.model.head.parameters()} <= {id(p) for p in optimised}


def test_resuming_restores_weights_optimiser_epoch_and_random_streams(split):
    cfg, data, learner, state = tiny_parts(split)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    learner.model.train()
    learner.optimizer.zero_grad()
    torch.nn.functional.cross_entropy(learner.model(x), y).backward()
    learner.optimizer.step()  # creates momentum buffers that a resume must bring back
    state.epoch = 1
    state.shuffle_rng.manual_seed(123)
    last = checkpoint(cfg, learner, state, data, {"train": "sha256:x"})
    _, _, resumed, resumed_state = tiny_parts(split, last=last, resume="runs/x")
    saved, loaded = learner.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    buffers = [resumed.optimizer.state[p]["momentum_buffer"] for p in resumed.optimizer.state]
    originals = [learner.optimizer.state[p]["momentum_buffer"] for p in learner.optimizer.state]
    assert buffers and len(buffers) == len(originals)
    assert all(torch.equal(b, o) for b, o in zip(buffers, originals))
    assert resumed_state.epoch == 1 and resumed_state.initial_weights == state.initial_weights
    assert torch.equal(resumed_state.shuffle_rng.get_state(), state.shuffle_rng.get_state())
    # the global generators (dropout) continue from the saved states once the epochs start
    assert torch.equal(resumed_state.resume_rng["torch"], last["training"]["rng"]["torch"])


def test_load_data_decodes_every_split_to_uint8_and_keeps_the_labels(split):
    _, data, _, _ = tiny_parts(split, reject_fpr=0.1)
    for name, folder in data.splits.items():
        assert data.inputs[name].dtype == torch.uint8 and tuple(data.inputs[name].shape) == (len(folder), 32, 32, 3)
        assert data.labels[name].tolist() == folder.labels.tolist()
    # image statistics for the rejection fit, taken before any feature caching
    assert data.image_stats["val"].shape == (6, len(IMAGE_STATISTICS))


def test_load_data_skips_the_image_statistics_without_rejection(split):
    _, data, _, _ = tiny_parts(split, reject_fpr=0.0)
    assert data.image_stats == {} and set(data.shard_index) == {"train", "val", "test"}


def test_split_image_statistics_in_chunks_equals_one_pass():
    images = torch.randint(0, 256, (7, 16, 16, 3), dtype=torch.uint8)
    whole = image_statistics(images.numpy())  # the numpy reference the graph's module follows
    pre = Preprocessing(image_size=16)
    assert np.allclose(setup.split_image_statistics(images, pre, chunk=3), whole, atol=1e-4)
    assert setup.split_image_statistics(images[:0], pre).shape == (0, len(IMAGE_STATISTICS))


def test_augment_spec_follows_the_augmentation_section(split):
    spec = setup.augment_spec(tiny_config(split, rotation=5.0, hflip=False, zoom=0.0))
    assert spec == AugmentSpec(rotation=5.0, shift=0.2, zoom=0.0, hflip=False, vflip=True)


def test_transforms_normalise_for_evaluation_and_pass_features_through(split):
    cfg, data, _, state = tiny_parts(split)
    train_tf, eval_tf = setup.transforms(cfg, data, state)
    batch = data.inputs["val"][:2]
    assert torch.equal(eval_tf(batch), data.preprocessing.normalize_torch(batch))
    augmented = train_tf(batch)
    assert augmented.shape == (2, 3, 32, 32) and augmented.dtype == torch.float32
    cached = tiny_config(split, trainable_fraction=0.0, cache_features=True)
    identity_train, identity_eval = setup.transforms(cached, data, state)
    features_batch = torch.randn(2, 512)
    assert identity_train(features_batch) is features_batch and identity_eval(features_batch) is features_batch


def test_cache_features_replaces_the_images_by_backbone_features(split):
    cfg, data, learner, state = tiny_parts(split, trainable_fraction=0.0, cache_features=True, feature_passes=2)
    cached = setup.cache_features(cfg, learner, state, data, progress=False)
    assert tuple(cached.inputs["train"].shape) == (24, learner.model.backbone.num_features)  # 12 images x 2 passes
    assert cached.labels["train"].tolist() == data.labels["train"].tolist() * 2
    assert tuple(cached.inputs["val"].shape) == (6, learner.model.backbone.num_features)
    assert data.inputs["train"].dtype == torch.uint8  # the input RunData is left as it was


def test_check_cache_memory_names_the_option_in_use(split, monkeypatch):
    monkeypatch.setattr(features, "available_memory", lambda device: 1000)
    for option, flags in (("--cache-features", {"cache_features": True, "trainable_fraction": 0.0}),
                          ("--cache-frozen", {"cache_frozen": True})):
        cfg = tiny_config(split, **flags)
        data = setup.index_data(cfg, None)
        learner, _ = setup.build_learner(cfg, data, torch.device("cpu"), World(), None)
        with pytest.raises(CrystalscopeError, match=f"^{option}: the cached features"):
            setup.check_cache_memory(cfg, learner, data)
