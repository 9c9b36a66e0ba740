"""Discovery of shortcuts nobody named: SpRAy (Lapuschkin et al., Nat. Commun. 2019, "Unmasking Clever Hans
predictors and assessing what machines really learn").

Per class, the saliency maps that explain that class are clustered, and every cluster whose attention sits
somewhere else than the expected content is reported, with its mean map, size, label purity and typical images.

The pipeline, per class (the class each map *explains*, ``targets``), with at least ``2 * min_cluster`` maps:

1. **Sample**: at most ``max_images`` maps, drawn without replacement with a generator seeded by ``(seed, class)``.
2. **Features**: the positive part of each map, normalised to sum 1 (so the per-map min-max scale the audit stores
   does not matter), resized to ``grid`` x ``grid`` by area averaging, normalised to sum 1 again, flattened.
3. **Affinity**: a symmetric k-nearest-neighbour graph (k = ``neighbours``, Euclidean distance; an edge when either
   point is among the other's k nearest) weighted by a Gaussian with **local scaling** (Zelnik-Manor & Perona,
   NIPS 2004): W_ij = exp(−d_ij² / (σ_i σ_j)), σ_i = the distance from i to its k-th nearest neighbour. A single
   (e.g. median) bandwidth fits one density only, and a tight shortcut blob and attention spread over the lungs
   are clusters of very different density; local scaling adapts to each (their motivation).
4. **Spectrum**: the smallest ``max_clusters + 1`` eigenvalues and eigenvectors of the normalised Laplacian
   L = I − D^−½ W D^−½ (dense ``numpy.linalg.eigh`` up to 600 maps, else ``scipy.sparse.linalg.eigsh`` on the
   top of D^−½ W D^−½ with a seeded start vector); :func:`eigengap` chooses k among the k whose gap is *clear*,
   λ_{k+1} ≥ ``gap_ratio`` · λ_k (default 5; k = 1 always qualifies). Why: saliency maps of one class vary
   continuously (the blob moves and widens), and on such a continuum the kNN graph's eigenvalues grow smoothly
   (λ_k ∝ (k − 1)² on a path), so the largest *absolute* gap often lies deep in the spectrum and the plain
   eigengap cuts one pattern into 3-8 pieces. k groups that really are separate have k eigenvalues near 0 and
   λ_{k+1} many times λ_k (the "well clustered" condition of Peng, Sun & Zanetti, COLT 2015); a path gives
   λ_3 / λ_2 → 4, below the default ratio.
5. **Clusters**: k-means (scikit-learn, ``n_init=10``, seeded) on the row-normalised first k eigenvectors
   (Ng, Jordan & Weiss, NIPS 2001). Clusters are numbered by size (0 = largest); those under ``min_cluster`` maps
   are not reported. A cluster's ``examples`` are its members closest to its mean features, ``purity`` the share
   of its members whose true label is the explained class (low purity: the model gives the class to images of
   other classes for the same look, the Clever-Hans pattern).

Each reported cluster carries, on its mean map (the mean of its members' sum-1 maps at full resolution):

* ``concentration``: the share of the mean map's mass in its top 5% pixels (a uniform map gives 0.05, a single
  bright pixel 1.0);
* ``outside_expected``: the share of the mass outside the expected-content mask (mean over the members of
  Σ p·(1 − m), each image with its own mask); NaN without masks;
* ``distinct``: 1 − cosine similarity between the cluster's mean map and the mean map of the whole class sample.

**Suspicious rule.** A cluster is suspicious when its mean map is concentrated (``concentration ≥
concentration_bar``, default 0.25, five times a uniform map) **and**

* with expected masks: most of its attention lies outside them (``outside_expected ≥ outside_bar``, default 0.5);
* without: it looks somewhere else than the class as a whole (``distinct ≥ distinct_bar``, default 0.2).

Without masks the rule can only find *minority* patterns: when most of a class looks at the shortcut, the shortcut
is the class's mean map and no cluster is distinct from it. Give expected masks (``--expected``) to catch that
case; the region metrics of :mod:`audit.evidence.findings` catch it for the named region kinds.

Everything is deterministic for a seed. There is no per-image Python loop, and memory grows linearly with the
sample (sparse graph, chunked neighbour search): 2000 maps of one class cluster in about 0.2 s on two CPU cores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from sklearn.cluster import KMeans
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

from audit.errors import ConfigError, ShapeError

# Share of the pixels whose mass defines ``concentration``.
TOP_SHARE = 0.05
# Up to this many maps the normalised Laplacian is decomposed densely (exact, and cheap: 600³ flops ≈ 0.05 s);
# beyond it ARPACK on the sparse graph is much faster than an O(n³) dense decomposition.
DENSE_LIMIT = 600
KMEANS_INIT = 10


@dataclass(eq=False)  # eq=False: the arrays would make the generated __eq__ ambiguous
class Cluster:
    """One cluster of one class's saliency maps.

    ``mean_map`` is float32 [H, W] (the stored map size, s x s by default), normalised to max 1.
    """

    cls: str  # the class whose maps were clustered (the explained/target class)
    index: int  # cluster number within the class, 0 = largest
    size: int  # images in the cluster (in the clustered sample)
    share: float  # size / images of the class in the sample
    purity: float  # share of the cluster's images whose TRUE label is `cls`
    mean_map: np.ndarray  # float32 [H, W], normalised to max 1
    peak: tuple[float, float]  # (x, y) of the mean map's maximum, normalised to [0, 1] (pixel centre)
    concentration: float  # share of the mean map's mass in its top 5% pixels (uniform map = 0.05)
    outside_expected: float  # share of the mean map's mass outside the expected mask; NaN when none given
    distinct: float  # 1 - cosine similarity between the cluster's and the class's mean maps
    suspicious: bool
    reason: str  # a readable sentence with the numbers
    examples: list[int]  # indices (into the inputs) of the most typical members, most typical first
    members: np.ndarray  # int64 [size], indices into the inputs, ascending


def eigengap(eigenvalues: np.ndarray, max_clusters: int, *, min_ratio: float = 1.0) -> int:
    """Number of clusters from the sorted (ascending) eigenvalues of the normalised Laplacian: the k in
    [1, max_clusters] after which the gap λ_{k+1} − λ_k is largest.

    A graph with k well separated groups has k eigenvalues near 0 and a jump after them (von Luxburg, "A tutorial
    on spectral clustering", 2007, §8.3). Ties go to the smaller k.

    Args:
        eigenvalues: float [m], ascending; only the first ``max_clusters + 1`` are used.
        max_clusters: the largest k allowed, ≥ 1.
        min_ratio: only a k > 1 with λ_{k+1} ≥ min_ratio · λ_k is a candidate (a clear gap, see the module
            docstring); the default 1 admits every k, the plain eigengap.

    Returns:
        k in [1, min(max_clusters, m − 1)]; 1 when fewer than two eigenvalues are given.
    """
    values = np.asarray(eigenvalues, dtype=np.float64).ravel()[: max(max_clusters, 1) + 1]
    if values.size < 2:
        return 1
    gaps = np.diff(values)
    clear = values[1:] >= min_ratio * np.maximum(values[:-1], 0.0)
    clear[0] = True  # one cluster needs no gap
    return int(np.argmax(np.where(clear, gaps, -np.inf))) + 1


def discover(
    maps: np.ndarray,
    targets: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    expected: np.ndarray | None = None,
    max_images: int = 2000,
    max_clusters: int = 8,
    neighbours: int = 10,
    grid: int = 16,
    min_cluster: int = 5,
    examples: int = 6,
    concentration_bar: float = 0.25,
    outside_bar: float = 0.5,
    distinct_bar: float = 0.2,
    gap_ratio: float = 5.0,
    seed: int = 0,
) -> list[Cluster]:
    """Cluster each class's saliency maps (SpRAy) and report the clusters, flagging the suspicious ones.

    The steps and the suspicious rule are described in the module docstring.

    Args:
        maps: uint8 or float [N, H, W] saliency maps (the audit stores uint8 [N, 32, 32]); negative values are
            ignored (positive saliency only), as are NaNs.
        targets: int [N], the class index (into ``classes``) each map explains.
        labels: int [N], the true class index of each image.
        classes: the class names, indexed by class index.
        expected: optional bool or float [N, H, W] (or [H, W] for all images) masks of the content that should
            decide (e.g. lungs); float masks are weights in [0, 1].
        max_images: at most this many maps are clustered per class (a seeded sample).
        max_clusters: the largest number of clusters the eigengap may choose.
        neighbours: k of the k-nearest-neighbour graph.
        grid: the maps are resized to grid x grid before clustering.
        min_cluster: clusters with fewer maps are not reported; classes with fewer than twice this are skipped.
        examples: at most this many typical members per cluster (closest to the cluster's mean features).
        concentration_bar, outside_bar, distinct_bar: the thresholds of the suspicious rule.
        gap_ratio: a number of clusters k > 1 needs λ_{k+1} ≥ gap_ratio · λ_k; 1 gives the plain eigengap.
        seed: seeds the sample, the eigensolver's start vector and k-means.

    Returns:
        The reported clusters, by class index and then by cluster index (0 = largest).

    Raises:
        ShapeError: when the arrays do not have the shapes above.
        ConfigError: when a setting is out of range.
    """
    maps, targets, labels, expected = _checked(maps, targets, labels, classes, expected)
    _check_settings(max_images, max_clusters, neighbours, grid, min_cluster, examples)
    if not gap_ratio >= 1.0:  # also rejects NaN
        raise ConfigError(f"discovery: gap_ratio must be ≥ 1 (1 = the plain eigengap), found {gap_ratio!r}")
    height, width = maps.shape[1:]
    resize_rows, resize_cols = _area_matrix(height, grid), _area_matrix(width, grid)
    clusters: list[Cluster] = []
    for class_index, class_name in enumerate(classes):
        in_class = np.flatnonzero(targets == class_index)
        if in_class.size < 2 * min_cluster:
            continue
        rng = np.random.default_rng((seed, class_index))
        sample = in_class
        if in_class.size > max_images:
            sample = np.sort(rng.choice(in_class, size=max_images, replace=False))
        probabilities = _sum_one(_positive(maps[sample]))  # [n, H, W], each sums to 1
        # Area averaging as two matrix products (rows, then columns): exact for any size ratio, no per-image loop.
        features = _sum_one(resize_rows @ probabilities @ resize_cols.T).reshape(sample.size, -1)  # [n, grid²]
        assignment = _spectral_clusters(features, max_clusters, neighbours, gap_ratio, rng)
        outside = None
        if expected is not None:
            inside = _weights(expected if expected.ndim == 2 else expected[sample])  # [H, W] or [n, H, W]
            outside = 1.0 - np.einsum("nhw,nhw->n", probabilities, np.broadcast_to(inside, probabilities.shape))
        clusters.extend(
            _describe(
                class_name,
                class_index,
                sample,
                assignment,
                probabilities,
                features,
                labels[sample],
                outside,
                min_cluster=min_cluster,
                examples=examples,
                bars=(concentration_bar, outside_bar, distinct_bar),
            )
        )
    return clusters


def cluster_rows(clusters: Sequence[Cluster]) -> list[dict]:
    """Flat rows for a table, one per cluster; the mean maps stay in the :class:`Cluster` objects."""
    return [
        {
            "cls": c.cls,
            "index": c.index,
            "size": c.size,
            "share": c.share,
            "purity": c.purity,
            "peak_x": c.peak[0],
            "peak_y": c.peak[1],
            "concentration": c.concentration,
            "outside_expected": c.outside_expected,
            "distinct": c.distinct,
            "suspicious": c.suspicious,
            "reason": c.reason,
            "examples": [int(i) for i in c.examples],
        }
        for c in clusters
    ]


def _checked(
    maps: np.ndarray,
    targets: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    expected: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The inputs, checked: maps [N, H, W] and masks as given (converted per class sample, so that a large audit
    is never copied to float whole), int64 targets and labels [N]."""
    maps = np.asarray(maps)
    if maps.ndim != 3 or min(maps.shape[1:], default=0) < 1:
        raise ShapeError("maps", "[N, H, W] (one saliency map per image)", maps.shape)
    if not (np.issubdtype(maps.dtype, np.number) or maps.dtype == bool):
        raise ShapeError("maps", "a numeric dtype (uint8 or float)", maps.dtype)
    n = maps.shape[0]
    arrays = []
    for name, values in (("targets", targets), ("labels", labels)):
        values = np.asarray(values)
        if values.shape != (n,):
            raise ShapeError(name, f"[{n}] (one class index per map)", values.shape)
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise ShapeError(name, "an integer dtype (class indices)", values.dtype)
        arrays.append(values.astype(np.int64))
    targets, labels = arrays
    if targets.size and (targets.min() < 0 or targets.max() >= len(classes)):
        raise ShapeError("targets", f"class indices in [0, {len(classes) - 1}]", f"[{targets.min()}, {targets.max()}]")
    masks = None
    if expected is not None:
        masks = np.asarray(expected)
        if masks.shape not in (maps.shape, maps.shape[1:]):
            raise ShapeError(
                "expected", f"{list(maps.shape)} or {list(maps.shape[1:])} (masks like the maps)", masks.shape
            )
    return maps, targets, labels, masks


def _positive(maps: np.ndarray) -> np.ndarray:
    """float32 [n, H, W]: NaN, infinite and negative saliency carry no positive attention and become 0."""
    if not np.issubdtype(maps.dtype, np.floating):
        return maps.astype(np.float32)  # uint8 (the stored form) or bool: already finite and ≥ 0
    return np.clip(np.nan_to_num(maps.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)


def _weights(masks: np.ndarray) -> np.ndarray:
    """float32 masks (bool or float, any shape) as weights in [0, 1]."""
    if masks.dtype == bool:
        return masks.astype(np.float32)
    return np.clip(np.nan_to_num(masks.astype(np.float32)), 0.0, 1.0)


def _check_settings(
    max_images: int, max_clusters: int, neighbours: int, grid: int, min_cluster: int, examples: int
) -> None:
    settings = {
        "max_images": (max_images, 2),
        "max_clusters": (max_clusters, 1),
        "neighbours": (neighbours, 1),
        "grid": (grid, 1),
        "min_cluster": (min_cluster, 1),
        "examples": (examples, 0),
    }
    for name, (value, lowest) in settings.items():
        if int(value) != value or value < lowest:
            raise ConfigError(f"discovery: {name} must be an integer ≥ {lowest}, found {value!r}")


def _area_matrix(size: int, grid: int) -> np.ndarray:
    """float32 [grid, size]: row g averages the input pixels under output cell g, weighted by their overlap."""
    edges_in = np.arange(size + 1, dtype=np.float64) / size
    edges_out = np.arange(grid + 1, dtype=np.float64) / grid
    overlap = np.clip(
        np.minimum(edges_out[1:, None], edges_in[None, 1:]) - np.maximum(edges_out[:-1, None], edges_in[None, :-1]),
        0.0,
        None,
    )
    return (overlap / overlap.sum(1, keepdims=True)).astype(np.float32)


def _sum_one(maps: np.ndarray) -> np.ndarray:
    """float32 [n, H, W] → each map divided by its sum; an all-zero map becomes uniform (no attention anywhere)."""
    totals = maps.sum(axis=(1, 2), keepdims=True)
    uniform = np.float32(1.0 / (maps.shape[1] * maps.shape[2]))
    return np.where(totals > 0, maps / np.where(totals > 0, totals, 1.0), uniform).astype(np.float32)


def _spectral_clusters(
    features: np.ndarray, max_clusters: int, neighbours: int, gap_ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """int [n] cluster of each row of ``features`` (float [n, d]), k chosen by the eigengap among clear gaps."""
    n = features.shape[0]
    distinct_rows = np.unique(features, axis=0).shape[0]
    if distinct_rows < 2:
        return np.zeros(n, dtype=np.int64)
    affinity = _knn_affinity(features.astype(np.float64), min(neighbours, n - 1))
    values, vectors = _laplacian_spectrum(affinity, min(max_clusters + 1, n), rng)
    k = min(eigengap(values, max_clusters, min_ratio=gap_ratio), distinct_rows)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    embedding = vectors[:, :k]
    # Ng-Jordan-Weiss: project each row onto the unit sphere, so that k-means sees k tight, well separated groups.
    embedding = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    kmeans = KMeans(n_clusters=k, n_init=KMEANS_INIT, random_state=int(rng.integers(2**31 - 1)))
    # One thread: k-means on [n, k ≤ 8] takes milliseconds, but its OpenMP workers, started right after the
    # BLAS threads of the steps above, spin against them for tenths of a second on a 2-core machine.
    with threadpool_limits(limits=1, user_api="openmp"):
        return kmeans.fit_predict(embedding).astype(np.int64)


def _knn_affinity(features: np.ndarray, k: int) -> scipy.sparse.csr_matrix:
    """Symmetric sparse [n, n] affinity: Gaussian with local scaling on the k-nearest-neighbour graph.

    Args:
        features: float64 [n, d]; k: neighbours per point, 1 ≤ k < n.
    """
    n = features.shape[0]
    # Brute force in chunks (memory O(n·chunk), not O(n²)); without a query, a point is not its own neighbour.
    distance, nearest = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(features).kneighbors()  # [n, k]
    # σ_i = distance to the k-th neighbour; the floor keeps duplicates (distance 0) from dividing by zero.
    sigma = distance[:, -1]
    positive = sigma[sigma > 0]
    sigma = np.maximum(sigma, (np.median(positive) if positive.size else 1.0) * 1e-3)
    weights = np.exp(-(distance**2) / (sigma[:, None] * sigma[nearest]))
    rows = np.repeat(np.arange(n), k)
    affinity = scipy.sparse.csr_matrix((weights.ravel(), (rows, nearest.ravel())), shape=(n, n))
    return affinity.maximum(affinity.T).tocsr()  # an edge when either point is among the other's k nearest


def _laplacian_spectrum(
    affinity: scipy.sparse.csr_matrix, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` smallest eigenvalues (float [count], ascending) and eigenvectors (float [n, count]) of the
    normalised Laplacian I − D^−½ W D^−½."""
    n = affinity.shape[0]
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    scale = 1.0 / np.sqrt(np.maximum(degree, np.finfo(np.float64).tiny))
    normalised = scipy.sparse.diags(scale) @ affinity @ scipy.sparse.diags(scale)  # D^−½ W D^−½
    if n <= DENSE_LIMIT:
        values, vectors = np.linalg.eigh(normalised.toarray())
        values, vectors = values[::-1][:count], vectors[:, ::-1][:, :count]
    else:
        # The smallest eigenvalues of L are 1 − the largest of D^−½ W D^−½: asking ARPACK for the largest
        # converges fast, without the factorisation a shift-invert search near 0 would need.
        start = rng.uniform(0.5, 1.5, size=n)
        values, vectors = scipy.sparse.linalg.eigsh(normalised, k=min(count, n - 1), which="LA", v0=start)
        order = np.argsort(-values, kind="stable")
        values, vectors = values[order], vectors[:, order]
    return 1.0 - values, vectors


def _concentration(mean_map: np.ndarray) -> float:
    """Share of the mass of ``mean_map`` (float [H, W], ≥ 0) in its top 5% pixels, counting a fractional pixel so
    that a uniform map gives exactly 0.05."""
    values = np.sort(mean_map.ravel().astype(np.float64))[::-1]
    total = values.sum()
    if not total > 0:
        return math.nan
    top = TOP_SHARE * values.size
    whole = int(math.floor(top))
    mass = values[:whole].sum() + (top - whole) * (values[whole] if whole < values.size else 0.0)
    return float(mass / total)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a.ravel(), b.ravel()) / norm) if norm > 0 else 0.0


def _describe(
    class_name: str,
    class_index: int,
    sample: np.ndarray,
    assignment: np.ndarray,
    probabilities: np.ndarray,
    features: np.ndarray,
    sample_labels: np.ndarray,
    outside: np.ndarray | None,
    *,
    min_cluster: int,
    examples: int,
    bars: tuple[float, float, float],
) -> list[Cluster]:
    """The reported clusters of one class sample (all arrays indexed like ``sample``, [n, ...])."""
    concentration_bar, outside_bar, distinct_bar = bars
    n, height, width = probabilities.shape
    class_mean = probabilities.mean(axis=0, dtype=np.float64)
    counts = np.bincount(assignment)
    # 0 = largest; equal sizes are ordered by their first member, so the numbering does not depend on k-means' labels.
    first_member = np.array([np.flatnonzero(assignment == c)[0] if counts[c] else n for c in range(counts.size)])
    order = [c for c in np.lexsort((first_member, -counts)) if counts[c] >= min_cluster]
    reported: list[Cluster] = []
    for index, label in enumerate(order):
        rows = np.flatnonzero(assignment == label)
        mean = probabilities[rows].mean(axis=0, dtype=np.float64)  # [H, W], sums to 1
        peak_row, peak_col = np.unravel_index(int(np.argmax(mean)), mean.shape)
        peak = ((peak_col + 0.5) / width, (peak_row + 0.5) / height)
        concentration = _concentration(mean)
        outside_share = float(outside[rows].mean()) if outside is not None else math.nan
        distinct = 1.0 - _cosine(mean, class_mean)
        # Typical members: closest (Euclidean, in the clustered features) to the cluster's mean features.
        spread = np.linalg.norm(features[rows] - features[rows].mean(axis=0), axis=1)
        typical = sample[rows[np.argsort(spread, kind="stable")[:examples]]]
        purity = float(np.mean(sample_labels[rows] == class_index))
        concentrated = concentration >= concentration_bar
        elsewhere = outside_share >= outside_bar if outside is not None else distinct >= distinct_bar
        cluster = Cluster(
            cls=class_name,
            index=index,
            size=int(rows.size),
            share=rows.size / n,
            purity=purity,
            mean_map=(mean / mean.max()).astype(np.float32),
            peak=(float(peak[0]), float(peak[1])),
            concentration=concentration,
            outside_expected=outside_share,
            distinct=float(distinct),
            suspicious=bool(concentrated and elsewhere),
            reason="",
            examples=[int(i) for i in typical],
            members=sample[rows].astype(np.int64),
        )
        cluster.reason = _reason(cluster, n, bars, has_expected=outside is not None)
        reported.append(cluster)
    return reported


def _reason(cluster: Cluster, class_size: int, bars: tuple[float, float, float], *, has_expected: bool) -> str:
    """One sentence with the cluster's numbers and which part of the rule they meet."""
    concentration_bar, outside_bar, distinct_bar = bars
    x, y = cluster.peak
    head = (
        f"Cluster {cluster.index} of class '{cluster.cls}': {cluster.size} of {class_size} clustered images "
        f"({cluster.share:.0%}), label purity {cluster.purity:.0%}, attention peak at (x, y) = ({x:.2f}, {y:.2f}), "
        f"{cluster.concentration:.0%} of the mass in the top 5% of pixels"
    )
    if has_expected:
        where = f"{cluster.outside_expected:.0%} of it outside the expected region"
        where_bar, where_value, where_name = outside_bar, cluster.outside_expected, "outside_expected"
        where_text = "outside the expected region"
    else:
        where = f"distinctness {cluster.distinct:.2f} from the class's mean map"
        where_bar, where_value, where_name = distinct_bar, cluster.distinct, "distinct"
        where_text = "distinct from the class's mean map"
    if cluster.suspicious:
        return f"{head}, {where}: suspicious, concentrated attention {where_text}."
    failed = []
    if not cluster.concentration >= concentration_bar:
        failed.append(f"concentration {cluster.concentration:.2f} < {concentration_bar:.2f}")
    if not where_value >= where_bar:
        failed.append(f"{where_name} {where_value:.2f} < {where_bar:.2f}")
    return f"{head}, {where}: not suspicious ({'; '.join(failed)})."
