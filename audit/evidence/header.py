"""What DICOM headers say about burned-in annotation, beside what the detectors found.

DICOM's Burned In Annotation (0028,0301) says whether the pixels carry text or marks that identify the patient
or the exposure. The flag is written by the modality or by whoever exported the file, so it is evidence of its
own: per class, how many images are flagged YES / NO / not stated, and how often the text and marker detectors
agree with the flag. A flag whose rate differs between classes is a source signal a model can learn through the
pixels it describes (the report says so); it does not change the findings' verdicts, which rest on the regions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

# Detected kinds that count as "an annotation in the pixels" when comparing with the header's flag.
ANNOTATION_KINDS = ("text", "marker", "watermark")
# A class whose YES rate differs from the other classes' by this much (with enough flagged images) gets a note.
RATE_GAP = 0.2
MIN_STATED = 10


def burned_in_by_class(images: pa.Table, regions: pa.Table, labels: Sequence[str]) -> list[dict]:
    """Per class, the header's Burned In Annotation flag against the detectors.

    Args:
        images: the ``images`` table (needs ``image_id``, ``label``, ``format``, ``burned_in_annotation``).
        regions: the ``regions`` table (needs ``image_id``, ``kind``).
        labels: the dataset's labels, in order.

    Returns:
        One row per label: ``label``, ``n_images``, ``n_dicom``, ``flag_yes``, ``flag_no``, ``flag_absent``,
        ``yes_rate`` (YES among stated flags, None when none is stated), ``yes_rate_other`` (the other classes'),
        ``yes_detected`` (flagged YES and a text/marker/watermark region found), ``no_detected`` (flagged NO but a
        region found: the flag is wrong, or marks were added after export), ``note``. Empty when no image is DICOM.
    """
    if images.num_rows == 0 or "burned_in_annotation" not in images.column_names:
        return []
    formats = np.array(images.column("format").to_pylist(), dtype=object)
    dicom = formats == "DICOM"
    if not dicom.any():
        return []
    label = np.array(images.column("label").to_pylist(), dtype=object)
    flag = np.array(images.column("burned_in_annotation").to_pylist(), dtype=object)
    yes = np.array([f is True for f in flag]) & dicom
    no = np.array([f is False for f in flag]) & dicom
    kinds = regions.column("kind").to_pylist() if regions.num_rows else []
    annotated_ids = {
        i
        for i, k in zip(regions.column("image_id").to_pylist() if kinds else [], kinds, strict=True)
        if k in ANNOTATION_KINDS
    }
    detected = np.array([i in annotated_ids for i in images.column("image_id").to_pylist()])
    rows = []
    for name in labels:
        mine = label == name
        other = ~mine

        def rate(mask: np.ndarray) -> float | None:
            stated = int((yes & mask).sum() + (no & mask).sum())
            return None if stated == 0 else float((yes & mask).sum() / stated)

        yes_rate, yes_rate_other = rate(mine), rate(other)
        stated = int((yes & mine).sum() + (no & mine).sum())
        note = ""
        if (
            yes_rate is not None
            and yes_rate_other is not None
            and stated >= MIN_STATED
            and abs(yes_rate - yes_rate_other) >= RATE_GAP
        ):
            note = (
                f"the header flags burned-in annotation on {yes_rate:.0%} of {name}'s images vs "
                f"{yes_rate_other:.0%} of the others': the annotations themselves may separate the classes"
            )
        rows.append(
            {
                "label": name,
                "n_images": int(mine.sum()),
                "n_dicom": int((dicom & mine).sum()),
                "flag_yes": int((yes & mine).sum()),
                "flag_no": int((no & mine).sum()),
                "flag_absent": int((dicom & mine).sum() - stated),
                "yes_rate": yes_rate,
                "yes_rate_other": yes_rate_other,
                "yes_detected": int((yes & mine & detected).sum()),
                "no_detected": int((no & mine & detected).sum()),
                "note": note,
            }
        )
    return rows
