"""The audit's stages as plain functions, and the wiring that runs them.

Stages (DESIGN.md, "Data flow"), each writing its own outputs atomically under ``OUT``:

1. :func:`plan` lists the dataset (manifest) and cuts it into shards.
2. :func:`ingest_shard` reads, hashes and decodes each image of a shard, detects its suspicious regions and
   resizes it to the model's input; bad files go to ``errors``.
3. :func:`fit_model` loads the user's model, or trains the cross-fitted probe.
4. :func:`explain_shard` runs the model and the saliency methods on the device and measures the saliency that
   falls on each region kind.
5. :func:`summarise` computes the findings and writes the DuckDB catalog, ``summary.json`` and the report.

:func:`run_pipeline` wires them through a :class:`Runner`; ``flows/`` passes a Prefect runner (tasks, retries,
a task runner), tests and ``--no-prefect`` pass :class:`LocalRunner`. This module never imports Prefect.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch

import audit
from audit.config import AuditConfig, flatten
from audit.data.decode import content_hash, decode_image
from audit.data.manifest import Manifest, ManifestEntry, build_manifest, safe_join
from audit.device import resolve_device
from audit.errors import AuditError, ConfigError, DataError
from audit.evidence.collect import dependence_by_key, discovered_clusters, leakage_by_key, leakage_rows
from audit.evidence.counterfactual import CounterfactualBatch, counterfactual_batch
from audit.evidence.findings import (
    AttributionColumns,
    accuracy_above_chance,
    cap_at_watch,
    compute_findings,
    gate_failed,
    overall_verdict,
)
from audit.metrics.regions import boxes_to_masks, downsample_maps, region_metrics
from audit.models.layers import TargetLayer, describe_layer, find_target_layer
from audit.models.loading import load_user_model
from audit.models.preprocessing import InputSpec
from audit.models.probe import ProbeNet, assign_folds, probe_input_spec, save_probe, train_probe
from audit.regions import DETECTORS, Detection
from audit.regions.base import to_gray
from audit.regions.cache import RegionCache, default_cache_dir
from audit.regions.user import UserRegions, load_user_regions
from audit.saliency import SaliencyOptions, build_methods, explain, validate_methods
from audit.store.catalog import build_catalog
from audit.store.parquet import read_table, rows_to_table, write_part
from audit.store.schemas import TABLES

log = logging.getLogger("audit.pipeline")

MEAN_IMAGE_SIZE = 64


# ----------------------------------------------------------------------------------------------------------------
# Plain data passed between stages (small and picklable, so a distributed task runner can ship it).


@dataclass(frozen=True)
class Shard:
    index: int
    entries: tuple[ManifestEntry, ...]


@dataclass(frozen=True)
class Plan:
    config: AuditConfig
    root: Path
    labels: tuple[str, ...]
    shards: tuple[Shard, ...]
    region_kinds: tuple[str, ...]
    spec: InputSpec
    started: float
    user: UserRegions = field(default_factory=UserRegions)


@dataclass(frozen=True)
class ModelRef:
    """Where the model to explain lives; each shard task loads it itself."""

    kind: str  # "probe" | "user"
    arch: str
    target_layer: TargetLayer
    spec: InputSpec
    path: Path
    num_classes: int
    folds: int = 1
    info: dict = field(default_factory=dict)


class Runner(Protocol):
    """How stages run: ``map`` applies a stage to many argument tuples, ``call`` runs one."""

    def map(self, fn: Callable[..., Any], items: Sequence[tuple]) -> list[Any]: ...

    def call(self, fn: Callable[..., Any], *args: Any) -> Any: ...


class LocalRunner:
    """Runs stages in this process; ``workers`` > 1 maps shards on a thread pool (OpenCV and torch release the GIL)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def map(self, fn: Callable[..., Any], items: Sequence[tuple]) -> list[Any]:
        if self.workers <= 1 or len(items) <= 1:
            return [fn(*args) for args in items]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda args: fn(*args), items))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: plan


def region_kinds(detectors: Sequence[str]) -> tuple[str, ...]:
    kinds: list[str] = []
    for name in detectors:
        for kind in DETECTORS.get(name).kinds:
            if kind not in kinds:
                kinds.append(kind)
    return tuple(kinds)


def plan(config: AuditConfig) -> Plan:
    """Validate the settings, list the dataset and cut it into shards. Fails at once on a bad setting or path."""
    validate_methods(config.methods)  # unknown names fail here, listing the valid ones
    manifest: Manifest = build_manifest(config.data, config.manifest)
    if config.target not in ("predicted", "label") and config.target not in manifest.labels:
        raise ConfigError(
            f"target {config.target!r} is neither 'predicted', 'label' nor a class of the dataset "
            f"({', '.join(manifest.labels)})"
        )
    if config.model.path is not None:
        _, spec = load_user_model(config.model.path, config.model.arch, len(manifest.labels))
        if config.model.image_size:
            spec = InputSpec(config.model.image_size, spec.channels, spec.mean, spec.std)
    else:
        spec = probe_input_spec(config.probe)
    config.out.mkdir(parents=True, exist_ok=True)
    shards = tuple(Shard(i, entries) for i, entries in enumerate(manifest.shards(config.shard_size)))
    log.info(
        "dataset %s: %d files, %d labels, %d shards",
        config.data,
        len(manifest.entries),
        len(manifest.labels),
        len(shards),
    )
    user = load_user_regions(config.regions.user_boxes, config.regions.user_masks, config.regions.expected)
    kinds = region_kinds(config.regions.detectors) + (("watermark",) if config.regions.watermark else ())
    kinds = (*kinds, *(k for k in user.kinds if k not in kinds))
    return Plan(
        user=user,
        config=config,
        root=manifest.root,
        labels=manifest.labels,
        shards=shards,
        region_kinds=kinds,
        spec=spec,
        started=time.time(),
    )


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: ingest


def _work_file(out: Path, shard: int) -> Path:
    return out / "work" / f"shard-{shard:05d}.npz"


def _region_row(image_id: str, path: str, d: Detection) -> dict:
    return {
        "image_id": image_id,
        "path": path,
        "kind": d.kind,
        "x0": d.x0,
        "y0": d.y0,
        "x1": d.x1,
        "y1": d.y1,
        "score": d.score,
        "detector": d.detector,
        "detector_version": d.detector_version,
    }


def _read_image(p: Plan, entry: ManifestEntry, errors: list[dict]) -> tuple[bytes, np.ndarray] | None:
    """The file's bytes and decoded pixels, or None (and a row in ``errors``) when it cannot be read."""
    try:
        data = safe_join(p.root, entry.path).read_bytes()
        return data, decode_image(data, entry.path)
    except FileNotFoundError:
        errors.append({"path": entry.path, "stage": "read", "message": f"{entry.path}: file not found"})
    except (AuditError, OSError) as exc:
        errors.append({"path": entry.path, "stage": "decode", "message": str(exc)})
    return None


def _shard_hashes(p: Plan, shard: Shard) -> list[str]:
    """Content hashes of the shard's readable files, to look their regions up before decoding anything."""
    hashes = []
    for entry in shard.entries:
        try:
            hashes.append(content_hash(safe_join(p.root, entry.path).read_bytes()))
        except (AuditError, OSError):
            continue  # reported when the file is read for real
    return hashes


def ingest_shard(p: Plan, shard: Shard) -> dict:
    """Read, hash, decode, detect regions and resize every image of one shard.

    Detections come from the region cache when this detector version has seen the same image content before
    (README, "Regions"); new ones are added to it. Writes ``tables/regions`` and ``tables/errors`` parts and a
    work file with the resized inputs (uint8 [n, C, S, S]) and user masks (uint8 [n, M, S, S]) for the model
    stages. Returns counts, including how many detector calls were made.
    """
    start = time.perf_counter()
    config = p.config
    out = config.out
    errors: list[dict] = []
    regions: list[dict] = []
    meta: dict[str, list] = {
        k: [] for k in ("image_id", "path", "label", "split", "group", "width", "height", "channels")
    }
    inputs: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    detectors = {name: DETECTORS.get(name)() for name in config.regions.detectors}
    cache = RegionCache(config.regions.cache_dir or default_cache_dir()) if config.regions.cache else None
    cached: dict[str, dict[str, list[Detection]]] = {name: {} for name in detectors}
    if cache is not None and any(cache.has_entries(name, d.version) for name, d in detectors.items()):
        hashes = _shard_hashes(p, shard)  # read once more only when there is something to look up
        cached = {name: cache.lookup(name, d.version, hashes) for name, d in detectors.items()}
    fresh: dict[str, dict[str, list[Detection]]] = {name: {} for name in detectors}
    seen: set[str] = set()
    calls = 0
    for entry in shard.entries:
        read = _read_image(p, entry, errors)
        if read is None:
            continue
        data, image = read
        image_id = content_hash(data)
        if image_id in seen:  # the same bytes twice in one shard: audit once
            errors.append(
                {
                    "path": entry.path,
                    "stage": "read",
                    "message": f"{entry.path}: duplicate of another file in the dataset",
                }
            )
            continue
        seen.add(image_id)
        gray = None
        for name, detector in detectors.items():
            found = cached[name].get(image_id)
            if found is None:
                gray = to_gray(image) if gray is None else gray
                try:
                    found = detector.detect(gray)
                except Exception as exc:  # a detector bug must not lose the image's other results
                    errors.append(
                        {"path": entry.path, "stage": "regions", "message": f"{name}: {type(exc).__name__}: {exc}"}
                    )
                    continue
                calls += 1
                fresh[name][image_id] = found
            regions.extend(_region_row(image_id, entry.path, d) for d in found)
        height, width = image.shape[:2]
        regions.extend(_region_row(image_id, entry.path, d) for d in p.user.detections(entry.path))
        file_masks = p.user.masks(entry.path, height, width)
        stack = np.zeros((len(p.user.mask_kinds), p.spec.size, p.spec.size), np.uint8)
        for k, kind in enumerate(p.user.mask_kinds):
            if kind in file_masks:
                ys, xs = np.nonzero(file_masks[kind])
                if len(xs):
                    regions.append(
                        _region_row(
                            image_id,
                            entry.path,
                            Detection(
                                kind,
                                int(xs.min()),
                                int(ys.min()),
                                int(xs.max()) + 1,
                                int(ys.max()) + 1,
                                1.0,
                                "user-masks",
                                "1",
                            ),
                        )
                    )
                stack[k] = cv2.resize(
                    file_masks[kind].astype(np.uint8), (p.spec.size, p.spec.size), interpolation=cv2.INTER_NEAREST
                )
        masks.append(stack)
        for key, value in (
            ("image_id", image_id),
            ("path", entry.path),
            ("label", entry.label),
            ("split", entry.split),
            ("group", entry.group),
            ("width", width),
            ("height", height),
            ("channels", 1 if image.ndim == 2 else image.shape[2]),
        ):
            meta[key].append(value)
        inputs.append(p.spec.resize(image))
    if cache is not None:
        for name, detector in detectors.items():
            cache.store(name, detector.version, fresh[name])
    key = f"{shard.index:05d}"
    write_part(out, "regions", rows_to_table("regions", regions), key)
    write_part(out, "errors", rows_to_table("errors", errors), f"ingest-{key}")
    work = _work_file(out, shard.index)
    work.parent.mkdir(parents=True, exist_ok=True)
    size = p.spec.size
    array = np.stack(inputs) if inputs else np.zeros((0, p.spec.channels, size, size), np.uint8)
    mask_array = np.stack(masks) if masks else np.zeros((0, len(p.user.mask_kinds), size, size), np.uint8)
    temporary = work.with_suffix(".tmp.npz")
    np.savez(temporary, inputs=array, masks=mask_array, **{k: np.array(v, dtype=object) for k, v in meta.items()})
    temporary.replace(work)
    seconds = time.perf_counter() - start
    log.info(
        "ingest shard %d: %d images, %d errors, %d regions, %d detector calls (%.1f img/s)",
        shard.index,
        len(inputs),
        len(errors),
        len(regions),
        calls,
        len(shard.entries) / max(seconds, 1e-9),
    )
    return {
        "shard": shard.index,
        "images": len(inputs),
        "errors": len(errors),
        "regions": len(regions),
        "detector_calls": calls,
    }


def _gray_grid(inputs: np.ndarray) -> np.ndarray:
    """uint8 [n, C, S, S] model inputs → uint8 [n, S, S] grayscale on the same grid."""
    if inputs.shape[1] == 1:
        return inputs[:, 0]
    return np.round(inputs[:, :3].astype(np.float32).transpose(0, 2, 3, 1) @ np.float32([0.299, 0.587, 0.114])).astype(
        np.uint8
    )


def detect_watermarks(p: Plan) -> dict:
    """The dataset-level watermark detector (README, "Regions"): overlays that recur at about the same place in
    the images of one class, found from statistics over the whole dataset, then located in each image.

    Two streaming passes over the shards' resized inputs (no decoding); writes ``tables/regions`` parts
    ``watermark-<shard>`` and ``work/watermark.json``. Returns what was found.
    """
    from audit.regions.watermark import WatermarkMatches, WatermarkStatistics, slice_fits

    config = p.config
    if not config.regions.watermark:
        return {"regions": []}
    stats = WatermarkStatistics(grid=p.spec.size, seed=config.findings.seed)
    # Pass 1 keeps each shard's small metadata, so pass 2 reads every work file only once more (for the pixels).
    shard_meta = []
    for shard in p.shards:
        work = _load_work(config.out, shard.index)
        labels = np.array([p.labels.index(str(v)) for v in work["label"]], dtype=int)
        sizes = list(zip(work["width"].astype(int), work["height"].astype(int), strict=True))
        shard_meta.append((shard, work["image_id"], work["path"], sizes, labels))
        if len(work["inputs"]):
            stats.add(_gray_grid(work["inputs"]), labels)
    model = stats.finish()
    found = []
    if model.regions:
        matches = [model.match(_gray_grid(_load_work(config.out, s.index)["inputs"])) for s in p.shards]
        fits = model.assign(WatermarkMatches.concatenate(matches).scores)
        start = 0
        for (shard, image_ids, paths, sizes, _), shard_matches in zip(shard_meta, matches, strict=True):
            n = len(sizes)
            detections = model.detections(shard_matches, slice_fits(fits, slice(start, start + n)), sizes)
            start += n
            rows = [
                _region_row(str(image_id), str(path), d)
                for image_id, path, found_here in zip(image_ids, paths, detections, strict=True)
                for d in found_here
            ]
            write_part(config.out, "regions", rows_to_table("regions", rows), f"watermark-{shard.index:05d}")
        labels = np.concatenate([meta[4] for meta in shard_meta]).astype(int)
        for region, fit in zip(model.regions, fits, strict=True):
            found.append(
                {
                    "label": p.labels[region.label],
                    "grid_box": list(region.box),
                    "z": region.z,
                    "threshold": region.threshold,
                    "carriers": int(fit.carriers.sum()),
                    "prevalence": {p.labels[k]: v for k, v in fit.prevalence(labels).items()},
                }
            )
            log.info(
                "watermark found in class %s: grid box %s, z %.1f (threshold %.1f), %d images carry it",
                p.labels[region.label],
                region.box,
                region.z,
                region.threshold,
                int(fit.carriers.sum()),
            )
    record = {"grid": p.spec.size, "threshold": model.threshold, "regions": found}
    (config.out / "work" / "watermark.json").write_text(json.dumps(record, indent=2, default=float))
    return record


def _load_work(out: Path, shard: int) -> dict[str, np.ndarray]:
    with np.load(_work_file(out, shard), allow_pickle=True) as data:  # our own file, written by ingest_shard
        return {k: data[k] for k in data.files}


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: the model


def fit_model(p: Plan) -> ModelRef:
    """The user's model as given, or the cross-fitted probe trained on the ingested images."""
    config = p.config
    device = resolve_device(config.device)
    if config.model.path is not None:
        model, _ = load_user_model(config.model.path, config.model.arch, len(p.labels))
        model.to(device)
        example = p.spec.normalise(
            torch.zeros(1, p.spec.channels, p.spec.size, p.spec.size, dtype=torch.uint8, device=device)
        )
        layer = (
            describe_layer(model, config.model.target_layer, example)
            if config.model.target_layer
            else find_target_layer(model, example)
        )
        return ModelRef(
            kind="user",
            arch=config.model.arch or "torchscript",
            target_layer=layer,
            spec=p.spec,
            path=config.model.path,
            num_classes=len(p.labels),
        )
    works = [_load_work(config.out, s.index) for s in p.shards]
    inputs = np.concatenate([w["inputs"] for w in works])
    if len(inputs) == 0:
        raise DataError("no image of the dataset could be read (see the errors table); nothing to audit")
    image_ids = [str(i) for w in works for i in w["image_id"]]
    groups = [g if g is None else str(g) for w in works for g in w["group"]]
    labels = np.array([p.labels.index(str(label)) for w in works for label in w["label"]])
    counts = np.bincount(labels, minlength=len(p.labels))
    if (counts == 0).any():
        missing = [p.labels[i] for i in np.flatnonzero(counts == 0)]
        raise DataError(f"no readable image for label(s) {missing}; a probe needs images of every class")
    folds = assign_folds(image_ids, groups, config.probe.folds)
    log.info(
        "training the probe: %d images, %d folds, %d epochs, %d px",
        len(inputs),
        config.probe.folds,
        config.probe.epochs,
        config.probe.image_size,
    )
    result = train_probe(inputs, labels, folds, len(p.labels), config.probe, device, progress=log.info)
    path = config.out / "work" / "probe.pt"
    save_probe(result, str(path))
    final = [h for h in result.history if h["epoch"] == config.probe.epochs]
    return ModelRef(
        kind="probe",
        arch="probe-cnn",
        target_layer=TargetLayer("features"),
        spec=result.spec,
        path=path,
        num_classes=len(p.labels),
        folds=config.probe.folds,
        info={"train_accuracy": [round(h["train_accuracy"], 4) for h in final]},
    )


def load_models(ref: ModelRef, p: Plan, device: torch.device) -> list[torch.nn.Module]:
    """The model(s) of ``ref`` on ``device``: one per fold for the probe."""
    if ref.kind == "user":
        model, _ = load_user_model(ref.path, None if ref.arch == "torchscript" else ref.arch, ref.num_classes)
        return [model.to(device)]
    states = torch.load(ref.path, map_location="cpu", weights_only=True)
    models = []
    for k in range(ref.folds):
        model = ProbeNet(ref.num_classes, width=p.config.probe.width)
        model.load_state_dict(states[f"fold{k}"])
        model.eval().requires_grad_(False)
        models.append(model.to(device))
    return models


SANITY_IMAGES = 16


def check_sanity(p: Plan, ref: ModelRef) -> list[dict]:
    """The model-randomisation check (Adebayo et al. 2018) of every method, on up to 16 images of the first shard.

    Writes ``tables/sanity`` and returns its rows.
    """
    from audit.saliency.sanity import randomisation_check

    config = p.config
    device = resolve_device(config.device)
    work = _load_work(config.out, p.shards[0].index)
    inputs = torch.from_numpy(work["inputs"][:SANITY_IMAGES]).to(device)
    rows = []
    if len(inputs):
        model = load_models(ref, p, device)[0]
        options = SaliencyOptions(**config.saliency.model_dump())
        for r in randomisation_check(model, ref.target_layer, ref.spec.normalise(inputs), config.methods, options):
            rows.append(
                {
                    "method": r.method,
                    "n_images": len(inputs),
                    "rank_correlation": r.rank_correlation,
                    "passed": r.passed,
                    "randomised": ",".join(r.randomised),
                }
            )
            log.info(
                "sanity check %s: rank correlation %.2f after randomising the top layers: %s",
                r.method,
                r.rank_correlation,
                "passed" if r.passed else "FAILED (the map ignores the model)",
            )
    write_part(config.out, "sanity", rows_to_table("sanity", rows), "00000")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Stage 4: explain


def _box_tensors(
    regions: Any, image_ids: Sequence[str], widths: np.ndarray, heights: np.ndarray, size: int, kinds: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded boxes [n, N, 4] in input pixels and kind indices [n, N] (-1 = padding) for a shard's images."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    kind_index = {k: i for i, k in enumerate(kinds)}
    rows = [[] for _ in image_ids]
    for r in regions:
        i = position.get(r["image_id"])
        if i is None or r["kind"] not in kind_index:
            continue
        sx, sy = size / widths[i], size / heights[i]
        rows[i].append((r["x0"] * sx, r["y0"] * sy, r["x1"] * sx, r["y1"] * sy, kind_index[r["kind"]]))
    width = max((len(r) for r in rows), default=0)
    boxes = torch.zeros(len(rows), width, 4)
    kind_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            values = torch.tensor(r)
            boxes[i, : len(r)] = values[:, :4]
            kind_ids[i, : len(r)] = values[:, 4].long()
    return boxes, kind_ids


def explain_shard(p: Plan, shard: Shard, ref: ModelRef) -> dict:
    """Predictions, saliency maps and region metrics for one shard, batched on the device.

    Writes ``tables/images``, ``tables/attributions`` and ``tables/maps`` parts, and the shard's per-label sums
    of small images (for the report's mean image per class).
    """
    start = time.perf_counter()
    config = p.config
    out = config.out
    device = resolve_device(config.device)
    work = _load_work(out, shard.index)
    n = len(work["inputs"])
    key = f"{shard.index:05d}"
    image_ids = [str(i) for i in work["image_id"]]
    labels = np.array([p.labels.index(str(label)) for label in work["label"]], dtype=np.int64)
    if ref.kind == "probe":  # the same deterministic assignment as in fit_model
        groups = [g if g is None else str(g) for g in work["group"]]
        folds = assign_folds(image_ids, groups, ref.folds)
    else:
        folds = np.zeros(n, dtype=np.int64)
    models = load_models(ref, p, device) if n else []
    regions = read_shard_regions(out, key)
    widths = work["width"].astype(np.float64)
    heights = work["height"].astype(np.float64)
    size = ref.spec.size
    boxes_all, kinds_all = _box_tensors(regions, image_ids, widths, heights, size, p.region_kinds)
    num_kinds = len(p.region_kinds)

    predictions = np.zeros(n, np.int64)
    confidence = np.zeros(n, np.float32)
    label_probability = np.zeros(n, np.float32)
    attribution_cols: dict[str, list] = {
        k: []
        for k in (
            "image_id",
            "method",
            "region_kind",
            "target",
            "present",
            "mass_fraction",
            "area_fraction",
            "enrichment",
            "pointing_hit",
            "rank_accuracy",
        )
    }
    map_cols: dict[str, list] = {k: [] for k in ("image_id", "method", "map_u8", "map_size", "map_scale", "raw_sum")}
    counterfactual_cols: dict[str, list] = {name: [] for name in TABLES["counterfactuals"].names}
    options = SaliencyOptions(**config.saliency.model_dump())
    methods = [build_methods(config.methods, model, ref.target_layer, options) for model in models]
    inputs_all = torch.from_numpy(work["inputs"])
    for start_index in range(0, n, config.batch_size):
        stop = min(n, start_index + config.batch_size)
        x_u8 = inputs_all[start_index:stop].to(device, non_blocking=True)
        x = ref.spec.normalise(x_u8)
        batch_folds = torch.from_numpy(folds[start_index:stop])
        for k in range(len(models)):
            # Cross-fitting: each image is explained by the fold model that did not train on it.
            local = torch.nonzero(batch_folds == k).flatten()
            if len(local) == 0:
                continue
            index = (local + start_index).numpy()
            xs = x[local.to(device)]
            target = None
            if config.target == "label":
                target = torch.from_numpy(labels[index]).to(device)
            elif config.target != "predicted":
                target = torch.full((len(index),), p.labels.index(config.target), dtype=torch.long, device=device)
            masks = boxes_to_masks(boxes_all[index].to(device), kinds_all[index].to(device), num_kinds, size, size)
            masks = _with_user_masks(masks, torch.from_numpy(work["masks"][index]).to(device), p)
            results = explain(methods[k], xs, target)
            if config.counterfactual.enabled and num_kinds:
                # Dependence: the first method's targets and clean logits; the removed and control images of the
                # batch go through the same fold model.
                first = results[config.methods[0]]
                batch = counterfactual_batch(
                    models[k],
                    x_u8[local.to(device)],
                    ref.spec.normalise,
                    masks,
                    first.targets,
                    first.logits,
                    fills=config.counterfactual.fills,
                    seed=config.findings.seed,
                    max_batch=config.counterfactual.max_batch,
                )
                _append_counterfactuals(
                    counterfactual_cols, batch, [image_ids[i] for i in index], p.region_kinds, first.targets
                )
            for name, result in results.items():
                if name == config.methods[0]:
                    probs = torch.softmax(result.logits.float(), dim=1)
                    conf, pred = probs.max(1)
                    predictions[index] = pred.cpu().numpy()
                    confidence[index] = conf.cpu().numpy()
                    label_probability[index] = (
                        probs.gather(1, torch.from_numpy(labels[index]).to(device).view(-1, 1))[:, 0].cpu().numpy()
                    )
                metrics = region_metrics(result.maps, masks)
                small, scale = downsample_maps(result.maps, config.map_size)
                # Only [b, K] numbers and small maps leave the device.
                fields = {
                    f: getattr(metrics, f).cpu().numpy()
                    for f in ("mass_fraction", "area_fraction", "enrichment", "pointing_hit", "rank_accuracy")
                }
                targets = result.targets.cpu().numpy()
                b = len(index)
                ids = [image_ids[i] for i in index]
                attribution_cols["image_id"] += [i for i in ids for _ in range(num_kinds)]
                attribution_cols["method"] += [name] * (b * num_kinds)
                attribution_cols["region_kind"] += list(p.region_kinds) * b
                attribution_cols["target"] += np.repeat(targets, num_kinds).tolist()
                attribution_cols["present"] += (~np.isnan(fields["area_fraction"])).reshape(-1).tolist()
                for f, values in fields.items():
                    attribution_cols[f] += values.reshape(-1).tolist()
                map_cols["image_id"] += ids
                map_cols["method"] += [name] * b
                map_cols["map_u8"] += list(small.cpu().numpy().reshape(b, -1))
                map_cols["map_size"] += [config.map_size] * b
                map_cols["map_scale"] += scale.cpu().numpy().tolist()
                map_cols["raw_sum"] += result.raw_sum.cpu().numpy().tolist()

    images = {
        "image_id": image_ids,
        "path": [str(v) for v in work["path"]],
        "label": [str(v) for v in work["label"]],
        "label_index": labels.tolist(),
        "split": [None if v is None else str(v) for v in work["split"]],
        "group": [None if v is None else str(v) for v in work["group"]],
        "width": widths.astype(int).tolist(),
        "height": heights.astype(int).tolist(),
        "channels": work["channels"].astype(int).tolist(),
        "fold": (folds if ref.kind == "probe" else np.full(n, -1)).tolist(),
        "prediction": [p.labels[i] for i in predictions],
        "prediction_index": predictions.tolist(),
        "confidence": confidence.tolist(),
        "label_probability": label_probability.tolist(),
        "correct": (predictions == labels).tolist(),
        "shard": [shard.index] * n,
    }
    write_part(out, "images", rows_to_table("images", images), key)
    write_part(out, "attributions", rows_to_table("attributions", attribution_cols), key)
    write_part(out, "maps", rows_to_table("maps", map_cols), key)
    write_part(out, "counterfactuals", rows_to_table("counterfactuals", counterfactual_cols), key)
    _write_mean_images(out, key, work["inputs"], labels, len(p.labels))
    seconds = time.perf_counter() - start
    log.info("explain shard %d: %d images (%.1f img/s)", shard.index, n, n / max(seconds, 1e-9))
    return {"shard": shard.index, "images": n, "seconds": seconds}


def _append_counterfactuals(
    columns: dict[str, list],
    batch: CounterfactualBatch,
    image_ids: Sequence[str],
    kinds: Sequence[str],
    targets: torch.Tensor,
) -> None:
    """Add one batch's counterfactual rows (image, kind, fill) to the shard's columns; ``targets`` long [b]."""
    columns["image_id"] += [image_ids[i] for i in batch.image_index]
    columns["region_kind"] += [kinds[k] for k in batch.kind_index]
    columns["fill"] += [str(f) for f in batch.fill]
    columns["target"] += targets.cpu().numpy()[batch.image_index].astype(int).tolist()
    for name in ("area_fraction", "prob_clean", "prob_removed", "prob_control"):
        columns[name] += np.asarray(getattr(batch, name), dtype=np.float64).tolist()
    for name in ("flip_removed", "flip_control", "control_found"):
        columns[name] += np.asarray(getattr(batch, name), dtype=bool).tolist()


def _with_user_masks(masks: torch.Tensor, file_masks: torch.Tensor, p: Plan) -> torch.Tensor:
    """Add the user's mask files to the box masks, and derive ``outside_<expected>``.

    Args:
        masks: bool [b, K, S, S] from the boxes (detected and user-given), kinds in ``p.region_kinds`` order.
        file_masks: uint8 [b, M, S, S], one channel per ``p.user.mask_kinds``.
    """
    for k, kind in enumerate(p.user.mask_kinds):
        masks[:, p.region_kinds.index(kind)] |= file_masks[:, k].bool()
    if p.user.expected:
        expected = masks[:, p.region_kinds.index(p.user.expected)]
        present = expected.flatten(1).any(1)[:, None, None]  # images without the expected region: kind absent
        masks[:, p.region_kinds.index(f"outside_{p.user.expected}")] = ~expected & present
    return masks


def read_shard_regions(out: Path, key: str) -> list[dict]:
    """The shard's regions: per-image detections and user regions, and the dataset-level watermark detections."""
    import pyarrow.parquet as pq

    rows = []
    for name in (f"part-{key}.parquet", f"part-watermark-{key}.parquet"):
        path = out / "tables" / "regions" / name
        if path.exists():
            rows.extend(pq.read_table(path).to_pylist())
    return rows


def _write_mean_images(out: Path, key: str, inputs: np.ndarray, labels: np.ndarray, num_labels: int) -> None:
    """Per-label sums of the images at a small size, so the report's mean image never needs all images at once."""
    sums = np.zeros((num_labels, MEAN_IMAGE_SIZE, MEAN_IMAGE_SIZE), np.float64)
    counts = np.zeros(num_labels, np.int64)
    if len(inputs):
        small = torch.nn.functional.adaptive_avg_pool2d(
            torch.from_numpy(inputs).float().mean(1, keepdim=True), MEAN_IMAGE_SIZE
        )[:, 0].numpy()
        np.add.at(sums, labels, small)
        counts = np.bincount(labels, minlength=num_labels)
    path = out / "work" / f"means-{key}.npz"
    np.savez(path.with_suffix(".tmp.npz"), sums=sums, counts=counts)
    path.with_suffix(".tmp.npz").replace(path)


# ----------------------------------------------------------------------------------------------------------------
# Stage 5: summarise


def summarise(p: Plan, ref: ModelRef) -> dict:
    """Findings, the DuckDB catalog, ``summary.json`` and the HTML report. Returns the summary."""
    from audit.report.build import build_report_content
    from audit.report.html import write_report

    config = p.config
    out = config.out
    images = read_table(out, "images")
    attributions = read_table(out, "attributions")
    errors = read_table(out, "errors")
    label_of = dict(zip(images.column("image_id").to_pylist(), images.column("label").to_pylist(), strict=True))
    group_of = dict(zip(images.column("image_id").to_pylist(), images.column("group").to_pylist(), strict=True))
    attribution_ids = attributions.column("image_id").to_pylist()
    columns = AttributionColumns(
        label=np.array([label_of[i] for i in attribution_ids], dtype=object),
        method=np.array(attributions.column("method").to_pylist(), dtype=object),
        region_kind=np.array(attributions.column("region_kind").to_pylist(), dtype=object),
        present=attributions.column("present").to_numpy(zero_copy_only=False).astype(bool),
        mass=attributions.column("mass_fraction").to_numpy(zero_copy_only=False).astype(np.float64),
        area=attributions.column("area_fraction").to_numpy(zero_copy_only=False).astype(np.float64),
        hit=attributions.column("pointing_hit").to_numpy(zero_copy_only=False).astype(np.float64),
        rank=attributions.column("rank_accuracy").to_numpy(zero_copy_only=False).astype(np.float64),
        group=np.array([group_of[i] for i in attribution_ids], dtype=object),
    )
    regions = read_table(out, "regions")
    sanity = read_table(out, "sanity").to_pylist()
    dependence = dependence_by_key(
        read_table(out, "counterfactuals"),
        images,
        config.counterfactual.fills[0],
        config.findings.bootstrap,
        config.findings.seed,
    )
    leakage = leakage_rows(images, regions, p.region_kinds, p.labels, config)
    write_part(out, "leakage", rows_to_table("leakage", leakage), "00000")
    findings = compute_findings(
        columns,
        config.findings,
        dependence=dependence,
        leakage=leakage_by_key(leakage),
        sanity={r["method"]: bool(r["passed"]) for r in sanity},
    )
    correct = images.column("correct").to_numpy(zero_copy_only=False).astype(bool)
    above_chance, chance_sentence = accuracy_above_chance(
        correct, images.column("label").to_numpy(zero_copy_only=False)
    )
    if not above_chance:
        log.warning("the model is no better than chance (%s): shortcut verdicts are capped at watch", chance_sentence)
        cap_at_watch(findings, chance_sentence)
    clusters: list[dict] = []
    if config.discovery.enabled:
        _, clusters = discovered_clusters(read_table(out, "maps"), attributions, images, regions, p.labels, config)
    write_part(out, "clusters", rows_to_table("clusters", clusters), "00000")
    write_part(out, "findings", rows_to_table("findings", findings), "00000")
    build_catalog(out)

    verdict = overall_verdict(findings)
    accuracy = float(correct.mean()) if len(correct) else None
    model_info = {
        "kind": ref.kind,
        "arch": ref.arch,
        "target_layer": ref.target_layer.name,
        "input_size": ref.spec.size,
        "heldout_accuracy" if ref.kind == "probe" else "accuracy": accuracy,
        "above_chance": above_chance,
        "accuracy_check": chance_sentence,
    }
    for r in sanity:
        model_info[f"sanity check: {r['method']}"] = (
            f"{'passed' if r['passed'] else 'FAILED'} (rank correlation {r['rank_correlation']:.2f} after randomising "
            "the top layers; below 0.5 passes)"
        )
    if ref.kind == "probe":
        model_info["folds"] = ref.folds
        model_info["train_accuracy"] = ref.info.get("train_accuracy")
    counts = {
        "files": sum(len(s.entries) for s in p.shards),
        "images": images.num_rows,
        "errors": errors.num_rows,
        "classes": len(p.labels),
        "regions": regions.num_rows,
        "findings": len(findings),
        "clusters": len(clusters),
        "suspicious_clusters": sum(c["suspicious"] for c in clusters),
        "by_verdict": {v: sum(f["verdict"] == v for f in findings) for v in ("none", "watch", "shortcut")},
    }
    summary = {
        "schema_version": 2,
        "verdict": verdict,
        "gate": {"fail_on": config.fail_on, "failed": gate_failed(verdict, config.fail_on)} if config.fail_on else None,
        "findings": [_json_safe(f) for f in findings],
        "counts": counts,
        "model": model_info,
        "methods": list(config.methods),
        "sanity": [_json_safe(r) for r in sanity],
        "leakage": [_json_safe(r) for r in leakage if r["group"] is None],
        "clusters": [_json_safe({k: v for k, v in c.items() if k != "mean_map_u8"}) for c in clusters],
        "region_kinds": list(p.region_kinds),
        "labels": list(p.labels),
        "duration_seconds": round(time.time() - p.started, 1),
        "versions": versions(),
    }
    summary_path = out / "summary.json"
    summary_path.with_suffix(".json.tmp").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    summary_path.with_suffix(".json.tmp").replace(summary_path)
    content = build_report_content(p, summary, flatten(config))
    write_report(content, out / "index.html")
    log.info("verdict: %s; report: %s", verdict, out / "index.html")
    return summary


def _json_safe(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}


def versions() -> dict[str, str]:
    import duckdb
    import timm

    return {
        "shortcut-audit": audit.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "duckdb": duckdb.__version__,
        "cuda": torch.version.cuda or "none",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


# ----------------------------------------------------------------------------------------------------------------
# Wiring


def run_pipeline(config: AuditConfig, runner: Runner | None = None) -> dict:
    """Run every stage; returns the summary (also written to ``OUT/summary.json``)."""
    runner = runner or LocalRunner(config.workers)
    p: Plan = runner.call(plan, config)
    runner.map(ingest_shard, [(p, s) for s in p.shards])
    runner.call(detect_watermarks, p)
    ref: ModelRef = runner.call(fit_model, p)
    runner.map(explain_shard, [(p, s, ref) for s in p.shards])
    runner.call(check_sanity, p, ref)
    return runner.call(summarise, p, ref)


__all__ = [
    "check_sanity",
    "detect_watermarks",
    "Plan",
    "Shard",
    "ModelRef",
    "Runner",
    "LocalRunner",
    "plan",
    "ingest_shard",
    "fit_model",
    "explain_shard",
    "summarise",
    "run_pipeline",
    "asdict",
]
