"""Explaining a batch with several methods at once, sharing what can be shared.

All CAM variants requested together run from one forward and one backward pass (:func:`cam_maps`); every other
method runs on its own. ``smoothgrad:<method>`` wraps any input method in SmoothGrad.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from audit.models.layers import TargetLayer
from audit.saliency.base import METHODS, SaliencyMethod, SaliencyOptions, SaliencyResult
from audit.saliency.cam import CAMVariant, cam_maps

SMOOTH_PREFIX = "smoothgrad:"


def method_names() -> list[str]:
    """Every name ``--methods`` accepts (``smoothgrad:<name>`` composes with the input-gradient methods)."""
    return METHODS.names()


def validate_methods(names: Sequence[str]) -> None:
    """Raise :class:`~audit.errors.UnknownNameError` (listing the valid names) for an unknown method."""
    for name in names:
        METHODS.get(name.removeprefix(SMOOTH_PREFIX))


def build_methods(
    names: Sequence[str], model: nn.Module, layer: TargetLayer | str | None, options: SaliencyOptions | None = None
) -> dict[str, SaliencyMethod]:
    """Instantiate each named method once for ``model`` (reuse the result across batches)."""
    methods: dict[str, SaliencyMethod] = {}
    for name in names:
        if name.startswith(SMOOTH_PREFIX):
            smooth = METHODS.get("smoothgrad")
            base = METHODS.get(name.removeprefix(SMOOTH_PREFIX))(model, layer, options)
            methods[name] = smooth(model, layer, options, base=base)  # type: ignore[call-arg]
        else:
            methods[name] = METHODS.get(name)(model, layer, options)
    return methods


def explain(
    methods: dict[str, SaliencyMethod], inputs: torch.Tensor, target: torch.Tensor | None = None
) -> dict[str, SaliencyResult]:
    """Run every method on one batch; CAM variants that share a model and layer share one pass.

    Args:
        methods: from :func:`build_methods`.
        inputs: float [B, C, H, W], normalised, on the model's device.
        target: int [B], or None for each sample's predicted class.
    """
    results: dict[str, SaliencyResult] = {}
    cams = [m for m in methods.values() if isinstance(m, CAMVariant)]
    if cams:
        results.update(cam_maps(cams[0].model, cams[0].target_layer, inputs, cams, target))
        if target is None:  # every other method explains the same (predicted) classes
            target = next(iter(results.values())).targets
    for name, method in methods.items():
        if name not in results:
            results[name] = method.attribute(inputs, target)
    return {name: results[name] for name in methods}
