"""ptbundle.runtime: load a bundle and predict. Imports nothing from the builder."""

from .bundle import Bundle, BundleError, Prediction

__all__ = ["Bundle", "BundleError", "Prediction"]
