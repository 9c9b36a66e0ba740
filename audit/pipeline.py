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
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import pyarrow.compute as pc
import torch

import audit
from audit.config import AuditConfig, flatten
from audit.data.decode import DecodedImage, content_hash, read_file, read_image
from audit.data.manifest import Manifest, ManifestEntry, build_manifest, safe_join
from audit.device import resolve_device
from audit.errors import AuditError, ConfigError, DataError, ModelError
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
from audit.evidence.header import burned_in_by_class
from audit.history import compare_runs, load_previous_summary, record_run
from audit.metrics.regions import boxes_to_masks, downsample_maps, region_metrics
from audit.models.layers import TargetLayer, describe_layer, find_target_layer
from audit.models.loading import OutputMap, is_scripted, load_user_model, model_output_count, resolve_outputs
from audit.models.preprocessing import InputSpec
from audit.models.probe import ProbeNet, assign_folds, key_hash, probe_input_spec, save_probe, train_probe
from audit.progress import ShardProgress
from audit.regions import DETECTORS, Detection
from audit.regions.base import to_gray
from audit.regions.cache import RegionCache, default_cache_dir
from audit.regions.user import UserRegions, load_user_regions
from audit.saliency import SaliencyOptions, build_methods, explain, validate_methods
from audit.store.catalog import build_catalog
from audit.store.parquet import read_rows, read_table, rows_to_table, write_part
from audit.store.schemas import TABLES
from audit.store.state import (
    RunState,
    assign_shards,
    entry_key,
    file_fingerprint,
    file_stat,
    fingerprint,
    plan_record,
    read_json,
    write_json_atomic,
)

log = logging.getLogger("audit.pipeline")

MEAN_IMAGE_SIZE = 64
# Part of every stage fingerprint: raised when a stage's outputs change form, so that an output folder written by an
# older version is computed again instead of being mixed with new outputs.
OUTPUT_VERSION = 3


# ----------------------------------------------------------------------------------------------------------------
# Plain data passed between stages (small and picklable, so a distributed task runner can ship it).


@dataclass(frozen=True)
class Shard:
    index: int
    entries: tuple[ManifestEntry, ...]


@dataclass(frozen=True)
class Plan:
    """What every stage needs to know about the run. ``shards`` (the file lists) is only in the flow process's
    copy: the copy shipped to shard tasks (:meth:`light`) leaves it out, since each task gets its own shard."""

    config: AuditConfig
    root: Path
    labels: tuple[str, ...]
    shards: tuple[Shard, ...]
    region_kinds: tuple[str, ...]
    spec: InputSpec
    started: float
    user: UserRegions = field(default_factory=UserRegions)
    shard_ids: tuple[int, ...] = ()  # indices of the plan's shards, in order
    n_files: int = 0
    class_counts: tuple[int, ...] = ()  # files per label, in ``labels`` order
    user_key: str = ""  # fingerprint of the user's boxes and mask files
    outputs: OutputMap | None = None  # the user model's output index of each label (None: the probe)

    def light(self) -> Plan:
        return replace(self, shards=())


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
    key: str = ""  # fingerprint of the model's weights and input settings: explained results depend on it


class Runner(Protocol):
    """How stages run: ``map`` applies a stage to many argument tuples (calling ``on_result`` with each result as
    it arrives, in any order) and returns the results in the order of ``items``; ``call`` runs one."""

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple], on_result: Callable[[Any], None] | None = None
    ) -> list[Any]: ...

    def call(self, fn: Callable[..., Any], *args: Any) -> Any: ...


class LocalRunner:
    """Runs stages in this process; ``workers`` > 1 maps shards on a thread pool (OpenCV and torch release the GIL)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple], on_result: Callable[[Any], None] | None = None
    ) -> list[Any]:
        report = on_result or (lambda _result: None)
        if self.workers <= 1 or len(items) <= 1:
            results = []
            for args in items:
                results.append(fn(*args))
                report(results[-1])
            return results
        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(fn, *args) for args in items]
            for future in as_completed(futures):
                report(future.result())
            return [f.result() for f in futures]

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
    manifest: Manifest = build_manifest(config.data, config.manifest, config.finding)
    if config.target not in ("predicted", "label") and config.target not in manifest.labels:
        raise ConfigError(
            f"target {config.target!r} is neither 'predicted', 'label' nor a class of the dataset "
            f"({', '.join(manifest.labels)})"
        )
    if config.model.path is not None:
        num_outputs = config.model.num_outputs
        if num_outputs is None and (config.model.outputs or config.model.multilabel):
            num_outputs = model_output_count(config.model.path, config.model.arch)  # a mapping may leave some out
        outputs = resolve_outputs(
            manifest.labels, config.model.outputs, num_outputs, config.model.multilabel, config.finding
        )
        model, spec = load_user_model(config.model.path, config.model.arch, outputs)
        if is_scripted(model):
            _scripted_model_layer(config.methods)  # fails now, before any image is read, for a layer method
        del model
        if config.model.image_size:
            spec = InputSpec(config.model.image_size, spec.channels, spec.mean, spec.std)
    else:
        outputs = None
        spec = probe_input_spec(config.probe)
    user = load_user_regions(config.regions.user_boxes, config.regions.user_masks, config.regions.expected)
    kinds = region_kinds(config.regions.detectors) + (("watermark",) if config.regions.watermark else ())
    kinds = (*kinds, *(k for k in user.kinds if k not in kinds))
    config.out.mkdir(parents=True, exist_ok=True)
    _remove_temporary_files(config.out)
    # Keep the shards of the previous plan whose files are all still listed (resume, incremental audits).
    plan_file = config.out / "work" / "plan.json"
    previous = read_json(plan_file)
    previous_shards = previous.get("shards") if isinstance(previous, dict) else None
    cut = assign_shards(manifest.entries, previous_shards, config.shard_size)
    shards = tuple(Shard(i, entries) for i, entries in cut)
    write_json_atomic(plan_file, {"shards": plan_record(cut)})
    # Rows of the manifest that were refused (a path out of the dataset root) are errors of this run.
    refused = [{"path": path, "stage": "manifest", "message": message} for path, message in manifest.refused]
    write_part(config.out, "errors", rows_to_table("errors", refused), "manifest")
    _remove_outputs_of_other_shards(config.out, {s.index for s in shards})
    counts = [0] * len(manifest.labels)
    for entry in manifest.entries:
        counts[manifest.labels.index(entry.label)] += 1
    log.info(
        "dataset %s: %d files, %d labels, %d shards (%d kept from the previous plan)",
        config.data,
        len(manifest.entries),
        len(manifest.labels),
        len(shards),
        sum(1 for i, _ in cut if i < len(previous_shards or ())),
    )
    return Plan(
        user=user,
        config=config,
        root=manifest.root,
        labels=manifest.labels,
        shards=shards,
        region_kinds=kinds,
        spec=spec,
        started=time.time(),
        shard_ids=tuple(s.index for s in shards),
        n_files=len(manifest.entries),
        class_counts=tuple(counts),
        user_key=_user_regions_key(user),
        outputs=outputs,
    )


# Per-shard outputs (``{key}`` = the shard index, 5 digits); the dataset-level tables are rewritten every run.
SHARD_OUTPUTS = (
    "tables/regions/part-{key}.parquet",
    "tables/regions/part-watermark-{key}.parquet",
    "tables/errors/part-ingest-{key}.parquet",
    "tables/images/part-{key}.parquet",
    "tables/attributions/part-{key}.parquet",
    "tables/maps/part-{key}.parquet",
    "tables/counterfactuals/part-{key}.parquet",
    "work/shard-{key}.npz",
    "work/means-{key}.npz",
    "work/done/ingest-{key}.json",
    "work/done/explain-{key}.json",
)


def _remove_outputs_of_other_shards(out: Path, shards: set[int]) -> None:
    """Delete every per-shard output of a shard that is not in the plan (a dissolved shard's, or a shard of an
    earlier plan whose clean-up was interrupted), so its rows leave the tables."""
    for pattern in SHARD_OUTPUTS:
        head, tail = pattern.split("{key}")
        for path in out.glob(pattern.format(key="[0-9][0-9][0-9][0-9][0-9]")):
            index = path.as_posix()[len((out / head).as_posix()) : -len(tail)]
            if index.isdigit() and int(index) not in shards:
                path.unlink(missing_ok=True)


def _remove_temporary_files(out: Path) -> None:
    """Leftovers of a run killed while writing (``.*.tmp``, ``*.tmp.npz``); the files they were to replace are
    either complete or absent, so these are never needed."""
    for folder in (out / "tables", out / "work"):
        if folder.is_dir():
            for path in [*folder.rglob(".*.tmp"), *folder.rglob("*.tmp.npz")]:
                path.unlink(missing_ok=True)


def _user_regions_key(user: UserRegions) -> str:
    """What the user's regions depend on: the boxes, and the size and time of every mask file."""
    masks = []
    if user.masks_root is not None:
        for path in sorted(user.masks_root.rglob("*")):
            if path.is_file():
                masks.append((path.relative_to(user.masks_root).as_posix(), file_stat(path)))
    return fingerprint(sorted(user.boxes.items()), masks, user.mask_kinds, user.expected)


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


def _read_image(p: Plan, entry: ManifestEntry, errors: list[dict]) -> tuple[bytes, DecodedImage] | None:
    """The file's bytes and decoded image, or None (and a row in ``errors``) when it cannot be read."""
    try:
        data = read_file(safe_join(p.root, entry.path), entry.path)
    except FileNotFoundError:
        errors.append({"path": entry.path, "stage": "read", "message": f"{entry.path}: file not found"})
        return None
    except IsADirectoryError:
        errors.append({"path": entry.path, "stage": "read", "message": f"{entry.path}: a folder, not a file"})
        return None
    except (AuditError, OSError) as exc:
        errors.append({"path": entry.path, "stage": "read", "message": str(exc)})
        return None
    try:
        return data, read_image(data, entry.path)
    except AuditError as exc:
        errors.append({"path": entry.path, "stage": "decode", "message": str(exc)})
    except Exception as exc:  # noqa: BLE001 (read_image turns known failures into DecodeError; this is a backstop)
        errors.append({"path": entry.path, "stage": "decode", "message": f"{entry.path}: {type(exc).__name__}: {exc}"})
    return None


# What ingest keeps per image in the shard's work file, for the images table (README, "Outputs and tables").
WORK_FIELDS = (
    "image_id",
    "path",
    "label",
    "split",
    "group",
    "patient_id",
    "width",
    "height",
    "original_width",
    "original_height",
    "channels",
    "format",
    "bits",
    "modality",
    "pixel_spacing_x_mm",
    "pixel_spacing_y_mm",
    "burned_in_annotation",
)


def _work_row(entry: ManifestEntry, image_id: str, decoded: DecodedImage) -> dict[str, object]:
    height, width = decoded.pixels.shape[:2]
    return {
        "image_id": image_id,
        "path": entry.path,
        "label": entry.label,
        "split": entry.split,
        "group": entry.group,
        "patient_id": entry.patient_id,
        "width": width,
        "height": height,
        "original_width": decoded.original_width,
        "original_height": decoded.original_height,
        "channels": 1 if decoded.pixels.ndim == 2 else decoded.pixels.shape[2],
        "format": decoded.format,
        "bits": decoded.bits,
        "modality": decoded.metadata.get("modality"),
        "pixel_spacing_x_mm": decoded.metadata.get("pixel_spacing_x_mm"),
        "pixel_spacing_y_mm": decoded.metadata.get("pixel_spacing_y_mm"),
        "burned_in_annotation": decoded.metadata.get("burned_in_annotation"),
    }


def _ingest_image(
    p: Plan,
    entry: ManifestEntry,
    image_id: str,
    decoded: DecodedImage,
    detectors: dict[str, Any],
    cached: dict[str, dict[str, list[Detection]]],
    fresh: dict[str, dict[str, list[Detection]]],
    errors: list[dict],
) -> tuple[list[dict], int, np.ndarray, np.ndarray]:
    """One decoded image's regions (detected or cached, plus the user's), user masks (uint8 [M, S, S]) and
    model input (uint8 [C, S, S]); the number of detector calls made."""
    image = decoded.pixels
    height, width = image.shape[:2]
    rows: list[dict] = []
    calls = 0
    gray = None
    for name, detector in detectors.items():
        found = cached[name].get(image_id)
        if found is None:
            gray = to_gray(image) if gray is None else gray
            try:
                found = detector.detect(gray)
            except Exception as exc:  # noqa: BLE001 (a detector bug must not lose the image's other results)
                errors.append(
                    {"path": entry.path, "stage": "regions", "message": f"{name}: {type(exc).__name__}: {exc}"}
                )
                continue
            calls += 1
            fresh[name][image_id] = found
        rows.extend(_region_row(image_id, entry.path, d) for d in found)
    # The user's boxes are in the file's pixels; a downscaled image's regions are in its own.
    rows.extend(_region_row(image_id, entry.path, _scaled(d, decoded.scale)) for d in p.user.detections(entry.path))
    file_masks = p.user.masks(entry.path, height, width)
    stack = np.zeros((len(p.user.mask_kinds), p.spec.size, p.spec.size), np.uint8)
    for k, kind in enumerate(p.user.mask_kinds):
        if kind in file_masks:
            ys, xs = np.nonzero(file_masks[kind])
            if len(xs):
                box = Detection(
                    kind, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, 1.0, "user-masks", "1"
                )
                rows.append(_region_row(image_id, entry.path, box))
            stack[k] = cv2.resize(
                file_masks[kind].astype(np.uint8), (p.spec.size, p.spec.size), interpolation=cv2.INTER_NEAREST
            )
    return rows, calls, stack, p.spec.resize(image)


def _scaled(d: Detection, scale: tuple[float, float]) -> Detection:
    """A box in the file's pixels, in the pixels of the image as downscaled by (x, y) ``scale``; never empty."""
    sx, sy = scale
    if (sx, sy) == (1.0, 1.0):
        return d
    return replace(
        d,
        x0=int(d.x0 * sx),
        y0=int(d.y0 * sy),
        x1=max(int(d.x0 * sx) + 1, round(d.x1 * sx)),
        y1=max(int(d.y0 * sy) + 1, round(d.y1 * sy)),
    )


def _shard_hashes(p: Plan, shard: Shard) -> list[str]:
    """Content hashes of the shard's readable files, to look their regions up before decoding anything."""
    hashes = []
    for entry in shard.entries:
        try:
            hashes.append(content_hash(read_file(safe_join(p.root, entry.path), entry.path)))
        except (AuditError, OSError):
            continue  # reported when the file is read for real
    return hashes


def _ingest_key(p: Plan, shard: Shard, stats: list) -> str:
    """What a shard's ingest outputs depend on: its files (and their sizes and times), the detectors, the input
    size and the user's regions."""
    detectors = [(name, DETECTORS.get(name).version) for name in p.config.regions.detectors]
    return fingerprint(
        "ingest",
        OUTPUT_VERSION,
        [entry_key(e) for e in shard.entries],
        stats,
        detectors,
        (p.spec.size, p.spec.channels),
        p.user_key,
    )


def ingest_shard(p: Plan, shard: Shard) -> dict:
    """Read, hash, decode, detect regions and resize every image of one shard.

    Detections come from the region cache when this detector version has seen the same image content before
    (README, "Regions"); new ones are added to it. Writes ``tables/regions`` and ``tables/errors`` parts and a
    work file with the resized inputs (uint8 [n, C, S, S]) and user masks (uint8 [n, M, S, S]) for the model
    stages. Returns counts, including how many detector calls were made.

    Skipped (``skipped: True``) when this shard was ingested before with the same files, sizes, modification
    times and settings (README, "Resume and incremental audits").
    """
    start = time.perf_counter()
    config = p.config
    out = config.out
    state = RunState(out)
    shard_name = f"{shard.index:05d}"
    stats = [file_stat(_safe_path(p.root, e.path)) for e in shard.entries]
    ingest_key = _ingest_key(p, shard, stats)
    done = state.done("ingest", shard_name, ingest_key)
    if done is not None:
        return {
            **done["counts"],
            "shard": shard.index,
            "files": len(shard.entries),
            "detector_calls": 0,
            "skipped": True,
        }
    errors: list[dict] = []
    regions: list[dict] = []
    meta: dict[str, list] = {k: [] for k in WORK_FIELDS}
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
        data, decoded = read
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
        try:
            # Everything of one image is built before any of it is kept: a failure costs this image only.
            found_rows, calls_made, stack, resized = _ingest_image(
                p, entry, image_id, decoded, detectors, cached, fresh, errors
            )
        except Exception as exc:  # noqa: BLE001 (a bug or a hostile file must not lose the shard's other images)
            errors.append({"path": entry.path, "stage": "ingest", "message": f"{type(exc).__name__}: {exc}"})
            continue
        seen.add(image_id)
        calls += calls_made
        regions.extend(found_rows)
        masks.append(stack)
        inputs.append(resized)
        for key, value in _work_row(entry, image_id, decoded).items():
            meta[key].append(value)
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
    counts = {"images": len(inputs), "errors": len(errors), "regions": len(regions)}
    state.mark(
        "ingest",
        shard_name,
        ingest_key,
        [work, *(out / pattern.format(key=shard_name) for pattern in SHARD_OUTPUTS[:1] + SHARD_OUTPUTS[2:3])],
        counts=counts,
        image_ids=meta["image_id"],
    )
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
    return {**counts, "shard": shard.index, "files": len(shard.entries), "detector_calls": calls, "skipped": False}


def _safe_path(root: Path, relative: str) -> Path:
    """``safe_join``, or the plain join when the path is refused (the refusal is reported when it is read)."""
    try:
        return safe_join(root, relative)
    except AuditError:
        return root / "__refused__"


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
    ``watermark-<shard>`` (one per shard, possibly empty) and ``work/watermark.json``. Skipped when no shard's
    images changed since the watermark record was written. Returns what was found.
    """
    from audit.regions.watermark import WatermarkMatches, WatermarkStatistics, slice_fits

    config = p.config
    out = config.out
    record_path = out / "work" / "watermark.json"
    if not config.regions.watermark:
        for index in p.shard_ids:
            (out / "tables" / "regions" / f"part-watermark-{index:05d}.parquet").unlink(missing_ok=True)
        record_path.unlink(missing_ok=True)
        return {"regions": []}
    state = RunState(out)
    inputs_key = fingerprint(
        "watermark",
        OUTPUT_VERSION,
        [(i, (state.read("ingest", f"{i:05d}") or {}).get("key")) for i in p.shard_ids],
        p.labels,
    )
    previous = read_json(record_path)
    parts = [out / "tables" / "regions" / f"part-watermark-{i:05d}.parquet" for i in p.shard_ids]
    if isinstance(previous, dict) and previous.get("key") == inputs_key and all(f.exists() for f in parts):
        return previous
    stats = WatermarkStatistics(grid=p.spec.size, seed=config.findings.seed)
    # Pass 1 keeps each shard's small metadata, so pass 2 reads every work file only once more (for the pixels).
    shard_meta = []
    for index in p.shard_ids:
        work = _load_work(out, index)
        labels = np.array([p.labels.index(str(v)) for v in work["label"]], dtype=int)
        sizes = list(zip(work["width"].astype(int), work["height"].astype(int), strict=True))
        shard_meta.append((index, work["image_id"], work["path"], sizes, labels))
        if len(work["inputs"]):
            stats.add(_gray_grid(work["inputs"]), labels)
    model = stats.finish()
    found = []
    matches = [model.match(_gray_grid(_load_work(out, i)["inputs"])) for i in p.shard_ids] if model.regions else []
    fits = model.assign(WatermarkMatches.concatenate(matches).scores) if model.regions else []
    start = 0
    for j, (index, image_ids, paths, sizes, _) in enumerate(shard_meta):
        rows = []
        if model.regions:
            n = len(sizes)
            detections = model.detections(matches[j], slice_fits(fits, slice(start, start + n)), sizes)
            start += n
            rows = [
                _region_row(str(image_id), str(path), d)
                for image_id, path, found_here in zip(image_ids, paths, detections, strict=True)
                for d in found_here
            ]
        write_part(out, "regions", rows_to_table("regions", rows), f"watermark-{index:05d}")
    if model.regions:
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
    record = {"key": inputs_key, "grid": p.spec.size, "threshold": model.threshold, "regions": found}
    record = json.loads(json.dumps(record, default=float))
    write_json_atomic(record_path, record)
    return record


def fold_keys(work: dict[str, np.ndarray], rows: Any = slice(None)) -> list[str | None]:
    """What the probe's cross-fitting keeps in one fold, per work-file row: the patient when known (a patient's
    images must not be both trained on and explained), else the group/site, else None (the image's own hash
    decides). fit_model and explain_shard both call this, so an image is explained by the fold that left it out."""
    keys: list[str | None] = []
    for patient, group in zip(work["patient_id"][rows], work["group"][rows], strict=True):
        keys.append(f"patient:{patient}" if patient is not None else None if group is None else str(group))
    return keys


def _optional_strings(work: dict[str, np.ndarray], name: str) -> list[str | None]:
    return [None if v is None else str(v) for v in work[name]]


def _load_work(out: Path, shard: int, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A shard's work file, or only ``fields`` of it (an ``.npz`` reads each array only when asked)."""
    with np.load(_work_file(out, shard), allow_pickle=True) as data:  # our own file, written by ingest_shard
        return {k: data[k] for k in (data.files if fields is None else fields)}


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: the model


def fit_model(p: Plan) -> ModelRef:
    """The user's model as given, or the cross-fitted probe trained on the ingested images."""
    config = p.config
    device = resolve_device(config.device)
    if config.model.path is not None:
        model, _ = load_user_model(config.model.path, config.model.arch, p.outputs)
        model.to(device)
        example = p.spec.normalise(
            torch.zeros(1, p.spec.channels, p.spec.size, p.spec.size, dtype=torch.uint8, device=device)
        )
        if is_scripted(model):
            layer = _scripted_model_layer(config.methods)
        else:
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
            key=fingerprint(
                "user-model",
                file_fingerprint(config.model.path),
                config.model.arch,
                layer.name,
                asdict(p.spec),
                asdict(p.outputs),
            ),
        )
    return _fit_probe(p, device)


def _scripted_model_layer(methods: Sequence[str]) -> TargetLayer:
    """TorchScript modules take no forward hooks, so only input-gradient and perturbation methods can explain
    them; a layer method (Grad-CAM and kin) is refused with what to do instead."""
    from audit.saliency.base import METHODS
    from audit.saliency.engine import SMOOTH_PREFIX

    layered = [m for m in methods if METHODS.get(m.removeprefix(SMOOTH_PREFIX)).needs_layer]
    if layered:
        raise ModelError(
            f"a TorchScript model takes no forward hooks, so {', '.join(layered)} (which read a layer) cannot "
            "explain it: use input methods (--methods gradient,integrated_gradients,smoothgrad,rise,occlusion) or "
            "save a state dict with torch.save(model.state_dict(), path) and pass --arch"
        )
    return TargetLayer("")


def _probe_sample(p: Plan) -> list[tuple[int, np.ndarray]]:
    """The probe's training images: the ``probe.max_images`` images of smallest seeded hash rank (a uniform
    sample, the same whatever the file order), as (shard index, row indices) pairs, read without the pixels."""
    config = p.config
    ranks, where = [], []
    for index in p.shard_ids:
        ids = _load_work(config.out, index, ("image_id",))["image_id"]
        ranks.append(np.array([int(key_hash(f"{config.probe.seed}:{i}"), 16) for i in ids], dtype=np.uint64))
        where.append(np.stack([np.full(len(ids), index), np.arange(len(ids))], 1) if len(ids) else np.zeros((0, 2)))
    rank = np.concatenate(ranks) if ranks else np.zeros(0, np.uint64)
    position = np.concatenate(where).astype(np.int64) if where else np.zeros((0, 2), np.int64)
    chosen = position[np.sort(np.argsort(rank, kind="stable")[: config.probe.max_images])]
    return [(index, chosen[chosen[:, 0] == index, 1]) for index in p.shard_ids if (chosen[:, 0] == index).any()]


def _fit_probe(p: Plan, device: torch.device) -> ModelRef:
    """Train the cross-fitted probe on a bounded sample of the ingested images, or reuse the one trained before
    on the same sample with the same settings (``work/probe.json``)."""
    config = p.config
    sample = _probe_sample(p)
    inputs_parts, image_ids, groups, label_names = [], [], [], []
    for index, rows in sample:
        work = _load_work(config.out, index)
        inputs_parts.append(work["inputs"][rows])
        image_ids += [str(i) for i in work["image_id"][rows]]
        groups += fold_keys(work, rows)
        label_names += [str(v) for v in work["label"][rows]]
    if not image_ids:
        raise DataError("no image of the dataset could be read (see the errors table); nothing to audit")
    labels = np.array([p.labels.index(v) for v in label_names])
    counts = np.bincount(labels, minlength=len(p.labels))
    if (counts == 0).any():
        missing = [p.labels[i] for i in np.flatnonzero(counts == 0)]
        raise DataError(f"no readable image for label(s) {missing}; a probe needs images of every class")
    path = config.out / "work" / "probe.pt"
    record_path = config.out / "work" / "probe.json"
    probe_key = fingerprint(
        "probe", config.probe.model_dump(mode="json"), list(zip(image_ids, label_names, groups, strict=True))
    )
    record = read_json(record_path)
    if not (isinstance(record, dict) and record.get("key") == probe_key and path.is_file()):
        inputs = np.concatenate(inputs_parts)
        folds = assign_folds(image_ids, groups, config.probe.folds)
        log.info(
            "training the probe: %d images, %d folds, %d epochs, %d px",
            len(inputs),
            config.probe.folds,
            config.probe.epochs,
            config.probe.image_size,
        )
        result = train_probe(inputs, labels, folds, len(p.labels), config.probe, device, progress=log.info)
        del inputs
        save_probe(result, str(path))
        final = [h for h in result.history if h["epoch"] == config.probe.epochs]
        record = {
            "key": probe_key,
            "images": len(image_ids),
            "train_accuracy": [round(h["train_accuracy"], 4) for h in final],
        }
        write_json_atomic(record_path, record)
    else:
        log.info("reusing the probe trained on the same %d images with the same settings", len(image_ids))
    return ModelRef(
        kind="probe",
        arch="probe-cnn",
        target_layer=TargetLayer("features"),
        spec=probe_input_spec(config.probe),
        path=path,
        num_classes=len(p.labels),
        folds=config.probe.folds,
        info={"train_accuracy": record["train_accuracy"], "trained_on": record["images"]},
        key=fingerprint(probe_key, file_fingerprint(path)),
    )


def load_models(ref: ModelRef, p: Plan, device: torch.device) -> list[torch.nn.Module]:
    """The model(s) of ``ref`` on ``device``: one per fold for the probe."""
    if ref.kind == "user":
        model, _ = load_user_model(ref.path, None if ref.arch == "torchscript" else ref.arch, p.outputs)
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
    state = RunState(config.out)
    first = f"{p.shard_ids[0]:05d}"
    key = fingerprint(
        "sanity",
        OUTPUT_VERSION,
        ref.key,
        config.methods,
        config.saliency.model_dump(mode="json"),
        (state.read("ingest", first) or {}).get("image_ids", [])[:SANITY_IMAGES],
    )
    done = state.done("sanity", "00000", key)
    if done is not None:
        return read_table(config.out, "sanity").to_pylist()
    device = resolve_device(config.device)
    work = _load_work(config.out, p.shard_ids[0])
    inputs = torch.from_numpy(work["inputs"][:SANITY_IMAGES]).to(device)
    rows = []
    model = load_models(ref, p, device)[0] if len(inputs) else None
    if model is not None and is_scripted(model):
        # Its layers cannot be re-initialised one by one: findings show sanity_passed NULL (not checked).
        log.warning("sanity check skipped: a TorchScript model's layers cannot be randomised")
        model = None
    if model is not None:
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
    part = write_part(config.out, "sanity", rows_to_table("sanity", rows), "00000")
    state.mark("sanity", "00000", key, [part])
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

    Writes ``tables/images``, ``tables/attributions``, ``tables/maps`` and ``tables/counterfactuals`` parts, and
    the shard's per-label sums of small images (for the report's mean image per class). Skipped
    (``skipped: True``) when the shard was explained before with the same images, regions, model and settings.
    """
    start = time.perf_counter()
    config = p.config
    out = config.out
    key = f"{shard.index:05d}"
    state = RunState(out)
    ingested = state.read("ingest", key) or {}
    regions = read_shard_regions(out, key)
    rates = counterfactual_rates(p)
    explain_key = fingerprint(
        "explain",
        OUTPUT_VERSION,
        # The images (by content) and their labels, not the files' times: a touched but unchanged file is not
        # explained again.
        ingested.get("image_ids"),
        [entry_key(e) for e in shard.entries],
        p.user_key,
        ref.key,
        p.labels,
        p.region_kinds,
        rates,
        fingerprint(sorted(tuple(sorted(r.items())) for r in regions)),
        {
            name: getattr(config, name)
            for name in ("methods", "target", "map_size", "batch_size", "saliency", "counterfactual")
        },
    )
    done = state.done("explain", key, explain_key)
    if done is not None:
        return {"shard": shard.index, "images": done["images"], "seconds": 0.0, "skipped": True}
    device = resolve_device(config.device)
    work = _load_work(out, shard.index)
    n = len(work["inputs"])
    image_ids = [str(i) for i in work["image_id"]]
    labels = np.array([p.labels.index(str(label)) for label in work["label"]], dtype=np.int64)
    if ref.kind == "probe":  # the same deterministic assignment as in fit_model
        folds = assign_folds(image_ids, fold_keys(work), ref.folds)
    else:
        folds = np.zeros(n, dtype=np.int64)
    models = load_models(ref, p, device) if n else []
    in_counterfactual = counterfactual_sample(image_ids, labels, rates, config.findings.seed)
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
    map_sums = np.zeros((len(config.methods), len(p.labels), config.map_size, config.map_size), np.float64)
    options = SaliencyOptions(**config.saliency.model_dump())
    methods = [build_methods(config.methods, model, ref.target_layer, options) for model in models]
    inputs_all = torch.from_numpy(work["inputs"])
    if device.type == "cuda":  # page-locked memory: the copies below overlap the previous batch's kernels
        inputs_all = inputs_all.pin_memory()
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
            chosen = torch.from_numpy(np.flatnonzero(in_counterfactual[index])).to(device)
            if config.counterfactual.enabled and num_kinds and len(chosen):
                # Dependence: the first method's targets and clean logits; the removed and control images of the
                # batch go through the same fold model.
                first = results[config.methods[0]]
                batch = counterfactual_batch(
                    models[k],
                    x_u8[local.to(device)][chosen],
                    ref.spec.normalise,
                    masks[chosen],
                    first.targets[chosen],
                    first.logits[chosen],
                    fills=config.counterfactual.fills,
                    seed=config.findings.seed,
                    max_batch=config.counterfactual.max_batch,
                )
                _append_counterfactuals(
                    counterfactual_cols,
                    batch,
                    [image_ids[i] for i in index[chosen.cpu().numpy()]],
                    p.region_kinds,
                    first.targets[chosen],
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
                np.add.at(map_sums[config.methods.index(name)], labels[index], small.cpu().numpy() / 255.0)
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
        "split": _optional_strings(work, "split"),
        "group": _optional_strings(work, "group"),
        "patient_id": _optional_strings(work, "patient_id"),
        "width": widths.astype(int).tolist(),
        "height": heights.astype(int).tolist(),
        "original_width": work["original_width"].astype(int).tolist(),
        "original_height": work["original_height"].astype(int).tolist(),
        "channels": work["channels"].astype(int).tolist(),
        "format": [str(v) for v in work["format"]],
        "bits": work["bits"].astype(int).tolist(),
        "modality": _optional_strings(work, "modality"),
        "pixel_spacing_x_mm": [None if v is None else float(v) for v in work["pixel_spacing_x_mm"]],
        "pixel_spacing_y_mm": [None if v is None else float(v) for v in work["pixel_spacing_y_mm"]],
        "burned_in_annotation": [None if v is None else bool(v) for v in work["burned_in_annotation"]],
        "fold": (folds if ref.kind == "probe" else np.full(n, -1)).tolist(),
        "prediction": [p.labels[i] for i in predictions],
        "prediction_index": predictions.tolist(),
        "confidence": confidence.tolist(),
        "label_probability": label_probability.tolist(),
        "correct": (predictions == labels).tolist(),
        "shard": [shard.index] * n,
    }
    written = [
        write_part(out, "images", rows_to_table("images", images), key),
        write_part(out, "attributions", rows_to_table("attributions", attribution_cols), key),
        write_part(out, "maps", rows_to_table("maps", map_cols), key),
        write_part(out, "counterfactuals", rows_to_table("counterfactuals", counterfactual_cols), key),
        _write_mean_images(out, key, work["inputs"], labels, len(p.labels), map_sums),
    ]
    state.mark("explain", key, explain_key, written, images=n)  # last: the shard is done only once all is written
    seconds = time.perf_counter() - start
    log.info("explain shard %d: %d images (%.1f img/s)", shard.index, n, n / max(seconds, 1e-9))
    return {"shard": shard.index, "images": n, "seconds": seconds, "skipped": False}


def counterfactual_rates(p: Plan) -> list[float]:
    """Per class, the share of images that get the counterfactual test: 1 up to
    ``counterfactual.max_images_per_class`` images, then the largest power of ½ that keeps the expected count
    within it (powers of ½, so a growing class changes its rate, and its shards' results, only at doublings)."""
    cap = p.config.counterfactual.max_images_per_class
    return [1.0 if n <= cap else 0.5 ** int(np.ceil(np.log2(n / cap))) for n in p.class_counts]


def counterfactual_sample(
    image_ids: Sequence[str], labels: np.ndarray, rates: Sequence[float], seed: int
) -> np.ndarray:
    """bool [n]: the images in the counterfactual sample, decided by a seeded hash of the image id (not by the
    shard or the order), so a resumed or incremental run picks the same ones."""
    if not len(image_ids):
        return np.zeros(0, bool)
    u = np.array([int(key_hash(f"counterfactual:{seed}:{i}"), 16) / 2.0**64 for i in image_ids])
    return u < np.asarray(rates, dtype=np.float64)[labels]


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


def _write_mean_images(
    out: Path, key: str, inputs: np.ndarray, labels: np.ndarray, num_labels: int, map_sums: np.ndarray
) -> Path:
    """Per-label sums of the images at a small size, and of the stored maps (``map_sums``: float64
    [methods, labels, map_size, map_size], each map scaled to its own maximum), so the report's mean image and
    mean saliency per class never need all images or maps at once."""
    sums = np.zeros((num_labels, MEAN_IMAGE_SIZE, MEAN_IMAGE_SIZE), np.float64)
    counts = np.zeros(num_labels, np.int64)
    if len(inputs):
        small = torch.nn.functional.adaptive_avg_pool2d(
            torch.from_numpy(inputs).float().mean(1, keepdim=True), MEAN_IMAGE_SIZE
        )[:, 0].numpy()
        np.add.at(sums, labels, small)
        counts = np.bincount(labels, minlength=num_labels)
    path = out / "work" / f"means-{key}.npz"
    np.savez(path.with_suffix(".tmp.npz"), sums=sums, counts=counts, map_sums=map_sums)
    path.with_suffix(".tmp.npz").replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Stage 5: summarise


def summarise(p: Plan, ref: ModelRef, work: dict | None = None) -> dict:
    """Findings, the DuckDB catalog, ``summary.json`` and the HTML report. Returns the summary."""
    from audit.report.build import build_report_content
    from audit.report.html import write_report

    config = p.config
    out = config.out
    # Rows in a fixed order (by image id, not by shard), so the findings' bootstraps and samples are the same
    # whether the images came in one run or over several incremental ones.
    images = _in_image_order(read_table(out, "images"))
    attributions = _in_image_order(read_table(out, "attributions"), "method", "region_kind")
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
    regions = _in_image_order(read_table(out, "regions"), "kind", "x0", "y0", "x1", "y1", "detector")
    sanity = read_table(out, "sanity").to_pylist()
    dependence = dependence_by_key(
        _in_image_order(read_table(out, "counterfactuals"), "region_kind", "fill"),
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
        method = pc.field("method") == config.methods[0]

        def read_maps(image_ids: list[str]) -> Any:
            where = method & pc.field("image_id").isin(image_ids)
            return read_rows(out, "maps", ["image_id", "map_u8", "map_size"], where)

        _, clusters = discovered_clusters(
            _in_image_order(read_rows(out, "maps", ["image_id", "method"]), "method"),
            read_maps,
            attributions,
            images,
            regions,
            p.labels,
            config,
        )
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
        "files": p.n_files,
        "images": images.num_rows,
        "errors": errors.num_rows,
        "errors_by_stage": dict(Counter(errors.column("stage").to_pylist())),
        "classes": len(p.labels),
        "regions": regions.num_rows,
        "findings": len(findings),
        "clusters": len(clusters),
        "suspicious_clusters": sum(c["suspicious"] for c in clusters),
        "by_verdict": {v: sum(f["verdict"] == v for f in findings) for v in ("none", "watch", "shortcut")},
    }
    summary = {
        "schema_version": 3,
        "dataset": {
            "data": str(Path(config.data).resolve()),
            "manifest": str(Path(config.manifest).resolve()) if config.manifest else None,
        },
        "verdict": verdict,
        "gate": {"fail_on": config.fail_on, "failed": gate_failed(verdict, config.fail_on)} if config.fail_on else None,
        "findings": [_json_safe(f) for f in findings],
        "counts": counts,
        "model": model_info,
        "methods": list(config.methods),
        "sanity": [_json_safe(r) for r in sanity],
        "leakage": [_json_safe(r) for r in leakage if r["group"] is None],
        "burned_in_annotation": [_json_safe(r) for r in burned_in_by_class(images, regions, p.labels)],
        "clusters": [_json_safe({k: v for k, v in c.items() if k != "mean_map_u8"}) for c in clusters],
        "region_kinds": list(p.region_kinds),
        "labels": list(p.labels),
        "duration_seconds": round(time.time() - p.started, 1),
        "work": work,
        "versions": versions(),
    }
    summary["changes"] = compare_runs(load_previous_summary(out), summary)
    write_json_atomic(out / "summary.json", summary, indent=2)
    content = build_report_content(p, summary, flatten(config))
    write_report(content, out / "index.html")
    record_run(out, summary)
    log.info("verdict: %s; report: %s", verdict, out / "index.html")
    return summary


def _in_image_order(table: Any, *then: str) -> Any:
    """The table sorted by ``image_id`` and then by ``then``: the same order however the rows were sharded."""
    return table.sort_by([("image_id", "ascending"), *((name, "ascending") for name in then)])


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


def _map_shards(runner: Runner, fn: Callable[..., Any], items: list[tuple], bar: ShardProgress) -> list[Any]:
    try:
        return runner.map(fn, items, on_result=bar)
    finally:
        bar.close()


def run_pipeline(config: AuditConfig, runner: Runner | None = None, progress: bool = False) -> dict:
    """Run every stage; returns the summary (also written to ``OUT/summary.json``).

    ``progress``: show a progress bar of images per second on the terminal (the command line does).
    """
    runner = runner or LocalRunner(config.workers)
    full: Plan = runner.call(plan, config)
    p = full.light()  # what tasks get: everything but the other shards' file lists
    ingested = _map_shards(
        runner, ingest_shard, [(p, s) for s in full.shards], ShardProgress("ingest", p.n_files, "files", progress)
    )
    runner.call(detect_watermarks, p)
    ref: ModelRef = runner.call(fit_model, p)
    images = sum(r["images"] for r in ingested)
    explained = _map_shards(
        runner, explain_shard, [(p, s, ref) for s in full.shards], ShardProgress("explain", images, "images", progress)
    )
    runner.call(check_sanity, p, ref)
    work = {
        "shards": len(full.shards),
        "ingested": sum(not r["skipped"] for r in ingested),
        "explained": sum(not r["skipped"] for r in explained),
        "images_explained": sum(r["images"] for r in explained if not r["skipped"]),
        "detector_calls": sum(r["detector_calls"] for r in ingested),
    }
    log.info(
        "shards: %d; ingested %d, explained %d (%d images); the others were reused from earlier runs",
        work["shards"],
        work["ingested"],
        work["explained"],
        work["images_explained"],
    )
    return runner.call(summarise, p, ref, work)


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
