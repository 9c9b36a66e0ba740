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
        ("width", pa.int32()),  # the audited pixels (regions' coordinates); at most 4096 on the long side
        ("height", pa.int32()),
        ("channels", pa.int8()),
        ("fold", pa.int32()),  # the cross-fitting fold whose model scored the image (probe), else -1
        ("prediction", pa.string()),
        ("prediction_index", pa.int32()),
        ("confidence", pa.float32()),  # softmax probability of the prediction
        ("label_probability", pa.float32()),  # softmax probability of the true label
        ("correct", pa.bool_()),
        ("shard", pa.int32()),
        # Added in 0.3 (README, "Supported inputs"): where the pixels came from.
        ("patient_id", pa.string()),  # the manifest's patient id (cross-fitting folds keep a patient together)
        ("original_width", pa.int32()),  # the file's size; larger than width/height when downscaled
        ("original_height", pa.int32()),
        ("format", pa.string()),  # read from the content: PNG, JPEG, TIFF, DICOM, ...
        ("bits", pa.int16()),  # bits per sample in the file (DICOM: Bits Stored)
        ("modality", pa.string()),  # DICOM Modality (CR, DX, ...); NULL for other formats
        ("pixel_spacing_x_mm", pa.float32()),  # DICOM Pixel Spacing of the audited pixels; NULL when unknown
        ("pixel_spacing_y_mm", pa.float32()),
        ("burned_in_annotation", pa.bool_()),  # DICOM Burned In Annotation (0028,0301); NULL when absent
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
        ("group", pa.string()),  # the manifest's group/site; NULL = all images
        ("region_kind", pa.string()),
        ("method", pa.string()),
        ("n_images", pa.int32()),  # images of the class
        ("n_with_region", pa.int32()),  # ... that carry a region of this kind
        ("presence_rate", pa.float32()),  # n_with_region / n_images
        ("presence_rate_other", pa.float32()),  # the same rate in the other classes
        # Attention (per method)
        ("mean_mass_fraction", pa.float32()),
        ("mean_area_fraction", pa.float32()),
        ("enrichment", pa.float32()),  # Σ mass / Σ area over images carrying the region
        ("ci_low", pa.float32()),  # bootstrap 95% interval of enrichment
        ("ci_high", pa.float32()),
        ("pointing_hit_rate", pa.float32()),
        ("rank_accuracy", pa.float32()),
        ("p_value", pa.float64()),  # one-sided Wilcoxon signed-rank, mass fraction > area fraction
        ("p_adjusted", pa.float64()),  # Holm over all findings
        ("sanity_passed", pa.bool_()),  # the method passed the randomisation check; NULL = not checked
        # Dependence (counterfactual, first fill; the same for every method)
        ("n_counterfactual", pa.float32()),
        ("n_control", pa.float32()),
        ("flip_rate", pa.float32()),  # share of predictions that change when the region is removed
        ("flip_rate_control", pa.float32()),  # ... when the equal-area control is removed
        ("effect", pa.float32()),  # mean drop of the explained class's probability
        ("effect_ci_low", pa.float32()),
        ("effect_ci_high", pa.float32()),
        ("effect_control", pa.float32()),
        ("effect_control_ci_low", pa.float32()),
        ("effect_control_ci_high", pa.float32()),
        ("effect_difference", pa.float32()),  # mean of (drop − control drop), paired
        ("effect_difference_ci_low", pa.float32()),
        ("effect_difference_ci_high", pa.float32()),
        ("flip_difference", pa.float32()),  # flip rate − control flip rate, paired; decides dependence
        ("flip_difference_ci_low", pa.float32()),
        ("flip_difference_ci_high", pa.float32()),
        # Leakage (no model)
        ("leakage_auc", pa.float32()),  # cross-validated one-vs-rest AUC of the region's features for the class
        ("leakage_auc_ci_low", pa.float32()),
        ("leakage_auc_ci_high", pa.float32()),
        ("leakage_balanced_accuracy", pa.float32()),
        ("leakage_baseline", pa.float32()),  # the majority predictor's balanced accuracy
        # Verdict
        ("attention", pa.bool_()),
        ("dependence", pa.bool_()),
        ("leakage", pa.bool_()),
        ("evidence", pa.int8()),  # how many of the three
        ("verdict", pa.string()),  # none | watch | shortcut
        ("reason", pa.string()),
    ]
)

COUNTERFACTUALS = pa.schema(
    [
        ("image_id", pa.string()),
        ("region_kind", pa.string()),
        ("fill", pa.string()),  # inpaint | mean
        ("target", pa.int32()),  # the explained class
        ("area_fraction", pa.float32()),  # removed area / image area
        ("prob_clean", pa.float32()),  # probability of the target class on the image as is
        ("prob_removed", pa.float32()),  # ... with the region removed
        ("prob_control", pa.float32()),  # ... with the control region removed; NaN when no control fits
        ("flip_removed", pa.bool_()),  # the prediction changed
        ("flip_control", pa.bool_()),
        ("control_found", pa.bool_()),
    ]
)

LEAKAGE = pa.schema(
    [
        ("region_kind", pa.string()),
        ("group", pa.string()),  # NULL = all images
        ("label", pa.string()),
        ("n_images", pa.int32()),
        ("n_class", pa.int32()),
        ("auc", pa.float32()),  # cross-validated one-vs-rest AUC of the region's features for the class
        ("auc_ci_low", pa.float32()),
        ("auc_ci_high", pa.float32()),
        ("balanced_accuracy", pa.float32()),
        ("baseline_balanced_accuracy", pa.float32()),
        ("accuracy", pa.float32()),
        ("baseline_accuracy", pa.float32()),
        ("folds", pa.int32()),
        ("leakage", pa.bool_()),
        ("note", pa.string()),
    ]
)

CLUSTERS = pa.schema(
    [
        ("method", pa.string()),
        ("label", pa.string()),  # the explained class whose maps were clustered
        ("cluster", pa.int32()),  # 0 = largest
        ("size", pa.int32()),
        ("share", pa.float32()),  # of the class's clustered maps
        ("purity", pa.float32()),  # share whose true label is the class
        ("peak_x", pa.float32()),  # the mean map's maximum, image fractions
        ("peak_y", pa.float32()),
        ("concentration", pa.float32()),  # mass in the top 5% pixels of the mean map
        ("outside_expected", pa.float32()),  # mass outside the expected region; NaN without one
        ("distinct", pa.float32()),  # 1 − cosine similarity to the class's mean map
        ("suspicious", pa.bool_()),
        ("reason", pa.string()),
        ("mean_map_u8", pa.list_(pa.uint8())),  # [grid*grid] row-major, max 255
        ("map_size", pa.int16()),
        ("examples", pa.list_(pa.string())),  # image_ids of typical members
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
    "counterfactuals": COUNTERFACTUALS,
    "leakage": LEAKAGE,
    "clusters": CLUSTERS,
    "sanity": SANITY,
    "errors": ERRORS,
}
