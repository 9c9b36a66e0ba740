"""Saliency methods: one registry; a file per family, so the file list is the feature list.

* :mod:`audit.saliency.cam`: the CAM family (one forward and one backward pass for all variants).
* :mod:`audit.saliency.gradient`: input-gradient methods and the SmoothGrad wrapper.
* :mod:`audit.saliency.perturbation`: Score-CAM, RISE, occlusion, I-GOS / I-GOS++.
* :mod:`audit.saliency.sanity`: the model-randomisation check of Adebayo et al. 2018.
"""

from audit.saliency import cam as _cam  # noqa: F401  (registers the CAM family)
from audit.saliency import gradient as _gradient  # noqa: F401  (registers the input-gradient family)
from audit.saliency import perturbation as _perturbation  # noqa: F401  (registers the perturbation family)
from audit.saliency.base import METHODS, SaliencyMethod, SaliencyOptions, SaliencyResult, create_method
from audit.saliency.engine import build_methods, explain, method_names, validate_methods

__all__ = [
    "METHODS",
    "SaliencyMethod",
    "SaliencyOptions",
    "SaliencyResult",
    "build_methods",
    "create_method",
    "explain",
    "method_names",
    "validate_methods",
]
