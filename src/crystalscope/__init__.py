"""crystalscope: trustworthy image classifiers for crystallization microscopy.

``from crystalscope import Predictor`` is resolved lazily, so importing the package stays
cheap and never pulls in torch or onnxruntime by itself.
"""

from crystalscope.version import __version__

__all__ = ["Predictor", "Prediction", "__version__"]


def __getattr__(name: str):
    if name in ("Predictor", "Prediction"):
        from crystalscope.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'crystalscope' has no attribute {name!r}")
