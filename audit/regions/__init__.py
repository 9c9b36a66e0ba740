"""Suspicious-region detectors: burned-in text, laterality markers and padding bands.

Importing this package registers the built-in detectors in :data:`DETECTORS`.
"""

from audit.regions import border, dbnet, text  # noqa: F401  (imported for their registration side effect)
from audit.regions.base import DETECTORS, Detection, Detector, box_iou, detect_regions, match_boxes

__all__ = ["DETECTORS", "Detection", "Detector", "box_iou", "detect_regions", "match_boxes"]
