"""ptbundle.runtime: load a bundle and predict. Imports nothing from the builder."""

from .bundle import Bundle, Prediction
from .errors import BundleError, PtbundleError
from .format import Manifest

__all__ = ["Bundle", "BundleError", "Manifest", "Prediction", "PtbundleError"]
