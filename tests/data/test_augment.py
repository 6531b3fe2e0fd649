"""Batched on-device augmentation: shapes, dtypes, determinism, and the geometry it applies."""

import numpy as np
import torch

from crystalscope.data.augment import AugmentSpec, augment_batch, random_affine
from crystalscope.data.transforms import Preprocessing

PRE = Preprocessing(image_size=32)


def _batch(n=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_shapes_dtypes_and_value_range():
    x = _batch()
    out = augment_batch(x, PRE, AugmentSpec())
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    lo = (0 - max(PRE.mean)) / min(PRE.std)
    hi = (1 - min(PRE.mean)) / min(PRE.std)
    assert out.min() >= lo - 1e-4 and out.max() <= hi + 1e-4  # border padding adds no new values
    assert x.dtype == torch.uint8  # input untouched


def test_deterministic_under_a_seed_and_different_across_seeds():
    x = _batch()
    a = augment_batch(x, PRE, AugmentSpec(), generator=torch.Generator().manual_seed(7))
    b = augment_batch(x, PRE, AugmentSpec(), generator=torch.Generator().manual_seed(7))
    c = augment_batch(x, PRE, AugmentSpec(), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_zero_ranges_give_the_plain_normalisation():
    x = _batch()
    out = augment_batch(x, PRE, AugmentSpec(rotation=0, shift=0, zoom=0, hflip=False, vflip=False))
    expected = torch.from_numpy(PRE.normalize(x.numpy()))
    assert torch.allclose(out, expected, atol=1e-5)


def test_flips_only_are_exact_mirrors_per_sample():
    x = _batch(n=16)
    spec = AugmentSpec(rotation=0, shift=0, zoom=0, hflip=True, vflip=True)
    out = augment_batch(x, PRE, spec, generator=torch.Generator().manual_seed(3))
    plain = torch.from_numpy(PRE.normalize(x.numpy()))
    seen = set()
    for i in range(16):
        for flip_dims in ((), (3,), (2,), (2, 3)):
            candidate = plain[i].flip(dims=[d - 1 for d in flip_dims]) if flip_dims else plain[i]
            if torch.allclose(out[i], candidate, atol=1e-4):
                seen.add(flip_dims)
                break
        else:
            raise AssertionError(f"sample {i} is not a mirror of its input")
    assert len(seen) >= 3  # each sample draws its own flips


def test_affine_matrices_respect_the_ranges():
    spec = AugmentSpec(rotation=30, shift=0.2, zoom=0.3, hflip=False, vflip=False)
    theta = random_affine(4000, spec, device="cpu", generator=torch.Generator().manual_seed(0))
    linear = theta[:, :, :2]
    scale = torch.sqrt(torch.det(linear))
    angle = torch.rad2deg(torch.atan2(linear[:, 1, 0], linear[:, 0, 0]))
    assert 0.7 - 1e-4 <= scale.min() and scale.max() <= 1.3 + 1e-4
    assert angle.abs().max() <= 30 + 1e-3 and angle.abs().max() > 25
    assert theta[:, :, 2].abs().max() <= 0.4 + 1e-6 and theta[:, :, 2].abs().max() > 0.35


def test_normalize_torch_matches_numpy_and_reuses_its_constants():
    from crystalscope.data.transforms import _torch_constants

    x = _batch(n=3)
    expected = torch.from_numpy(PRE.normalize(x.numpy()))
    assert torch.allclose(PRE.normalize_torch(x), expected, atol=1e-6)
    nchw = x.permute(0, 3, 1, 2).float()
    assert torch.equal(PRE.normalize_torch(nchw), PRE.normalize_torch(x))
    # the mean/std tensors are built once per device, not every step (a sync on CUDA)
    hits = _torch_constants.cache_info().hits
    PRE.normalize_torch(x)
    assert _torch_constants.cache_info().hits == hits + 1
