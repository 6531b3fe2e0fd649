"""The whole decision as one torch module: probabilities, features, OOD score and accepted.

:class:`DecisionModel` takes the model's input tensor (resized, normalised, ``(N, 3, H, W)``)
and returns ``(logits, features, probabilities, ood_score, accepted)``. The checkpoint path runs
it in PyTorch and the export traces it into the ONNX graph, so the rejection has one definition
and an ONNX client needs nothing but the graph and ``preprocessing_spec``.

:class:`ImageStatistics` is the torch form of the 42 low-level statistics documented in
:mod:`crystalscope.evaluation.ood` (whose numpy :func:`~crystalscope.evaluation.ood.image_statistics`
is kept as the test reference). It un-normalises the input and rounds to 1/255, so it sees the
same 8-bit levels the numpy version reads from the resized image. Every operation exports to
ONNX at opset >= 11: quantiles by a sort and fixed indices, histograms by comparisons, and the
power spectrum as fixed matmuls with precomputed DFT bases (no FFT operator needed).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

N_STATISTICS = 42
NEIGHBOUR_STEP = 0.02  # on 0-1: how much brighter a neighbour must be to count
SPECTRUM_BANDS = 8
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def _quantiles(values: torch.Tensor, qs) -> torch.Tensor:
    """numpy's default (linear) quantiles of each row of ``values (N, P)`` -> ``(N, len(qs))``.

    ``P`` is fixed by the image size, so the interpolation indices are constants in the graph.
    """
    ordered = torch.sort(values, dim=1).values
    count = values.shape[1]
    columns = []
    for q in qs:
        position = (count - 1) * q
        low = int(math.floor(position))
        high = min(low + 1, count - 1)
        fraction = position - low
        columns.append(ordered[:, low] * (1 - fraction) + ordered[:, high] * fraction)
    return torch.stack(columns, dim=1)


def _blocks(grey: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, H/size, size, W/size, size)`` of ``(N, H, W)``, edges beyond a whole block dropped."""
    h, w = (grey.shape[1] // size) * size, (grey.shape[2] // size) * size
    return grey[:, :h, :w].reshape(-1, h // size, size, w // size, size)


def _gradient(grey: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between vertical plus horizontal neighbours, per image."""
    return ((grey[:, 1:, :] - grey[:, :-1, :]).abs().mean(dim=(1, 2))
            + (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(dim=(1, 2)))


def spectrum_bases(h: int, w: int) -> dict[str, np.ndarray]:
    """The constants of the spectrum: real DFT bases, ring weights and the line-fit weights.

    ``rfft2`` of an ``(H, W)`` image is ``(Ch - i Sh) g (Cw - i Sw)`` over the ``W // 2 + 1``
    non-negative horizontal frequencies; each band's power is the mean over its ring of cells.

    Example:
        >>> spectrum_bases(16, 16)["rings"].shape
        (144, 8)
    """
    y, u = np.arange(h)[None, :], np.arange(h)[:, None]
    x, v = np.arange(w)[:, None], np.arange(w // 2 + 1)[None, :]
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]).ravel()
    edges = np.geomspace(2.0 / min(h, w), 0.5, SPECTRUM_BANDS + 1)
    rings = np.zeros((radius.size, SPECTRUM_BANDS))
    for band, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        members = (radius >= lo) & (radius < hi)
        rings[members, band] = 1.0 / max(int(members.sum()), 1)
    log_frequency = np.log(np.sqrt(edges[:-1] * edges[1:]))
    centred = log_frequency - log_frequency.mean()
    return {"ch": np.cos(2 * np.pi * u * y / h), "sh": np.sin(2 * np.pi * u * y / h),
            "cw": np.cos(2 * np.pi * x * v / w), "sw": np.sin(2 * np.pi * x * v / w), "rings": rings,
            "log_frequency": log_frequency, "slope_weights": centred / (centred ** 2).sum()}


class ImageStatistics(nn.Module):
    """The 42 image statistics of a normalised batch ``(N, 3, H, W)`` -> ``(N, 42)`` float32.

    Columns and meaning: :data:`crystalscope.evaluation.ood.IMAGE_STATISTICS`.

    Example:
        >>> stats = ImageStatistics(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        >>> tuple(stats(torch.zeros(2, 3, 16, 16)).shape)
        (2, 42)
    """

    def __init__(self, image_size: int, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        for name, value in spectrum_bases(image_size, image_size).items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # back to the 8-bit levels of the resized image: a grey crop's channels are then equal
        # and its saturation exactly 0, as the statistics were fitted
        rgb = torch.round((x * self.std + self.mean) * 255.0).clamp(0, 255) / 255.0
        grey = ((rgb[:, 0] + rgb[:, 1]) + rgb[:, 2]) / 3.0
        flat = grey.reshape(grey.shape[0], -1)
        saturation = (rgb.amax(dim=1) - rgb.amin(dim=1)).reshape(flat.shape).mean(dim=1)
        quad = _blocks(grey, 4)
        small = quad.mean(dim=(2, 4))
        high = (quad - small[:, :, None, :, None]).abs().mean(dim=(1, 2, 3, 4))
        bins = torch.floor(torch.clamp(flat * 8.0, max=8.0))
        histogram = [(bins == k).float().mean(dim=1) for k in range(7)] + [(bins >= 7).float().mean(dim=1)]
        blocks = _blocks(grey, 8)
        block_mean = blocks.mean(dim=(2, 4))
        block_std = ((blocks - block_mean[:, :, None, :, None]) ** 2).mean(dim=(2, 4)).sqrt()
        spread = ((flat - flat.mean(dim=1, keepdim=True)) ** 2).mean(dim=1).sqrt()
        logged = torch.log(torch.stack([spread, saturation, (flat < 0.02).float().mean(dim=1),
                                        (flat > 0.98).float().mean(dim=1), _gradient(grey), _gradient(small),
                                        high, *histogram], dim=1) + 1e-3)
        local_std = torch.log(_quantiles(block_std.reshape(flat.shape[0], -1), (0.1, 0.5, 0.9)) + 1e-3)
        return torch.cat([flat.mean(dim=1, keepdim=True), logged[:, :1], _quantiles(flat, QUANTILES),
                          logged[:, 1:], local_std, _quantiles(block_mean.reshape(flat.shape[0], -1), (0.1, 0.9)),
                          self.texture(grey)], dim=1)

    def texture(self, grey: torch.Tensor) -> torch.Tensor:
        """Neighbour-count histogram (9 log fractions) and the spectrum's slope and 6 residuals."""
        h, w = grey.shape[1], grey.shape[2]
        centre = grey[:, 1:-1, 1:-1]
        threshold = centre + NEIGHBOUR_STEP
        brighter = torch.zeros_like(centre)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    brighter = brighter + (grey[:, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] > threshold).float()
        counts = torch.stack([(brighter == k).float().mean(dim=(1, 2)) for k in range(9)], dim=1)
        centred = grey - grey.mean(dim=(1, 2), keepdim=True)
        rows_c, rows_s = torch.matmul(self.ch, centred), torch.matmul(self.sh, centred)
        real = torch.matmul(rows_c, self.cw) - torch.matmul(rows_s, self.sw)
        imaginary = torch.matmul(rows_s, self.cw) + torch.matmul(rows_c, self.sw)
        power = (real ** 2 + imaginary ** 2).reshape(grey.shape[0], -1)
        bands = torch.log(torch.matmul(power, self.rings) + 1e-12)
        slope = torch.matmul(bands, self.slope_weights)
        intercept = bands.mean(dim=1) - slope * self.log_frequency.mean()
        residuals = bands - (slope[:, None] * self.log_frequency[None, :] + intercept[:, None])
        return torch.cat([torch.log(counts + 1e-3), slope[:, None], residuals[:, 1:-1]], dim=1)


def nearest_mahalanobis(values: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of each row to the nearest class mean, in float64.

    Example:
        >>> nearest_mahalanobis(torch.tensor([[3.0, 0.0]]), torch.zeros(1, 2, dtype=torch.float64),
        ...                     torch.eye(2, dtype=torch.float64)).tolist()
        [9.0]
    """
    values = values.double()
    distances = []
    for c in range(means.shape[0]):
        delta = values - means[c]
        distances.append((torch.matmul(delta, precision) * delta).sum(dim=1))
    return torch.stack(distances, dim=1).amin(dim=1)


class OODScore(nn.Module):
    """The fitted rejection score of :class:`crystalscope.evaluation.ood.OODDetector`, in torch.

    ``params`` are the detector's float64 arrays; ``image_size``, ``mean`` and ``std`` the
    model's preprocessing (for :class:`ImageStatistics`).
    """

    def __init__(self, method: str, params: dict, image_size: int, mean, std):
        super().__init__()
        self.method = method
        self.uses_features = "mahalanobis" in method
        self.uses_images = "image_statistics" in method
        for name, value in params.items():
            self.register_buffer(name, torch.tensor(np.asarray(value, dtype=np.float64)))
        self.statistics = ImageStatistics(image_size, mean, std) if self.uses_images else None

    def forward(self, x: torch.Tensor, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.method == "energy":
            return -torch.logsumexp(logits.double(), dim=1)
        if self.method == "max_logit":
            return -logits.double().amax(dim=1)
        parts = []
        if self.uses_features:
            parts.append(nearest_mahalanobis(features, self.means, self.precision))
        if self.uses_images:
            columns = self.pixel_means.shape[1]  # a model fitted on the first 26 columns only
            parts.append(nearest_mahalanobis(self.statistics(x)[:, :columns], self.pixel_means,
                                             self.pixel_precision))
        if len(parts) == 1:
            return parts[0]
        return torch.maximum(parts[0] / self.scales[0], parts[1] / self.scales[1])


class DecisionModel(nn.Module):
    """Classifier + calibration + rejection: input tensor -> the whole decision.

    Returns ``(logits, features, probabilities, ood_score, accepted)``; without a fitted
    rejection (``score=None``) only the first three. ``accepted`` is ``ood_score <= threshold``.
    """

    def __init__(self, classifier: nn.Module, temperature: float, score: OODScore | None = None,
                 threshold: float | None = None):
        super().__init__()
        self.classifier = classifier
        self.temperature = float(temperature)
        self.score = score
        self.threshold = None if threshold is None else float(threshold)

    def forward(self, x: torch.Tensor):
        features = self.classifier.embed(x)
        logits = self.classifier.head[-1](features)
        probabilities = torch.softmax(logits / self.temperature, dim=1)
        if self.score is None:
            return logits, features, probabilities
        ood_score = self.score(x, logits, features)
        return logits, features, probabilities, ood_score, ood_score <= self.threshold


def decision_model(classifier: nn.Module, preprocessing, temperature: float, detector=None) -> DecisionModel:
    """The :class:`DecisionModel` of a classifier, its preprocessing and a fitted detector.

    ``detector``: an :class:`crystalscope.evaluation.ood.OODDetector` (its ``method``,
    ``params`` and ``threshold``), or None for a model without rejection.

    Example:
        >>> decision_model(model, preprocessing, 1.0, detector)(x)[3].shape  # doctest: +SKIP
        torch.Size([8])
    """
    if detector is None:
        return DecisionModel(classifier, temperature)
    score = OODScore(detector.method, detector.params, preprocessing.image_size, preprocessing.mean,
                     preprocessing.std)
    return DecisionModel(classifier, temperature, score, detector.threshold)
