"""Looking at what a model sees: why it decides, features, embedding maps and drift reports.

- :mod:`~crystalscope.insight.explain`: Grad-CAM overlays and ``crystalscope explain``;
- :mod:`~crystalscope.insight.features`: files -> feature matrix (a trained model's penultimate
  features through the :class:`~crystalscope.inference.predictor.Predictor`, or ImageNet
  features of the offline-pretrained ``efficientnet_lite0``);
- :mod:`~crystalscope.insight.embedding`: 2-D projection, k-means clusters and ``crystalscope embed``;
- :mod:`~crystalscope.insight.drift`: kNN distance to a reference set, flags at a stated
  false-flag rate, MMD two-sample test and ``crystalscope drift``;
- :mod:`~crystalscope.insight.plots`: the one map-with-thumbnails figure both commands draw.
"""
