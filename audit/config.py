"""Typed configuration of an audit, loaded from TOML or YAML and validated at the edge.

Every setting has a default; a file or the command line overrides some of them. Unknown keys are rejected
(pydantic ``extra="forbid"``), so a typo in a configuration file fails at once instead of being ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from audit.errors import ConfigError

Verdict = Literal["none", "watch", "shortcut"]
VERDICT_LEVELS: dict[str, int] = {"none": 0, "watch": 1, "shortcut": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeConfig(_Strict):
    """The probe model trained when no user model is given (see DESIGN.md, "The probe model matters")."""

    image_size: int = Field(160, ge=32, le=1024, description="square input size of the probe, pixels")
    epochs: int = Field(30, ge=1, le=500)
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(3e-3, gt=0)
    width: int = Field(16, ge=4, le=256, description="channels of the first convolution block")
    folds: int = Field(
        2, ge=2, le=10, description="cross-fitting folds: each image is scored by a model that did not train on it"
    )
    max_images: int = Field(
        4000,
        ge=10,
        description="images the probe trains on at most (a seeded, class-stratified sample by image id); every "
        "image is still scored, by a fold model that did not train on it",
    )
    seed: int = 0


class ModelConfig(_Strict):
    """A user model: a checkpoint plus the architecture it belongs to."""

    path: Path | None = None
    arch: str | None = Field(None, description="timm name, or torchvision:<name> for a torchvision architecture")
    target_layer: str | None = Field(
        None, description="module name of the saliency target layer; found automatically if empty"
    )
    image_size: int | None = Field(
        None, ge=16, le=2048, description="input size; taken from timm's pretrained config if empty"
    )
    outputs: dict[str, int] | None = Field(
        None,
        description="label → the model's output index; empty = the labels in sorted order are outputs 0, 1, ...",
    )
    num_outputs: int | None = Field(
        None, ge=1, le=100000, description="the model's output count when it differs from the label count"
    )
    multilabel: bool = Field(False, description="the outputs are independent sigmoid logits (one per finding)")


class RegionConfig(_Strict):
    """Which regions are measured: detectors, the detection cache, and the user's own regions."""

    detectors: tuple[str, ...] = ("text", "border")
    watermark: bool = Field(True, description="look for class-associated overlays at a fixed position (dataset-level)")
    cache: bool = Field(True, description="reuse detections of the same image content from earlier audits")
    cache_dir: Path | None = Field(None, description="detection cache folder; default ~/.cache/shortcut-audit/regions")
    user_boxes: Path | None = Field(None, description="CSV of boxes: path, kind, x0, y0, x1, y1")
    user_masks: Path | None = Field(None, description="folder MASKS/<kind>/<image path>.png of region masks")
    expected: str | None = Field(None, description="a user kind whose complement is reported as outside_<kind>")


class SaliencyConfig(_Strict):
    """Settings of the chunked and stochastic saliency methods (see :class:`audit.saliency.SaliencyOptions`)."""

    memory_budget_mb: int = Field(1024, ge=16, description="peak extra memory of a chunked method's expanded batches")
    samples_per_batch: int | None = Field(None, ge=1, description="cap on expanded samples per forward pass")
    ig_steps: int = Field(32, ge=2, le=1024)
    smoothgrad_samples: int = Field(16, ge=1, le=1024)
    smoothgrad_noise: float = Field(0.15, gt=0, le=1)
    scorecam_channels: int | None = Field(None, ge=1, description="Score-CAM channel budget (top-k); None = all")
    rise_masks: int = Field(1000, ge=1)
    rise_grid: int = Field(7, ge=2, le=64)
    rise_probability: float = Field(0.5, gt=0, lt=1)
    occlusion_window: int = Field(16, ge=1)
    occlusion_stride: int = Field(8, ge=1)
    igos_iterations: int = Field(15, ge=1)
    igos_steps: int = Field(10, ge=1)
    seed: int = 0


class FindingConfig(_Strict):
    """Thresholds of the verdict scale (README, "Verdicts")."""

    enrichment_bar: float = Field(
        2.0, gt=1.0, description="lower 95% bound of enrichment above this counts as attention"
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="level of the Wilcoxon test of mass > area, Holm-corrected over all findings"
    )
    dependence_bar: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="lower 95% bound of (share of predictions flipped by removing the region − share flipped by "
        "removing the control) above this counts as dependence",
    )
    leakage_auc_bar: float = Field(
        0.6,
        gt=0.5,
        le=1.0,
        description="cross-validated AUC of the region alone predicting the class that counts as "
        "leakage (with its 95% interval above 0.5)",
    )
    leakage_folds: int = Field(5, ge=2, le=20, description="cross-validation folds of the leakage test")
    min_images: int = Field(
        5, ge=1, description="fewer images carrying the region than this give no verdict above 'none'"
    )
    bootstrap: int = Field(1000, ge=100, le=100_000)
    seed: int = 0


class CounterfactualConfig(_Strict):
    """Removing each region, and an equal-area control region elsewhere, and re-running the model."""

    enabled: bool = True
    fills: tuple[Literal["inpaint", "mean"], ...] = Field(
        ("inpaint",),
        min_length=1,
        description="how removed pixels are filled; the first decides dependence (add 'mean' for a second, "
        "cruder fill as a robustness check: one more pair of forward passes per image and region)",
    )
    max_batch: int = Field(64, ge=1, le=4096, description="counterfactual images per forward pass")
    max_images_per_class: int = Field(
        1000,
        ge=10,
        description="images of a class that get the counterfactual test, at most (a sample fixed by image id, so "
        "a resumed or incremental run draws the same one); bounds its cost on large datasets",
    )


class DiscoveryConfig(_Strict):
    """SpRAy: spectral clustering of each class's saliency maps, to find shortcuts nobody named."""

    enabled: bool = True
    max_images: int = Field(2000, ge=10, description="maps clustered per class (a seeded sample beyond this)")
    max_clusters: int = Field(8, ge=2, le=32)
    neighbours: int = Field(10, ge=2, le=100, description="k of the k-nearest-neighbour affinity")
    grid: int = Field(16, ge=4, le=64, description="side the maps are resized to before clustering")
    min_cluster: int = Field(5, ge=2, description="smaller clusters are not reported")


class AuditConfig(_Strict):
    """Everything one audit run needs. ``audit run --config FILE`` loads it; flags override it."""

    data: Path
    manifest: Path | None = None
    finding_columns: tuple[str, ...] = Field(
        (), description="multi-label manifest: the findings to audit, one binary audit each (OUT/<finding>/)"
    )
    finding: str | None = Field(None, description="the one finding this run audits (set per run from finding_columns)")
    out: Path = Path("reports/audit")
    methods: tuple[str, ...] = ("gradcam",)
    target: str = Field("predicted", description="class each map explains: 'predicted', 'label', or a class name")
    model: ModelConfig = ModelConfig()
    probe: ProbeConfig = ProbeConfig()
    saliency: SaliencyConfig = SaliencyConfig()
    regions: RegionConfig = RegionConfig()
    findings: FindingConfig = FindingConfig()
    counterfactual: CounterfactualConfig = CounterfactualConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    fail_on: Verdict | None = None
    shard_size: int = Field(256, ge=1, description="images per shard: the unit of parallel work and of atomic output")
    batch_size: int = Field(32, ge=1, le=4096, description="images per saliency batch on the device")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    workers: int = Field(2, ge=1, le=256, description="shards processed at once (threads, or Dask worker processes)")
    runner: Literal["threads", "dask"] = Field(
        "threads", description="Prefect task runner of the shard tasks: a thread pool, or a Dask cluster"
    )
    dask_address: str | None = Field(
        None, description="scheduler address of an existing Dask cluster (tcp://host:8786); empty = a local cluster"
    )
    map_size: int = Field(32, ge=8, le=128, description="side of the downsampled saliency maps stored per image")
    gallery_size: int = Field(
        24, ge=0, le=200, description="gallery images per suspicious region kind (the report's size grows with it)"
    )

    @field_validator("methods", mode="before")
    @classmethod
    def _split_methods(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [m.strip() for m in value.split(",") if m.strip()]
        if not value:
            raise ValueError("at least one saliency method is needed, for example 'gradcam'")
        return value


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist; pass a .toml or .yaml file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"configuration file {path}: expected a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"configuration file {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"configuration file {path}: expected a mapping of settings at the top level")
    return raw


def build_config(file: Path | None = None, **overrides: Any) -> AuditConfig:
    """Merge defaults, a configuration file, and overrides (``None`` values are ignored), then validate.

    Overrides may use dotted keys for nested settings, for example ``{"probe.epochs": 10}``.
    """
    merged: dict[str, Any] = load_config_file(file) if file is not None else {}
    for key, value in overrides.items():
        if value is None:
            continue
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return AuditConfig.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


def flatten(config: AuditConfig) -> dict[str, str]:
    """The configuration as dotted key → string, for the report and the run record."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)

    walk("", config.model_dump(mode="json"))
    return out
