"""Findings: per class × region kind × method statistics and the verdict scale.

The verdict scale (README, "Verdicts"):

* **attention**: the lower bound of the bootstrap 95% interval of the class's enrichment is above
  ``enrichment_bar`` (default 2): the model puts clearly more saliency on the region than its area explains.
* **leakage**: the region kind is more frequent in the class than in the other classes, by at least
  ``leakage_bar`` (default 0.2) with a 95% interval of the difference above 0: the region alone predicts the
  label, a data problem even before any model learns it.
* ``shortcut`` = attention and leakage; ``watch`` = attention alone (the model looks at a region that does
  not predict the label by its presence, maybe by its content), or leakage with enrichment interval above
  ``watch_bar``; ``none`` otherwise, and always when fewer than ``min_images`` images of the class carry the
  region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from audit.config import VERDICT_LEVELS, FindingConfig


@dataclass(frozen=True)
class AttributionColumns:
    """Per image × method × region kind, aligned arrays (one entry per row of ``attributions``).

    ``mass``, ``area``, ``hit``, ``rank`` are NaN where the image has no region of the kind.
    """

    label: np.ndarray  # str [R]
    method: np.ndarray  # str [R]
    region_kind: np.ndarray  # str [R]
    present: np.ndarray  # bool [R]
    mass: np.ndarray  # float [R]
    area: np.ndarray  # float [R]
    hit: np.ndarray  # float [R]
    rank: np.ndarray  # float [R]


def bootstrap_ratio(numerator: np.ndarray, denominator: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of Σ numerator / Σ denominator, resampling rows with replacement.

    Args:
        numerator, denominator: float [n], n ≥ 1.
    """
    rng = np.random.default_rng(seed)
    n = len(numerator)
    idx = rng.integers(0, n, size=(n_boot, n))
    sums_num = numerator[idx].sum(1)
    sums_den = denominator[idx].sum(1)
    ratios = sums_num / np.maximum(sums_den, np.finfo(np.float64).tiny)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def proportion_difference_low(p1: float, n1: int, p2: float, n2: int) -> float:
    """Lower bound of the 95% (normal approximation) interval of p1 − p2."""
    if n1 == 0 or n2 == 0:
        return -math.inf
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    return p1 - p2 - 1.96 * se


def compute_findings(columns: AttributionColumns, config: FindingConfig) -> list[dict]:
    """One row per (label, region_kind, method) present in ``columns`` (schema ``findings``)."""
    rows: list[dict] = []
    keys = sorted(set(zip(columns.label.tolist(), columns.region_kind.tolist(), columns.method.tolist(), strict=True)))
    for seed_offset, (label, kind, method) in enumerate(keys):
        same_kind = (columns.region_kind == kind) & (columns.method == method)
        in_class = same_kind & (columns.label == label)
        other = same_kind & (columns.label != label)
        n_images = int(in_class.sum())
        carriers = in_class & columns.present
        n_with = int(carriers.sum())
        n_other = int(other.sum())
        presence = n_with / n_images if n_images else 0.0
        presence_other = float(columns.present[other].mean()) if n_other else 0.0
        row = {
            "label": label,
            "region_kind": kind,
            "method": method,
            "n_images": n_images,
            "n_with_region": n_with,
            "presence_rate": presence,
            "presence_rate_other": presence_other,
            "mean_mass_fraction": math.nan,
            "mean_area_fraction": math.nan,
            "enrichment": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "pointing_hit_rate": math.nan,
            "rank_accuracy": math.nan,
        }
        if n_with:
            mass = columns.mass[carriers].astype(np.float64)
            area = columns.area[carriers].astype(np.float64)
            row.update(
                mean_mass_fraction=float(mass.mean()),
                mean_area_fraction=float(area.mean()),
                enrichment=float(mass.sum() / area.sum()),
                pointing_hit_rate=float(np.nanmean(columns.hit[carriers])),
                rank_accuracy=float(np.nanmean(columns.rank[carriers])),
            )
            row["ci_low"], row["ci_high"] = bootstrap_ratio(mass, area, config.bootstrap, config.seed + seed_offset)
        diff_low = proportion_difference_low(presence, n_images, presence_other, n_other)
        leakage = presence - presence_other >= config.leakage_bar and diff_low > 0
        enough = n_with >= config.min_images
        attention = enough and row["ci_low"] > config.enrichment_bar
        verdict, reason = _verdict(row, attention, leakage, enough, config)
        row.update(attention=bool(attention), leakage=bool(leakage), verdict=verdict, reason=reason)
        rows.append(row)
    return rows


def _verdict(row: dict, attention: bool, leakage: bool, enough: bool, config: FindingConfig) -> tuple[str, str]:
    share = f"present in {row['presence_rate']:.0%} of the class vs {row['presence_rate_other']:.0%} of the rest"
    if not enough:
        return "none", f"only {row['n_with_region']} image(s) of the class carry the region (< {config.min_images})"
    interval = f"enrichment {row['enrichment']:.2f} (95% CI {row['ci_low']:.2f}–{row['ci_high']:.2f})"
    if attention and leakage:
        return "shortcut", f"attention: {interval} > {config.enrichment_bar:g}; leakage: {share}"
    if attention:
        return "watch", f"attention: {interval} > {config.enrichment_bar:g}, but no leakage ({share})"
    if leakage and row["ci_low"] > config.watch_bar:
        return "watch", f"leakage ({share}) and {interval} > {config.watch_bar:g}"
    return "none", f"{interval}; {share}"


def overall_verdict(findings: list[dict]) -> str:
    """The most severe verdict among the findings (``none`` when there are none)."""
    return max((f["verdict"] for f in findings), key=VERDICT_LEVELS.__getitem__, default="none")


def gate_failed(verdict: str, fail_on: str | None) -> bool:
    """Whether the release gate fails: a finding reached the ``fail_on`` level."""
    return fail_on is not None and VERDICT_LEVELS[verdict] >= VERDICT_LEVELS[fail_on]
