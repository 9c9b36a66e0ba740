"""Arrow schemas of the tables in DESIGN.md ("Interfaces that others rely on").

Columns may be added, never renamed or removed without a deprecation path: people's scripts and dashboards
query these names.
"""

from __future__ import annotations

import pyarrow as pa

IMAGES = pa.schema(
    [
        ("image_id", pa.string()),  # blake2b-128 of the file's bytes
        ("path", pa.string()),  # relative to the dataset root
        ("label", pa.string()),
        ("label_index", pa.int32()),
        ("split", pa.string()),
        ("group", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("channels", pa.int8()),
        ("fold", pa.int32()),  # the cross-fitting fold whose model scored the image (probe), else -1
        ("prediction", pa.string()),
        ("prediction_index", pa.int32()),
        ("confidence", pa.float32()),  # softmax probability of the prediction
        ("label_probability", pa.float32()),  # softmax probability of the true label
        ("correct", pa.bool_()),
        ("shard", pa.int32()),
    ]
)

REGIONS = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("kind", pa.string()),
        ("x0", pa.int32()),
        ("y0", pa.int32()),
        ("x1", pa.int32()),
        ("y1", pa.int32()),
        ("score", pa.float32()),
        ("detector", pa.string()),
        ("detector_version", pa.string()),
    ]
)

ATTRIBUTIONS = pa.schema(
    [
        ("image_id", pa.string()),
        ("method", pa.string()),
        ("region_kind", pa.string()),
        ("target", pa.int32()),  # class index the map explains
        ("present", pa.bool_()),  # the image has a region of this kind
        ("mass_fraction", pa.float32()),  # NaN when not present
        ("area_fraction", pa.float32()),
        ("enrichment", pa.float32()),
        ("pointing_hit", pa.float32()),  # 1.0 / 0.0, NaN when not present
        ("rank_accuracy", pa.float32()),
    ]
)

MAPS = pa.schema(
    [
        ("image_id", pa.string()),
        ("method", pa.string()),
        ("map_u8", pa.list_(pa.uint8())),  # [size*size] row-major, map ≈ map_u8 / 255 * map_scale
        ("map_size", pa.int16()),
        ("map_scale", pa.float32()),
        ("raw_sum", pa.float32()),  # un-normalised sum of the map at the target layer
    ]
)

FINDINGS = pa.schema(
    [
        ("label", pa.string()),
        ("region_kind", pa.string()),
        ("method", pa.string()),
        ("n_images", pa.int32()),  # images of the class
        ("n_with_region", pa.int32()),  # ... that carry a region of this kind
        ("presence_rate", pa.float32()),  # n_with_region / n_images
        ("presence_rate_other", pa.float32()),  # the same rate in the other classes
        ("mean_mass_fraction", pa.float32()),
        ("mean_area_fraction", pa.float32()),
        ("enrichment", pa.float32()),  # Σ mass / Σ area over images carrying the region
        ("ci_low", pa.float32()),  # bootstrap 95% interval of enrichment
        ("ci_high", pa.float32()),
        ("pointing_hit_rate", pa.float32()),
        ("rank_accuracy", pa.float32()),
        ("attention", pa.bool_()),
        ("leakage", pa.bool_()),
        ("verdict", pa.string()),  # none | watch | shortcut
        ("reason", pa.string()),
    ]
)

SANITY = pa.schema(
    [
        ("method", pa.string()),
        ("n_images", pa.int32()),
        ("rank_correlation", pa.float32()),  # Spearman, original vs randomised top layers (mean over images)
        ("passed", pa.bool_()),  # rank_correlation < 0.5: the maps depend on the model's weights
        ("randomised", pa.string()),  # the re-initialised modules, comma-separated
    ]
)

ERRORS = pa.schema(
    [
        ("path", pa.string()),
        ("stage", pa.string()),
        ("message", pa.string()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "images": IMAGES,
    "regions": REGIONS,
    "attributions": ATTRIBUTIONS,
    "maps": MAPS,
    "findings": FINDINGS,
    "sanity": SANITY,
    "errors": ERRORS,
}
