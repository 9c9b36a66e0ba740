"""Saliency methods: one registry, each method a class; the CAM family shares hooks and one forward/backward."""

from audit.saliency import cam as _cam  # noqa: F401  (registers the CAM family)
from audit.saliency.base import METHODS, SaliencyMethod, SaliencyResult, create_method

__all__ = ["METHODS", "SaliencyMethod", "SaliencyResult", "create_method"]
