"""From a finished audit's tables to the evidence the findings combine: dependence, leakage and discovered clusters.

Each function reads Arrow tables (``images``, ``regions``, ``counterfactuals``, ``maps``, ``attributions``) and
returns plain rows; :func:`audit.pipeline.summarise` writes them and hands them to
:func:`audit.evidence.findings.compute_findings`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from audit.config import AuditConfig
from audit.evidence.counterfactual import dependence_stats
from audit.evidence.discovery import Cluster, cluster_rows, discover
from audit.evidence.findings import ALL, Key
from audit.evidence.leakage import leakage_table, region_features


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def dependence_by_key(
    counterfactuals: pa.Table, images: pa.Table, fill: str, n_boot: int, seed: int
) -> dict[Key, dict]:
    """(label, group, kind) → :func:`dependence_stats` of the rows of one fill, over all images and per group."""
    if counterfactuals.num_rows == 0:
        return {}
    label_of = dict(zip(_column(images, "image_id"), _column(images, "label"), strict=True))
    group_of = dict(zip(_column(images, "image_id"), _column(images, "group"), strict=True))
    rows = counterfactuals.filter(pa.compute.equal(counterfactuals.column("fill"), fill))
    ids = _column(rows, "image_id")
    labels = np.array([label_of.get(i) for i in ids], dtype=object)
    groups = np.array([group_of.get(i) for i in ids], dtype=object)
    kinds = _column(rows, "region_kind")
    values = {
        name: _column(rows, name)
        for name in ("prob_clean", "prob_removed", "prob_control", "flip_removed", "flip_control", "control_found")
    }
    out: dict[Key, dict] = {}
    named_groups = sorted({g for g in groups.tolist() if g is not None})
    for offset, (label, kind) in enumerate(sorted(set(zip(labels.tolist(), kinds.tolist(), strict=True)))):
        same = (labels == label) & (kinds == kind)
        for group in [ALL, *named_groups]:
            selected = same if group is ALL else same & (groups == group)
            if not selected.any():
                continue
            out[(label, group, kind)] = dependence_stats(
                *(values[name][selected] for name in values), n_boot=n_boot, seed=seed + offset
            )
    return out


def leakage_rows(
    images: pa.Table, regions: pa.Table, kinds: Sequence[str], class_names: Sequence[str], config: AuditConfig
) -> list[dict]:
    """The leakage table (schema ``leakage``): every region kind, every class, over all images and per group."""
    if images.num_rows == 0:
        return []
    classes = list(class_names)
    labels = _column(images, "label_index").astype(np.int64)
    groups = _column(images, "group")
    region_rows = regions.select(["image_id", "kind", "x0", "y0", "x1", "y1"]).to_pylist()
    features = region_features(
        [str(i) for i in _column(images, "image_id")],
        _column(images, "width").astype(np.float64),
        _column(images, "height").astype(np.float64),
        region_rows,
        kinds,
    )
    rows = leakage_table(
        features,
        labels,
        classes,
        groups=groups if any(g is not None for g in groups) else None,
        cv_groups=_fold_keys(images),
        auc_bar=config.findings.leakage_auc_bar,
        min_images=max(10, config.findings.min_images),
        folds=config.findings.leakage_folds,
        n_boot=config.findings.bootstrap,
        seed=config.findings.seed,
    )
    return [{**row, "label": row.get("class", row.get("label"))} for row in rows]


def _fold_keys(images: pa.Table) -> np.ndarray | None:
    """The ids kept in one cross-validation fold: the patient when the manifest names one (a patient's images
    look alike, so splitting them would leak), else None."""
    if "patient_id" not in images.column_names:
        return None
    patients = _column(images, "patient_id")
    return patients if any(p is not None for p in patients) else None


def leakage_by_key(rows: Sequence[dict]) -> dict[Key, dict]:
    return {(row["label"], row["group"], row["region_kind"]): row for row in rows}


def discovered_clusters(
    maps_index: pa.Table,
    read_maps: Callable[[list[str]], pa.Table],
    attributions: pa.Table,
    images: pa.Table,
    regions: pa.Table,
    class_names: Sequence[str],
    config: AuditConfig,
) -> tuple[list[Cluster], list[dict]]:
    """SpRAy over the first method's stored maps, per explained class; returns the clusters and their table rows.

    ``maps_index`` holds the ``image_id`` and ``method`` columns of ``maps`` only; ``read_maps(image_ids)`` returns
    the first method's rows (``image_id``, ``map_u8``, ``map_size``) of those images. Only the images of the seeded
    per-class sample (at most ``discovery.max_images`` per class, drawn as :func:`discover` draws it) are read, so
    memory does not grow with the dataset.

    ``class_names`` are in the model's output order (the audit's labels), so a target index names its class.

    With an expected region (``regions.expected``, e.g. lungs), its boxes, rasterised at the map size, are the
    expected content of each image.
    """
    method = config.methods[0]
    index = maps_index.filter(pa.compute.equal(maps_index.column("method"), method))
    if index.num_rows == 0:
        return [], []
    all_ids = [str(i) for i in _column(index, "image_id")]
    label_of = dict(zip(_column(images, "image_id"), _column(images, "label_index"), strict=True))
    all_labels = np.array([int(label_of[i]) for i in all_ids], dtype=np.int64)
    # The explained class per image: every region kind's row of an image carries the same target. An image without
    # attribution rows (no region kind configured) is clustered under its label.
    first = attributions.filter(pa.compute.equal(attributions.column("method"), method))
    target_of = dict(zip(_column(first, "image_id"), _column(first, "target"), strict=False))
    all_targets = np.array([int(target_of.get(i, all_labels[k])) for k, i in enumerate(all_ids)], dtype=np.int64)
    classes = list(class_names)
    keep = []
    for class_index in range(len(classes)):
        in_class = np.flatnonzero(all_targets == class_index)
        if in_class.size > config.discovery.max_images:  # the same draw as discover() makes
            rng = np.random.default_rng((config.findings.seed, class_index))
            in_class = np.sort(rng.choice(in_class, size=config.discovery.max_images, replace=False))
        keep.append(in_class)
    chosen = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    image_ids = [all_ids[i] for i in chosen]
    labels, targets = all_labels[chosen], all_targets[chosen]
    found = read_maps(image_ids)
    position = {image_id: k for k, image_id in enumerate(_column(found, "image_id"))}
    order = np.array([position[i] for i in image_ids], dtype=np.int64)
    size = int(found.column("map_size")[0].as_py()) if found.num_rows else config.map_size
    flat = found.column("map_u8").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    stack = flat.reshape(-1, size, size)[order] if found.num_rows else np.zeros((0, size, size), np.uint8)
    expected = _expected_masks(regions, images, image_ids, size, config.regions.expected)
    clusters = discover(
        stack,
        targets,
        labels,
        classes,
        expected=expected,
        max_images=config.discovery.max_images,
        max_clusters=config.discovery.max_clusters,
        neighbours=config.discovery.neighbours,
        grid=config.discovery.grid,
        min_cluster=config.discovery.min_cluster,
        seed=config.findings.seed,
    )
    rows = []
    for cluster, row in zip(clusters, cluster_rows(clusters), strict=True):
        mean_map = np.asarray(cluster.mean_map, dtype=np.float32)
        peak = float(mean_map.max()) or 1.0
        rows.append(
            {
                **{k: v for k, v in row.items() if k not in ("cls", "index", "examples")},
                "method": method,
                "label": row["cls"],
                "cluster": row["index"],
                "mean_map_u8": np.round(mean_map / peak * 255).astype(np.uint8).reshape(-1).tolist(),
                "map_size": mean_map.shape[0],
                "examples": [image_ids[i] for i in cluster.examples],
            }
        )
    return clusters, rows


def _expected_masks(
    regions: pa.Table, images: pa.Table, image_ids: Sequence[str], size: int, expected: str | None
) -> np.ndarray | None:
    """float [N, size, size] masks of the expected region's boxes per image (None without an expected kind)."""
    if expected is None:
        return None
    width_of = dict(zip(_column(images, "image_id"), _column(images, "width"), strict=True))
    height_of = dict(zip(_column(images, "image_id"), _column(images, "height"), strict=True))
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    masks = np.zeros((len(image_ids), size, size), np.float32)
    for row in regions.filter(pa.compute.equal(regions.column("kind"), expected)).to_pylist():
        k = position.get(row["image_id"])
        if k is None:
            continue
        sx, sy = size / width_of[row["image_id"]], size / height_of[row["image_id"]]
        x0, y0 = int(row["x0"] * sx), int(row["y0"] * sy)
        x1, y1 = int(np.ceil(row["x1"] * sx)), int(np.ceil(row["y1"] * sy))
        masks[k, y0:y1, x0:x1] = 1.0
    return masks
