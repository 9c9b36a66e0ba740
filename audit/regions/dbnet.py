"""Burned-in text and laterality markers, found with a learned DB (Differentiable Binarization) text detector.

The model is the PP-OCRv6-small text-detection network (Liao et al., "Real-time Scene Text Detection with
Differentiable Binarization", AAAI 2020; PaddleOCR's PP-OCRv6 weights), as the ONNX file that ships inside the
``rapidocr`` wheel (Apache-2.0; notice in that package's ``MODEL_LICENSES.md``). Only the file is used: it is
located without importing rapidocr (whose pipeline could download other models) and run by onnxruntime, so
nothing is ever downloaded. ``shared/notes/detectors.md`` section 4 found it the best offline text detector on this
machine, with the fewest false positives on devices.

Method:

1. Grey → 3 identical channels; resize so the long side is the image's own clamped to [:data:`MIN_SIDE`,
   :data:`MAX_SIDE`] (each side a multiple of 32, as the network's strides need) and normalise with
   mean = std = 0.5, as in training.
2. The network gives a text-probability map at input resolution, [1, 1, h, w].
3. DB post-processing (PaddleOCR's ``DBPostProcess``): the map above :data:`BINARY_THRESHOLD` is split into
   connected components; each gets its minimum-area rectangle, scored by the mean probability inside it, and is
   kept when the score reaches :data:`BOX_THRESHOLD`. The network is trained to predict a *shrunk* text kernel, so
   the rectangle is grown back ("unclipped") by ``d = area × UNCLIP_RATIO / perimeter`` on every side.
4. A box whose short side exceeds :data:`MAX_SHORT_SIDE_FRACTION` of the image's short side is dropped: on a few
   text-free images the network returns a box over most of the image, and no burned-in line is that tall.
5. Kind: a kernel that is one glyph (its width at most :data:`MARKER_MAX_ASPECT` × its height, i.e. not a
   horizontal run of glyphs) and at least :data:`MARKER_MIN_HEIGHT` of the long side is a ``marker``; anything
   else, including a lone glyph of fine print, is ``text``.

Choices measured on ``shared/data/cxr-real`` (tuned on the even half of the images in sorted path order, checked
on the odd half) and on the demo:

* Input size. Single letters are very scale-sensitive for this network: the Hannover "L in grey box" markers
  (about 27 x 43 px in a 640 px image) have a peak probability under 0.1 at long side 512 and above 0.9 at 576
  or 640. Long side 640 instead of 512 raises marker recall from 0.61 to 0.76 and text recall from 0.45 to 0.80
  on the tuning half, for about 1.6 × the cost. Enlarging the 224 px Kermany and 256 px demo images beyond 512
  loses markers (the glyphs blur), hence the clamp.
* Unclip ratio 1.0 instead of PaddleOCR's 1.6: the looser boxes fall under IoU 0.3 against the tight hand-drawn
  boxes of small letters (tuning half, long side 640, 1.0 → 1.6: marker recall 0.77 → 0.70, precision
  0.94 → 0.86, text recall 0.80 → 0.60).
* What it misses: ring-shaped lead markers (round "L"/"R"), a third of the boxed letters, faint or cut letters.
  A text detector does not read a lone letter in a graphic as text; the OpenCV detector (``text``) has the higher
  marker recall on cxr-real.

The onnxruntime session is created once per process and provider list, lazily and under a lock, so detector
instances and threads share it (``InferenceSession.run`` is thread-safe). It uses one intra-op thread (on two
cores, one thread per worker beats two threads per session) and CUDA first when onnxruntime offers it.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from audit.errors import ConfigError, ModelError
from audit.regions.base import DETECTORS, Detection, Detector, to_gray

MODEL_PACKAGE = "rapidocr"
MODEL_FILE = ("models", "PP-OCRv6_det_small.onnx")
MAX_SIDE = 640  # long side of the network input for larger images (multiple of 32); see the docstring
MIN_SIDE = 512  # smaller images are enlarged to this long side, no further (their glyphs would blur)
BINARY_THRESHOLD = 0.3  # probability-map threshold of the DB post-processing (PaddleOCR's default)
BOX_THRESHOLD = 0.6  # minimum mean probability inside a box
UNCLIP_RATIO = 1.0  # PaddleOCR's 1.6 gives boxes loose enough to miss small hand-drawn ink boxes at IoU 0.3
MIN_KERNEL_SIDE = 3.0  # px at input resolution: thinner kernels are noise (PaddleOCR's min_size)
MAX_SHORT_SIDE_FRACTION = 0.2  # of min(H, W): taller boxes are not burned-in text
MARKER_MAX_ASPECT = 1.25  # a kernel at most this wide relative to its height is one glyph
MARKER_MIN_HEIGHT = 0.013  # of max(H, W): a smaller lone glyph is fine print (text), not a laterality marker
MAX_CANDIDATES = 1000

_SESSIONS: dict[tuple[str, ...], Any] = {}
_SESSIONS_LOCK = threading.Lock()
sessions_created = 0  # how many sessions this process created (tests check that they are shared)


def model_path() -> Path:
    """Path of the detection ONNX inside the installed ``rapidocr`` package, found without importing it.

    Raises:
        ModelError: the package or the file is missing (the message says what to install).
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location).joinpath(*MODEL_FILE)
        if path.is_file():
            return path
    raise ModelError(
        f"the text_dbnet detector needs {'/'.join(MODEL_FILE)} from the {MODEL_PACKAGE} package, "
        f"found {'no such package' if not locations else 'a package without it'}; "
        "install it with: pip install 'rapidocr==3.10.0' onnxruntime"
    )


def default_providers() -> tuple[str, ...]:
    """onnxruntime execution providers: CUDA first when this onnxruntime build has it, then the CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return tuple(p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available)


def get_session(providers: Sequence[str] | None = None) -> Any:
    """The process-wide onnxruntime session for ``providers`` (default :func:`default_providers`), made once.

    Raises:
        ModelError: onnxruntime or the model file is missing.
    """
    global sessions_created
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(
            "the text_dbnet detector needs onnxruntime; install it with: pip install onnxruntime"
        ) from None
    key = tuple(providers) if providers is not None else default_providers()
    session = _SESSIONS.get(key)
    if session is not None:
        return session
    with _SESSIONS_LOCK:  # double-checked: two threads arriving together must not both build a session
        session = _SESSIONS.get(key)
        if session is None:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only: the CPU provider warns about unused CUDA options
            session = onnxruntime.InferenceSession(str(model_path()), options, providers=list(key))
            _SESSIONS[key] = session
            sessions_created += 1
    return session


def input_size(height: int, width: int, max_side: int = MAX_SIDE, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """Network input (h, w) for an H x W image: aspect kept, each side rounded to a multiple of 32 (≥ 32).

    The long side is the image's own, clamped to [min_side, max_side]: large images are shrunk to ``max_side``
    (cost), small ones enlarged to ``min_side`` (the network misses letters under ~20 px), no more.
    """
    side = min(max_side, max(min_side, max(height, width)))
    scale = side / max(height, width)
    return max(32, round(height * scale / 32) * 32), max(32, round(width * scale / 32) * 32)


def probability_map(
    gray: np.ndarray, providers: Sequence[str] | None = None, max_side: int = MAX_SIDE, min_side: int = MIN_SIDE
) -> np.ndarray:
    """Text probability at network resolution.

    Args:
        gray: uint8 [H, W].
        providers: onnxruntime providers (default :func:`default_providers`).
        max_side, min_side: bounds of the long side of the network input (:func:`input_size`).

    Returns:
        float32 [h, w] in [0, 1], with (h, w) = :func:`input_size` (H, W, max_side, min_side).
    """
    h, w = input_size(*gray.shape, max_side, min_side)
    # INTER_AREA when shrinking keeps thin strokes (it averages); bilinear when enlarging small images.
    shrinking = h * w < gray.shape[0] * gray.shape[1]
    small = cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    x = small.astype(np.float32) * (2.0 / 255.0) - 1.0  # (x / 255 - 0.5) / 0.5
    batch = np.ascontiguousarray(np.broadcast_to(x, (1, 3, h, w)))
    session = get_session(providers)
    (output,) = session.run(None, {session.get_inputs()[0].name: batch})
    return output[0, 0]


def _box_score(probability: np.ndarray, corners: np.ndarray) -> float:
    """Mean of ``probability`` (float32 [h, w]) inside the polygon ``corners`` (float [4, 2]); PaddleOCR's score."""
    h, w = probability.shape
    x0, y0 = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, [w - 1, h - 1])
    x1, y1 = np.clip(np.ceil(corners.max(axis=0)).astype(int), 0, [w - 1, h - 1])
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    cv2.fillPoly(mask, [np.round(corners - [x0, y0]).astype(np.int32)], 1)
    return float(cv2.mean(probability[y0 : y1 + 1, x0 : x1 + 1], mask)[0])


def db_boxes(
    probability: np.ndarray,
    binary_threshold: float = BINARY_THRESHOLD,
    box_threshold: float = BOX_THRESHOLD,
    unclip_ratio: float = UNCLIP_RATIO,
) -> list[tuple[tuple[float, float, float, float], tuple[float, float], float]]:
    """DB post-processing of one probability map.

    Args:
        probability: float32 [h, w] text probability.
        binary_threshold: threshold of the map.
        box_threshold: minimum mean probability inside a kernel's rectangle.
        unclip_ratio: growth of the kernel, ``d = area × ratio / perimeter`` on every side.

    Returns:
        (box, kernel_size, score) per text region, at map resolution: the axis-aligned unclipped box
        (x0, y0, x1, y1) as floats in continuous coordinates (pixel i spans [i, i + 1)), the axis-aligned
        (width, height) of the kernel before unclipping, the score.
    """
    bitmap = (probability > binary_threshold).astype(np.uint8)
    contours, _ = cv2.findContours(bitmap, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    found = []
    for contour in contours[:MAX_CANDIDATES]:
        rect = cv2.minAreaRect(contour)
        width, height = rect[1]
        if min(width, height) < MIN_KERNEL_SIDE:
            continue
        corners = cv2.boxPoints(rect)
        score = _box_score(probability, corners)
        if score < box_threshold:
            continue
        # Offsetting a polygon by d with round joins (PaddleOCR uses pyclipper) moves its axis-aligned bounding box
        # out by exactly d on each side, so the box needs neither pyclipper nor shapely.
        distance = width * height * unclip_ratio / (2.0 * (width + height))
        if min(width, height) + 2 * distance < MIN_KERNEL_SIDE + 2:
            continue
        # Contour points are pixel indices, i.e. pixel centres at +0.5 in the continuous frame whose box edges scale.
        (kx0, ky0), (kx1, ky1) = corners.min(axis=0) + 0.5, corners.max(axis=0) + 0.5
        box = (kx0 - distance, ky0 - distance, kx1 + distance, ky1 + distance)
        found.append((tuple(float(v) for v in box), (float(kx1 - kx0), float(ky1 - ky0)), score))
    return found


@DETECTORS.register("text_dbnet")
class DBNetTextDetector(Detector):
    """Burned-in text lines (``text``) and single-glyph laterality markers (``marker``), with PP-OCRv6 det.

    Args:
        providers: onnxruntime execution providers; default CUDA when available, then the CPU.
        max_side: long side of the network input for images at least that large, a multiple of 32 (the cost
            grows with its square).
        min_side: long side of the network input for images smaller than that, a multiple of 32.
        box_threshold: minimum mean text probability of a box (higher: fewer false positives on devices such
            as ECG electrodes, fewer faint markers).
        unclip_ratio: growth of the network's shrunk text kernels back to text boxes.
    """

    name: ClassVar[str] = "text_dbnet"
    version: ClassVar[str] = "ppocrv6-det-small-1"
    kinds: ClassVar[tuple[str, ...]] = ("text", "marker")

    def __init__(
        self,
        providers: Sequence[str] | None = None,
        max_side: int = MAX_SIDE,
        min_side: int = MIN_SIDE,
        box_threshold: float = BOX_THRESHOLD,
        unclip_ratio: float = UNCLIP_RATIO,
    ) -> None:
        if min(max_side, min_side) < 32 or max_side % 32 or min_side % 32 or min_side > max_side:
            raise ConfigError(
                "text_dbnet max_side and min_side must be multiples of 32 (the network's stride) with "
                f"32 <= min_side <= max_side, got max_side={max_side}, min_side={min_side}"
            )
        self.providers = tuple(providers) if providers is not None else None
        self.max_side, self.min_side = max_side, min_side
        self.box_threshold = box_threshold
        self.unclip_ratio = unclip_ratio

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Find text lines and markers.

        Args:
            image: uint8 [H, W] grayscale or [H, W, 3] RGB.

        Returns:
            Detections of kind ``text`` or ``marker``, boxes in ``image`` pixel coordinates.
        """
        gray = to_gray(image)
        return self.regions_from_map(probability_map(gray, self.providers, self.max_side, self.min_side), *gray.shape)

    def regions_from_map(self, probability: np.ndarray, height: int, width: int) -> list[Detection]:
        """Steps 3-5 of the method: boxes from a probability map, scaled to the image, filtered and typed.

        Args:
            probability: float32 [h, w] text probability of the image (:func:`probability_map`).
            height, width: the image's size.

        Returns:
            Detections of kind ``text`` or ``marker``, boxes in image pixel coordinates.
        """
        sx, sy = width / probability.shape[1], height / probability.shape[0]
        max_short_side = MAX_SHORT_SIDE_FRACTION * min(height, width)
        found: list[Detection] = []
        for (x0, y0, x1, y1), (kernel_w, kernel_h), score in db_boxes(
            probability, box_threshold=self.box_threshold, unclip_ratio=self.unclip_ratio
        ):
            box = (
                max(0, int(np.floor(x0 * sx))),
                max(0, int(np.floor(y0 * sy))),
                min(width, int(np.ceil(x1 * sx))),
                min(height, int(np.ceil(y1 * sy))),
            )
            if box[2] <= box[0] or box[3] <= box[1] or min(box[2] - box[0], box[3] - box[1]) > max_short_side:
                continue
            one_glyph = kernel_w * sx <= MARKER_MAX_ASPECT * kernel_h * sy
            kind = "marker" if one_glyph and kernel_h * sy >= MARKER_MIN_HEIGHT * max(height, width) else "text"
            found.append(Detection(kind, *box, min(1.0, score), self.name, self.version))
        return found
