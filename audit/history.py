"""Run history of one output folder: each finished audit kept under ``OUT/runs/<UTC time>/``, and what changed.

A recurring audit (``audit serve``, or cron running ``audit run``) writes into the same output folder every time,
so later runs reuse the earlier work. After each run, :func:`record_run` copies the run's ``summary.json`` and
``index.html`` into a folder of its own and moves the pointer to it::

    OUT/runs/20261123T020012Z/summary.json, index.html
    OUT/runs/20261124T020009Z/summary.json, index.html
    OUT/runs/latest -> 20261124T020009Z     (relative symlink, replaced atomically)
    OUT/runs/LATEST                         (text file holding "20261124T020009Z", for systems without symlinks)

Before the next run writes its summary, :func:`load_previous_summary` reads the latest recorded run and
:func:`compare_runs` lists what changed since then; the result goes into the new summary as ``"changes"`` and
into the report's "Since the previous run" section.

Which runs are comparable: two runs are of the same dataset when both summaries carry a ``"dataset"`` value and
the values are equal; when either summary lacks it, when both have the same labels (class names) and the same
region kinds (as sets). A different dataset in the same folder gives no comparison (``None``), never a misleading one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from audit.store.state import write_text_atomic

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
LATEST_LINK = "latest"
LATEST_FILE = "LATEST"
# A run folder's name: UTC time, plus "-2", "-3", ... for a second run within the same second.
RUN_NAME = re.compile(r"^\d{8}T\d{6}Z(-\d+)?$")
VERDICT_ORDER = ("none", "watch", "shortcut")
# The per-finding numbers whose trend is reported (summary finding key -> display name).
FINDING_NUMBERS = {"enrichment": "enrichment", "flip_rate": "flip rate", "leakage_auc": "leakage AUC"}
FINDING_KEY = ("label", "group", "region_kind", "method")
COPIED_FILES = ("summary.json", "index.html")


def _latest_name(runs: Path) -> str | None:
    """The latest run folder's name: from ``LATEST`` first, else from the ``latest`` symlink; None if neither."""
    name: str | None = None
    try:
        name = (runs / LATEST_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        try:
            name = os.readlink(runs / LATEST_LINK)
        except OSError:
            return None
    name = name.rstrip("/")
    if not RUN_NAME.match(name):  # never follow a pointer out of OUT/runs
        log.warning("ignoring the run pointer in %s: %r is not a run folder name", runs, name)
        return None
    return name


def run_time(name: str) -> str | None:
    """The UTC time a run folder's name encodes, as ISO 8601 (``2026-11-23T08:15:00Z``), or None."""
    try:
        moment = datetime.strptime(name.split("-", 1)[0], "%Y%m%dT%H%M%SZ")
    except ValueError:
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def load_previous_summary(out: Path) -> dict | None:
    """The summary of the latest recorded run of the output folder ``out``, or None when there is none.

    The returned dict is the recorded ``summary.json`` plus a key ``"run"``: ``{"id": folder name,
    "folder": path of the run folder, "recorded_at": ISO UTC time}``. An unreadable or corrupt record is logged
    and treated as no previous run: a broken history never stops an audit.
    """
    runs = Path(out) / RUNS_DIR
    name = _latest_name(runs)
    if name is None:
        return None
    folder = runs / name
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("cannot read the previous run's summary in %s (%s); comparing with nothing", folder, exc)
        return None
    if not isinstance(summary, dict):
        log.warning("the previous run's summary in %s is not a JSON object; comparing with nothing", folder)
        return None
    summary["run"] = {"id": name, "folder": str(folder), "recorded_at": run_time(name)}
    return summary


def same_dataset(previous: dict, current: dict) -> bool:
    """Whether two summaries describe the same dataset (see the module docstring for the rule)."""
    if previous.get("dataset") is not None and current.get("dataset") is not None:
        return previous["dataset"] == current["dataset"]
    return set(previous.get("labels") or ()) == set(current.get("labels") or ()) and set(
        previous.get("region_kinds") or ()
    ) == set(current.get("region_kinds") or ())


def _level(verdict: Any) -> int:
    return VERDICT_ORDER.index(verdict) if verdict in VERDICT_ORDER else 0


def _key(finding: dict) -> tuple:
    return tuple(finding.get(k) for k in FINDING_KEY)


def _sort_key(key: tuple) -> tuple:
    return tuple("" if v is None else str(v) for v in key)


def _side(finding: dict | None) -> dict | None:
    if finding is None:
        return None
    side = {"verdict": finding.get("verdict")}
    side.update({k: finding.get(k) for k in FINDING_NUMBERS})
    return side


def _row(key: tuple, before: dict | None, now: dict | None) -> dict:
    return {**dict(zip(FINDING_KEY, key, strict=True)), "before": _side(before), "now": _side(now)}


def _accuracy(summary: dict) -> Any:
    model = summary.get("model") or {}
    return model.get("heldout_accuracy", model.get("accuracy"))


def compare_runs(previous: dict | None, current: dict) -> dict | None:
    """What changed since the previous run of the same dataset; None without a previous run or for another dataset.

    Findings are matched by (label, group, region_kind, method). Returns::

        {
          "previous": {"id", "folder", "recorded_at", "verdict"},   # id/folder/time None if unknown
          "new":             [row, ...],  # above "none" now; absent or "none" before
          "resolved":        [row, ...],  # above "none" before; "none" or absent now
          "verdict_changes": [row, ...],  # above "none" in both runs, with a different verdict (watch <-> shortcut)
          "trend":    [{"name", "before", "now"}, ...],  # overall verdict, images, errors, watch/shortcut counts,
                                                          # model accuracy
          "findings": [row, ...],  # every finding of either run: verdict, enrichment, flip rate, leakage AUC
        }

    where ``row = {"label", "group", "region_kind", "method", "before": side | None, "now": side | None}`` and
    ``side = {"verdict", "enrichment", "flip_rate", "leakage_auc"}`` (None for a finding absent from that run).
    Rows are sorted by their key. The three lists are disjoint.
    """
    if previous is None:
        return None
    if not same_dataset(previous, current):
        log.info("the previous run in this folder audited another dataset; no comparison")
        return None
    before = {_key(f): f for f in previous.get("findings") or ()}
    now = {_key(f): f for f in current.get("findings") or ()}
    new, resolved, changed, rows = [], [], [], []
    for key in sorted(before.keys() | now.keys(), key=_sort_key):
        old, cur = before.get(key), now.get(key)
        old_level = _level(old.get("verdict")) if old else 0
        cur_level = _level(cur.get("verdict")) if cur else 0
        row = _row(key, old, cur)
        rows.append(row)
        if cur_level > 0 and old_level == 0:
            new.append(row)
        elif old_level > 0 and cur_level == 0:
            resolved.append(row)
        elif old_level > 0 and cur_level > 0 and old_level != cur_level:
            changed.append(row)
    old_counts, cur_counts = previous.get("counts") or {}, current.get("counts") or {}
    old_by, cur_by = old_counts.get("by_verdict") or {}, cur_counts.get("by_verdict") or {}
    trend = [
        {"name": "overall verdict", "before": previous.get("verdict"), "now": current.get("verdict")},
        {"name": "images", "before": old_counts.get("images"), "now": cur_counts.get("images")},
        {"name": "errors", "before": old_counts.get("errors"), "now": cur_counts.get("errors")},
        {"name": "findings at watch", "before": old_by.get("watch"), "now": cur_by.get("watch")},
        {"name": "findings at shortcut", "before": old_by.get("shortcut"), "now": cur_by.get("shortcut")},
        {"name": "model accuracy", "before": _accuracy(previous), "now": _accuracy(current)},
    ]
    run = previous.get("run") or {}
    return {
        "previous": {
            "id": run.get("id"),
            "folder": run.get("folder"),
            "recorded_at": run.get("recorded_at"),
            "verdict": previous.get("verdict"),
        },
        "new": new,
        "resolved": resolved,
        "verdict_changes": changed,
        "trend": trend,
        "findings": rows,
    }


def _new_run_folder(runs: Path) -> Path:
    """Create and return ``runs/<UTC time>``; ``-2``, ``-3``, ... when that name is taken (same second)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 10_000):
        folder = runs / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()  # exclusive: two processes never get the same folder
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"{runs}: no free run folder name for {stamp}")


def _replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (relative), atomically: a temporary symlink renamed over the old one."""
    temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary, target_is_directory=True)
    try:
        os.replace(temporary, link)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def record_run(out: Path, summary: dict) -> Path:
    """Keep this run's ``summary.json`` and ``index.html`` in ``out/runs/<UTC time>/`` and point ``latest`` at it.

    The files are copied from ``out`` (a missing ``summary.json`` is written from ``summary``; a missing report is
    skipped). The pointers move only after the copies are complete, so a reader following ``LATEST`` or ``latest``
    never sees a half-written run. Returns the run folder.
    """
    out = Path(out)
    runs = out / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    folder = _new_run_folder(runs)
    for name in COPIED_FILES:
        source = out / name
        if source.is_file():
            shutil.copy2(source, folder / name)
        elif name == "summary.json":
            (folder / name).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    write_text_atomic(runs / LATEST_FILE, folder.name + "\n")
    try:
        _replace_symlink(runs / LATEST_LINK, folder.name)
    except (OSError, NotImplementedError) as exc:  # e.g. Windows without the symlink privilege; LATEST suffices
        log.info("no symlink %s (%s); %s names the latest run", runs / LATEST_LINK, exc, runs / LATEST_FILE)
    log.info("run recorded in %s", folder)
    return folder
