"""summary.json against its published JSON Schema (audit/report/summary.schema.json; docs/summary-json.md).

A tiny real audit (60 images of 64 px, a 2-epoch probe, Grad-CAM, the counterfactual test and discovery on) is run
twice into one folder, so that ``changes`` is null after the first run and filled after the second; both
summaries must validate, and every key they hold must be documented in the schema, so that a key added to
``audit.pipeline.summarise`` without documenting it fails here. The multi-label index is checked the same way
against audit/report/multilabel-index.schema.json.
"""

from __future__ import annotations

import copy
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from jsonschema import Draft202012Validator

from audit.config import AuditConfig, build_config
from audit.data.demo import write_demo
from audit.evidence.header import burned_in_by_class
from audit.history import compare_runs
from audit.multilabel import run_findings
from audit.pipeline import run_pipeline

# The fastest settings used elsewhere (tests/test_concurrency.py), with the counterfactual test and discovery left
# on so that the dependence columns and the clusters are filled; fewer bootstrap resamples (the minimum).
SETTINGS = {
    "shard_size": 20,
    "gallery_size": 2,
    "workers": 2,
    "methods": "gradcam",
    "probe.image_size": 64,
    "probe.epochs": 2,
    "findings.bootstrap": 100,
}


def _schema(name: str) -> dict:
    return json.loads((files("audit.report") / name).read_text(encoding="utf-8"))


def _validator(name: str) -> Draft202012Validator:
    schema = _schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)  # no format_checker: formats are not asserted


def _errors(validator: Draft202012Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top level)'}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        reference = schema["$ref"]
        assert reference.startswith("#/"), f"only local references are expected, found {reference}"
        target: Any = root
        for part in reference[2:].split("/"):
            target = target[part]
        schema = target
    return schema


def _undocumented(instance: Any, schema: dict, root: dict, path: str = "") -> list[str]:
    """Paths of the object keys in ``instance`` that ``schema`` does not name (in ``properties`` or
    ``patternProperties``). An object whose ``additionalProperties`` is a schema is a map (its keys are data, such
    as ``counts.errors_by_stage``): its values are checked, not its keys."""
    schema = _resolve(schema, root)
    found: list[str] = []
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        values_schema = schema.get("additionalProperties")
        for key, value in instance.items():
            where = f"{path}.{key}" if path else key
            matching = [s for pattern, s in patterns.items() if re.search(pattern, key)]
            if key in properties:
                found += _undocumented(value, properties[key], root, where)
            elif matching:
                found += _undocumented(value, matching[0], root, where)
            elif isinstance(values_schema, dict):
                found += _undocumented(value, values_schema, root, where)
            else:
                found.append(where)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            found += _undocumented(item, schema["items"], root, f"{path}[{i}]")
    return found


@pytest.fixture(scope="module")
def summaries(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """OUT/summary.json after a first audit (nothing to compare with) and after a second one into the same folder."""
    root = tmp_path_factory.mktemp("summary-schema")
    data = root / "data"
    write_demo(data, n=60, shortcut_rate=0.9, seed=1, size=64)
    (data / "normal" / "empty.png").write_bytes(b"")  # an error, so that counts.errors_by_stage is not empty
    config = build_config(data=data, out=root / "out", fail_on="shortcut", **SETTINGS)
    run_pipeline(config)
    first = json.loads((root / "out" / "summary.json").read_text(encoding="utf-8"))
    run_pipeline(config)  # reuses every shard: only the summary is computed again
    second = json.loads((root / "out" / "summary.json").read_text(encoding="utf-8"))
    return first, second


@pytest.mark.slow
def test_summary_json_validates_against_its_schema(summaries: tuple[dict, dict]) -> None:
    validator = _validator("summary.schema.json")
    documented = validator.schema["properties"]["schema_version"]["const"]
    first, second = summaries
    assert first["changes"] is None and second["changes"] is not None  # both forms of changes are checked
    assert second["findings"] and second["leakage"] and second["sanity"] and second["clusters"]
    assert any(f["n_counterfactual"] is not None for f in second["findings"])  # the dependence columns are filled
    assert second["counts"]["errors_by_stage"] == {"decode": 1} and second["gate"] is not None
    for summary in summaries:
        assert summary["schema_version"] == documented, (
            f"summary.json says schema_version {summary['schema_version']}, the schema documents {documented}: "
            "update audit/pipeline.py summarise() or audit/report/summary.schema.json (docs/summary-json.md)"
        )
        assert _errors(validator, summary) == []


@pytest.mark.slow
def test_every_key_of_summary_json_is_documented(summaries: tuple[dict, dict]) -> None:
    schema = _schema("summary.schema.json")
    for summary in summaries:
        assert set(summary) <= set(schema["properties"]), "top-level keys missing from the schema"
        finding_columns = set(schema["$defs"]["finding"]["properties"])
        assert all(set(row) <= finding_columns for row in summary["findings"]), "findings keys missing from the schema"
        assert _undocumented(summary, schema, schema) == []


@pytest.mark.slow
def test_a_broken_summary_fails_validation(summaries: tuple[dict, dict]) -> None:
    validator = _validator("summary.schema.json")
    broken = copy.deepcopy(summaries[1])
    broken["verdict"] = 3
    broken["findings"][0]["enrichment"] = "high"
    paths = {tuple(error.absolute_path) for error in validator.iter_errors(broken)}
    assert ("verdict",) in paths and ("findings", 0, "enrichment") in paths, paths


@pytest.mark.slow
def test_burned_in_rows_and_every_kind_of_change_validate(summaries: tuple[dict, dict]) -> None:
    """Forms the demo audit does not write: DICOM burned-in rows, and changes with new, resolved and changed findings
    (a finding absent from one run has a null side)."""
    validator = _validator("summary.schema.json")
    schema = validator.schema
    summary = copy.deepcopy(summaries[1])
    images = pa.table(
        {
            "image_id": [f"i{k}" for k in range(6)],
            "label": ["normal"] * 3 + ["opacity"] * 3,
            "format": ["DICOM", "DICOM", "PNG", "DICOM", "DICOM", "DICOM"],
            "burned_in_annotation": [True, None, None, False, True, False],
        }
    )
    regions = pa.table({"image_id": ["i0", "i3"], "kind": ["text", "marker"]})
    summary["burned_in_annotation"] = burned_in_by_class(images, regions, ["normal", "opacity"])
    assert any(row["yes_rate"] is not None for row in summary["burned_in_annotation"])

    previous = copy.deepcopy(summary)
    gone = previous["findings"].pop()  # new now (if above none)
    previous["findings"].append({**gone, "region_kind": "vanished", "verdict": "watch"})  # resolved
    previous["findings"][0]["verdict"] = "shortcut" if summary["findings"][0]["verdict"] == "watch" else "watch"
    previous["run"] = {"id": "20261123T020000Z", "folder": "runs/20261123T020000Z", "recorded_at": None}
    summary["changes"] = compare_runs(previous, summary)
    assert any(row["before"] is None for row in summary["changes"]["findings"])
    assert any(row["now"] is None for row in summary["changes"]["findings"])
    assert _errors(validator, summary) == []
    assert _undocumented(summary, schema, schema) == []


def test_the_multilabel_index_validates_against_its_schema(tmp_path: Path) -> None:
    validator = _validator("multilabel-index.schema.json")
    config = build_config(
        data=tmp_path / "data", out=tmp_path / "out", finding_columns=["Opacity", "Pleural Effusion"], fail_on="watch"
    )
    audited: list[str | None] = []

    def run_one(finding_config: AuditConfig) -> dict:
        """A stub audit: the least of a summary that the index reads."""
        audited.append(finding_config.finding)
        shortcut = finding_config.finding == "Opacity"
        return {
            "schema_version": 3,
            "verdict": "shortcut" if shortcut else "none",
            "gate": {"fail_on": "watch", "failed": shortcut},
            "counts": {"images": 40, "errors": 1, "by_verdict": {"none": 6, "watch": 1, "shortcut": int(shortcut)}},
            "findings": [],
        }

    returned = run_findings(config, run_one)
    assert audited == ["Opacity", "Pleural Effusion"]
    index = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert index == returned and index["gate"]["failed"] is True
    assert _errors(validator, index) == []
    assert _undocumented(index, validator.schema, validator.schema) == []
    broken = copy.deepcopy(index)
    broken["findings"][0]["images"] = "40"
    broken["schema"] = "shortcut-audit/summary"
    paths = {tuple(error.absolute_path) for error in validator.iter_errors(broken)}
    assert ("schema",) in paths and ("findings", 0, "images") in paths, paths
