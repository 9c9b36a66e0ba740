"""Findings: per class × region kind × method (× group) statistics, and the verdict scale that combines the evidence.

Three kinds of evidence (README, "Verdicts"), each a yes/no with the numbers that led to it:

* **attention** (per method): the images of the class that carry the region put clearly more saliency on it than
  its area explains. Both (a) the lower bound of the bootstrap 95% interval of the enrichment Σ mass / Σ area is
  above the bar (``enrichment_bar``, default 2; capped at halfway between 1 and 1 / mean area, the largest
  enrichment a region of that size can reach, so that a region covering more than half of the image — such as
  ``outside_lungs`` — can still count), and (b) the one-sided Wilcoxon signed-rank test of mass fraction > area
  fraction over those images is significant at ``alpha`` after Holm's correction over every finding. Attention seen
  by a method that failed the model-randomisation sanity check is reported but does not count.
* **dependence** (per class × kind, from the counterfactual test, the same for every method): removing the region
  changes the model's decision clearly more often than removing an equal-area control region elsewhere: the lower
  bound of the paired bootstrap 95% interval of (flip rate − control flip rate) is above ``dependence_bar``
  (default 0.1, ten percentage points), judged on the first fill (inpainting by default). Flips, not probability
  drops, decide: removing any overlay the model has always seen (a marker present in every image) makes an
  unusual image and moves the probabilities a little, without changing decisions; the drops are reported beside.
* **leakage** (per class × kind, no model): the region's presence, size and position predict the class,
  cross-validated (one-vs-rest AUC ≥ ``leakage_auc_bar``, default 0.6, with its 95% interval above 0.5), and the
  class carries the region at least as often as the other classes (a region that only argues *against* a class
  raises that class's one-vs-rest AUC too).

``shortcut`` = at least two of the three; ``watch`` = one; ``none`` = none, and always when fewer than
``min_images`` images of the class carry the region.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from audit.config import VERDICT_LEVELS, FindingConfig

ALL = None  # the ``group`` of a finding over all images

Key = tuple[str, str | None, str]  # (label, group, region kind)


@dataclass(frozen=True)
class AttributionColumns:
    """Per image × method × region kind, aligned arrays (one entry per row of ``attributions``).

    ``mass``, ``area``, ``hit``, ``rank`` are NaN where the image has no region of the kind. ``group`` is the image's
    group/site (None where the manifest has none); findings are computed over all images and, where groups exist,
    per group too.
    """

    label: np.ndarray  # str [R]
    method: np.ndarray  # str [R]
    region_kind: np.ndarray  # str [R]
    present: np.ndarray  # bool [R]
    mass: np.ndarray  # float [R]
    area: np.ndarray  # float [R]
    hit: np.ndarray  # float [R]
    rank: np.ndarray  # float [R]
    group: np.ndarray | None = None  # object [R], None entries allowed


BOOTSTRAP_CELLS = 1 << 20  # resampled values per chunk (8 MB of float64)


def bootstrap_ratio(numerator: np.ndarray, denominator: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of Σ numerator / Σ denominator, resampling rows with replacement.

    Args:
        numerator, denominator: float [n], n ≥ 1.
    """
    rng = np.random.default_rng(seed)
    n = len(numerator)
    sums_num, sums_den = np.empty(n_boot), np.empty(n_boot)
    # Resamples in chunks of about BOOTSTRAP_CELLS draws, so memory does not grow with the number of images (the
    # draws are the same as one [n_boot, n] draw: the generator fills rows in order).
    step = max(1, BOOTSTRAP_CELLS // max(n, 1))
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        idx = rng.integers(0, n, size=(stop - start, n))
        sums_num[start:stop] = numerator[idx].sum(1)
        sums_den[start:stop] = denominator[idx].sum(1)
    ratios = sums_num / np.maximum(sums_den, np.finfo(np.float64).tiny)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def excess_p_value(mass: np.ndarray, area: np.ndarray) -> float:
    """One-sided Wilcoxon signed-rank p-value of "mass fraction > area fraction" over images (paired).

    NaN when every difference is zero or there are fewer than two images (no test possible).
    """
    difference = mass - area
    difference = difference[np.isfinite(difference) & (difference != 0)]
    if difference.size < 2:
        return math.nan
    return float(stats.wilcoxon(difference, alternative="greater").pvalue)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error) of p-values; NaN entries are left out and stay NaN."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if finite.size == 0:
        return adjusted
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    running = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted[order] = np.minimum(running, 1.0)
    return adjusted


def attention_bar(bar: float, mean_area: float) -> float:
    """The enrichment bar for a region of this mean area: ``bar``, capped at halfway between 1 and 1 / area."""
    if not mean_area > 0:
        return bar
    return min(bar, (1.0 + 1.0 / mean_area) / 2.0)


def _groups(columns: AttributionColumns) -> list[str | None]:
    if columns.group is None:
        return [ALL]
    named = sorted({g for g in columns.group.tolist() if g is not None})
    return [ALL, *named] if named else [ALL]


def compute_findings(
    columns: AttributionColumns,
    config: FindingConfig,
    dependence: Mapping[Key, dict] | None = None,
    leakage: Mapping[Key, dict] | None = None,
    sanity: Mapping[str, bool] | None = None,
) -> list[dict]:
    """One row per (label, group, region_kind, method) present in ``columns`` (schema ``findings``).

    Args:
        columns: the attributions with each image's label and group.
        config: the thresholds.
        dependence: (label, group, kind) → the counterfactual summary of the first fill
            (:func:`audit.evidence.counterfactual.dependence_stats`), where the test ran.
        leakage: (label, group, kind) → the leakage row (:func:`audit.evidence.leakage.leakage_table`).
        sanity: method → whether it passed the model-randomisation check (absent: not checked).
    """
    dependence = dependence or {}
    leakage = leakage or {}
    sanity = sanity or {}
    rows: list[dict] = []
    groups = _groups(columns)
    group_of = columns.group if columns.group is not None else np.full(len(columns.label), None, dtype=object)
    keys = sorted(set(zip(columns.label.tolist(), columns.region_kind.tolist(), columns.method.tolist(), strict=True)))
    seed_offset = 0
    for group in groups:
        in_group = np.ones(len(columns.label), bool) if group is ALL else (group_of == group)
        for label, kind, method in keys:
            same_kind = in_group & (columns.region_kind == kind) & (columns.method == method)
            in_class = same_kind & (columns.label == label)
            n_images = int(in_class.sum())
            if n_images == 0:
                continue
            rows.append(
                _statistics(columns, in_class, same_kind & (columns.label != label), (label, group, kind, method))
            )
            if rows[-1]["n_with_region"]:
                carriers = in_class & columns.present
                rows[-1]["ci_low"], rows[-1]["ci_high"] = bootstrap_ratio(
                    columns.mass[carriers].astype(np.float64),
                    columns.area[carriers].astype(np.float64),
                    config.bootstrap,
                    config.seed + seed_offset,
                )
            seed_offset += 1
    adjusted = holm(np.array([r["p_value"] for r in rows], dtype=np.float64))
    for row, p_adjusted in zip(rows, adjusted, strict=True):
        row["p_adjusted"] = float(p_adjusted)
        key = (row["label"], row["group"], row["region_kind"])
        _add_evidence(row, dependence.get(key), leakage.get(key), sanity.get(row["method"]), config)
    return rows


def _statistics(columns: AttributionColumns, in_class: np.ndarray, other: np.ndarray, key: tuple) -> dict:
    label, group, kind, method = key
    carriers = in_class & columns.present
    n_images, n_with, n_other = int(in_class.sum()), int(carriers.sum()), int(other.sum())
    row = {
        "label": label,
        "group": group,
        "region_kind": kind,
        "method": method,
        "n_images": n_images,
        "n_with_region": n_with,
        "presence_rate": n_with / n_images if n_images else 0.0,
        "presence_rate_other": float(columns.present[other].mean()) if n_other else 0.0,
        "mean_mass_fraction": math.nan,
        "mean_area_fraction": math.nan,
        "enrichment": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "pointing_hit_rate": math.nan,
        "rank_accuracy": math.nan,
        "p_value": math.nan,
    }
    if n_with:
        mass = columns.mass[carriers].astype(np.float64)
        area = columns.area[carriers].astype(np.float64)
        row.update(
            mean_mass_fraction=float(mass.mean()),
            mean_area_fraction=float(area.mean()),
            enrichment=float(mass.sum() / max(area.sum(), np.finfo(np.float64).tiny)),
            pointing_hit_rate=float(np.nanmean(columns.hit[carriers])),
            rank_accuracy=float(np.nanmean(columns.rank[carriers])),
            p_value=excess_p_value(mass, area),
        )
    return row


_DEPENDENCE_FIELDS = {
    "n_counterfactual": "n",
    "n_control": "n_control",
    "flip_rate": "flip_rate",
    "flip_rate_control": "flip_rate_control",
    "effect": "effect",
    "effect_ci_low": "effect_ci_low",
    "effect_ci_high": "effect_ci_high",
    "effect_control": "effect_control",
    "effect_control_ci_low": "effect_control_ci_low",
    "effect_control_ci_high": "effect_control_ci_high",
    "effect_difference": "difference",
    "effect_difference_ci_low": "difference_ci_low",
    "effect_difference_ci_high": "difference_ci_high",
    "flip_difference": "flip_difference",
    "flip_difference_ci_low": "flip_difference_ci_low",
    "flip_difference_ci_high": "flip_difference_ci_high",
}
_LEAKAGE_FIELDS = {
    "leakage_auc": "auc",
    "leakage_auc_ci_low": "auc_ci_low",
    "leakage_auc_ci_high": "auc_ci_high",
    "leakage_balanced_accuracy": "balanced_accuracy",
    "leakage_baseline": "baseline_balanced_accuracy",
}


def _number(value: object) -> float:
    return math.nan if value is None else float(value)  # type: ignore[arg-type]


def _add_evidence(
    row: dict, dependence: dict | None, leakage: dict | None, sane: bool | None, config: FindingConfig
) -> None:
    """Fill the evidence columns of one finding, its verdict and its reason."""
    for ours, theirs in _DEPENDENCE_FIELDS.items():
        row[ours] = _number((dependence or {}).get(theirs))
    for ours, theirs in _LEAKAGE_FIELDS.items():
        row[ours] = _number((leakage or {}).get(theirs))
    row["sanity_passed"] = sane
    enough = row["n_with_region"] >= config.min_images
    bar = attention_bar(config.enrichment_bar, row["mean_area_fraction"])
    looked = enough and row["ci_low"] > bar and row["p_adjusted"] < config.alpha
    row["attention"] = bool(looked and sane is not False)
    row["dependence"] = bool(enough and row["flip_difference_ci_low"] > config.dependence_bar)
    # One-vs-rest AUC also rises for a class the region argues against (with three classes, the classes that do
    # not carry it); leakage toward this class needs the class to carry the region at least as often as the rest.
    row["leakage"] = bool(
        leakage is not None and leakage.get("leakage", False) and row["presence_rate"] >= row["presence_rate_other"]
    )
    row["evidence"] = int(row["attention"]) + int(row["dependence"]) + int(row["leakage"])
    if not enough:
        row["verdict"] = "none"
        row["reason"] = f"only {row['n_with_region']} image(s) of the class carry the region (< {config.min_images})"
        return
    row["verdict"] = "shortcut" if row["evidence"] >= 2 else "watch" if row["evidence"] == 1 else "none"
    row["reason"] = "; ".join(_reasons(row, bar, looked, sane, config))


def _reasons(row: dict, bar: float, looked: bool, sane: bool | None, config: FindingConfig) -> list[str]:
    """One readable clause per kind of evidence, with the numbers that decided it."""
    interval = f"enrichment {row['enrichment']:.2f} (95% CI {row['ci_low']:.2f}–{row['ci_high']:.2f})"
    p = f"Holm-adjusted p {row['p_adjusted']:.2g}" if np.isfinite(row["p_adjusted"]) else "no test"
    if row["attention"]:
        attention = f"attention: {interval} > {bar:.3g}, {p}"
    elif looked and sane is False:
        attention = f"attention not counted: {interval}, but {row['method']} failed the sanity check"
    else:
        attention = f"no attention: {interval} vs bar {bar:.3g}, {p}"
    if math.isnan(row["flip_difference"]):
        dependence = "dependence not tested (no counterfactual with a control)"
    else:
        dependence = (
            f"{'dependence' if row['dependence'] else 'no dependence'}: removing the region flips "
            f"{row['flip_rate']:.0%} of predictions vs {row['flip_rate_control']:.0%} for controls (difference 95% "
            f"CI {row['flip_difference_ci_low']:.2f}–{row['flip_difference_ci_high']:.2f}, bar "
            f"{config.dependence_bar:g}); probability drop {row['effect']:.3f} vs {row['effect_control']:.3f}"
        )
    if math.isnan(row["leakage_auc"]):
        leakage = "leakage not measured"
    else:
        leakage = (
            f"{'leakage' if row['leakage'] else 'no leakage'}: the region predicts the class with AUC "
            f"{row['leakage_auc']:.2f} (95% CI {row['leakage_auc_ci_low']:.2f}–{row['leakage_auc_ci_high']:.2f}); "
            f"present in {row['presence_rate']:.0%} of the class vs {row['presence_rate_other']:.0%} of the rest"
        )
    return [attention, dependence, leakage]


def accuracy_above_chance(correct: np.ndarray, labels: np.ndarray) -> tuple[bool, str]:
    """Whether a model's accuracy is clearly above the majority-class baseline, and a sentence with the numbers.

    The lower bound of the 95% Wilson interval of the accuracy must be above the share of the largest class. A model
    that is no better than chance sits on its decision boundary, where any perturbation flips it, so its attention
    and its counterfactual flips say nothing about shortcut learning.

    Args:
        correct: bool [N], the model's prediction equals the label (held-out images for the probe).
        labels: [N] the labels.
    """
    n = len(correct)
    if n == 0:
        return False, "no image was scored"
    accuracy = float(np.mean(correct))
    baseline = float(np.max(np.unique(labels, return_counts=True)[1])) / n
    z = 1.959964
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = centre - half
    sentence = (
        f"accuracy {accuracy:.3f} (95% CI from {low:.3f}) vs {baseline:.3f} for always predicting the largest class"
    )
    return low > baseline, sentence


def cap_at_watch(findings: list[dict], why: str) -> None:
    """Lower every ``shortcut`` to ``watch`` (in place), saying why: the model is no better than chance."""
    for row in findings:
        if row["verdict"] == "shortcut":
            row["verdict"] = "watch"
            row["reason"] = f"capped at watch: the model is no better than chance ({why}); {row['reason']}"


def overall_verdict(findings: list[dict]) -> str:
    """The most severe verdict among the findings (``none`` when there are none)."""
    return max((f["verdict"] for f in findings), key=VERDICT_LEVELS.__getitem__, default="none")


def gate_failed(verdict: str, fail_on: str | None) -> bool:
    """Whether the release gate fails: a finding reached the ``fail_on`` level."""
    return fail_on is not None and VERDICT_LEVELS[verdict] >= VERDICT_LEVELS[fail_on]
