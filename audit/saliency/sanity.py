"""The model-randomisation sanity check (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018).

A saliency method that explains the model must change when the model changes. The check re-initialises the
model's top layers (the classifier and everything from the target layer on: the cascade's first steps in
Adebayo et al.'s Fig. 2), recomputes the maps for the same inputs and targets, and measures the Spearman rank
correlation between the maps before and after, per image, on the maps' absolute values (as the paper does). A
method whose maps barely change (mean correlation ≥ ``threshold``) fails: it shows the input's edges, not the
model's reasons, and its findings should not drive a verdict alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from audit.models.layers import TargetLayer, as_target_layer
from audit.saliency.base import SaliencyOptions
from audit.saliency.engine import build_methods, explain
from audit.saliency.ranking import spearman

DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class SanityResult:
    """One method's outcome: mean and per-image Spearman correlation (original vs randomised model)."""

    method: str
    rank_correlation: float
    per_image: tuple[float, ...]
    passed: bool
    randomised: tuple[str, ...]  # the re-initialised module names


def top_modules(model: nn.Module, layer: TargetLayer | None) -> list[str]:
    """The top of the network: leaf modules with parameters from the target layer on (or the last quarter without
    a layer), at most a third of the network's parameterised layers, so that a target layer that is the whole
    backbone (the probe's ``features``) does not turn the check into "a freshly initialised network"."""
    leaves = [
        name
        for name, m in model.named_modules()
        if name and not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    top = leaves[-max(1, len(leaves) // 4) :]
    if layer is not None:
        start = next(
            (i for i, name in enumerate(leaves) if name == layer.name or name.startswith(layer.name + ".")), None
        )
        if start is not None:
            top = leaves[start:]
    return top[-max(1, math.ceil(len(leaves) / 3)) :]


def randomised_copy(model: nn.Module, names: Sequence[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose modules ``names`` are re-initialised with their own initialiser
    (``reset_parameters``: Kaiming for convolutions and linear layers, identity for normalisation layers), drawn
    from a seeded generator so the check is reproducible."""
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name in names:
            module = clone.get_submodule(name)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for parameter in module.parameters(recurse=False):
                    if parameter.ndim > 1:
                        parameter.normal_(0, 0.01)
    return clone.eval()


def randomisation_check(
    model: nn.Module,
    layer: TargetLayer | str | None,
    inputs: torch.Tensor,
    methods: Sequence[str],
    options: SaliencyOptions | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[SanityResult]:
    """Run the check for each method on one batch.

    Args:
        model: the classifier in eval mode.
        layer: its target layer (for layer methods, and to choose what to randomise).
        inputs: float [B, C, H, W], normalised, on the model's device (a few images suffice).
        methods: method names.
        threshold: a mean correlation at or above this fails.
    """
    spec = as_target_layer(layer)
    names = top_modules(model, spec)
    random_model = randomised_copy(model, names, seed=options.seed if options else 0)
    original = explain(build_methods(methods, model, spec, options), inputs)
    # The same targets: the question is whether the map depends on the weights, not on the class.
    targets = next(iter(original.values())).targets
    randomised = explain(build_methods(methods, random_model, spec, options), inputs, targets)
    results = []
    for name in methods:
        before, after = original[name].maps.flatten(1).abs(), randomised[name].maps.flatten(1).abs()
        rho = spearman(before, after)
        # A constant map has no ranking: two constant maps did not change (1), one that became or stopped being
        # constant (e.g. all zero after the randomisation) changed completely (0).
        constant_before = before.amax(1) == before.amin(1)
        constant_after = after.amax(1) == after.amin(1)
        fallback = (constant_before & constant_after).float()
        rho = torch.where(torch.isnan(rho), fallback.to(rho.device), rho)
        mean = float(rho.mean())
        results.append(
            SanityResult(
                method=name,
                rank_correlation=mean,
                per_image=tuple(rho.tolist()),
                passed=mean < threshold,
                randomised=tuple(names),
            )
        )
    return results
