"""A source-shortcut task on the real radiographs of ``shared/data/cxr-real`` (attribution in its README).

Adult COVID-19 radiographs from Hannover (grey-box laterality markers, burned-in German text, collimation bands)
against pediatric radiographs from the Kermany set (224 px JPEGs, small "R" markers, time/ID text): a classifier
told to separate the two sources can key on markers, text and borders instead of the anatomy, the setting of
DeGrave et al. 2021 exaggerated. ``make audit-cxr`` audits a probe trained on this task::

    python -m audit.data.cxr_real ../shared/data/cxr-real reports/cxr-real/manifest.csv
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from audit.errors import DataError

HANNOVER = "hannover-mhh-covid19/png"
KERMANY = "kermany-pediatric-cxr-224px"


def write_source_manifest(root: Path, out: Path, kermany_per_class: int = 60, seed: int = 0) -> Path:
    """Write a manifest (``path,label``, paths relative to ``root``) of every Hannover image, labelled
    ``hannover``, and ``kermany_per_class`` images drawn at random from each Kermany class folder, labelled
    ``kermany``.

    Raises:
        DataError: ``root`` does not hold the cxr-real folders.
    """
    root = Path(root)
    hannover = sorted(p.relative_to(root).as_posix() for p in (root / HANNOVER).glob("*.png"))
    if not hannover:
        raise DataError(f"{root / HANNOVER} holds no PNG; pass the cxr-real folder (see shared/data/cxr-real)")
    rng = random.Random(seed)
    kermany: list[str] = []
    for folder in ("NORMAL", "PNEUMONIA"):
        files = sorted(p.relative_to(root).as_posix() for p in (root / KERMANY / folder).glob("*.jpeg"))
        if len(files) < kermany_per_class:
            raise DataError(f"{root / KERMANY / folder} holds {len(files)} JPEGs, fewer than {kermany_per_class}")
        kermany += rng.sample(files, kermany_per_class)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "label"))
        writer.writerows([(p, "hannover") for p in hannover] + [(p, "kermany") for p in sorted(kermany)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=write_source_manifest.__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kermany-per-class", type=int, default=60)
    args = parser.parse_args()
    print(write_source_manifest(args.root, args.out, args.kermany_per_class))


if __name__ == "__main__":
    main()
