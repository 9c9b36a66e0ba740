"""Multi-label datasets: one binary audit per finding, and the index that ties them together.

A ChestX-ray14 or CheXpert manifest lists several findings per image. Each finding is audited on its own as
"<finding>" against "no <finding>" (README, "Multi-label datasets"), into ``OUT/<finding>/`` with its own
report, tables and release gate; ``OUT/summary.json`` and ``OUT/index.html`` list the findings' verdicts, and
the gate fails when any finding's gate fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import jinja2

from audit.config import AuditConfig
from audit.errors import ConfigError
from audit.evidence.findings import gate_failed
from audit.history import VERDICT_ORDER
from audit.store.state import write_json_atomic, write_text_atomic

INDEX_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Shortcut audit: {{ dataset }}</title>
<style>body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
table{border-collapse:collapse}td,th{padding:.3rem .8rem;border-bottom:1px solid #ccc;text-align:left}
.shortcut{color:#D55E00;font-weight:bold}.watch{color:#B07800;font-weight:bold}.none{color:#007A5A}</style></head>
<body><h1>Shortcut audit, one finding at a time</h1>
<p>Dataset <code>{{ dataset }}</code>: overall verdict <span class="{{ verdict }}">{{ verdict }}</span>{% if gate %};
release gate {{ "FAILED" if gate.failed else "passed" }} (fail on {{ gate.fail_on }}){% endif %}.</p>
<table><thead><tr><th>finding</th><th>verdict</th><th>images</th><th>errors</th><th>report</th></tr></thead><tbody>
{% for row in findings %}<tr><td>{{ row.finding }}</td><td class="{{ row.verdict }}">{{ row.verdict }}</td>
<td>{{ row.images }}</td><td>{{ row.errors }}</td><td><a href="{{ row.folder }}/index.html">report</a></td></tr>
{% endfor %}</tbody></table></body></html>
"""


def finding_folder(finding: str) -> str:
    """A folder name for a finding: letters, digits, ``.``, ``_`` and ``-`` kept, the rest turned into ``-``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", finding).strip("-.")
    if not name:
        raise ConfigError(f"finding {finding!r} has no letter or digit to name its output folder")
    return name


def run_findings(config: AuditConfig, run_one: Callable[[AuditConfig], dict]) -> dict:
    """Audit each of ``config.finding_columns`` with ``run_one`` (the pipeline or the Prefect flow) and write the index.

    Returns:
        The index summary: ``verdict`` (the worst finding's), ``gate`` (failed when any finding's failed),
        ``counts`` and ``findings`` (per finding: verdict, counts, folder).
    """
    folders = [finding_folder(f) for f in config.finding_columns]
    if len(set(folders)) != len(folders):
        raise ConfigError(f"findings {list(config.finding_columns)} give the same folder name twice; rename one")
    rows, by_verdict = [], dict.fromkeys(VERDICT_ORDER, 0)
    for finding, folder in zip(config.finding_columns, folders, strict=True):
        summary = run_one(
            config.model_copy(update={"finding": finding, "finding_columns": (), "out": config.out / folder})
        )
        counts = summary["counts"]
        rows.append(
            {
                "finding": finding,
                "folder": folder,
                "verdict": summary["verdict"],
                "images": counts["images"],
                "errors": counts["errors"],
                "gate": summary.get("gate"),
            }
        )
        for verdict, n in counts.get("by_verdict", {}).items():
            by_verdict[verdict] = by_verdict.get(verdict, 0) + n
    verdict = max((r["verdict"] for r in rows), key=VERDICT_ORDER.index, default="none")
    # The worst finding decides, as each finding's own gate does: one finding at fail_on fails the whole.
    gate = {"fail_on": config.fail_on, "failed": gate_failed(verdict, config.fail_on)} if config.fail_on else None
    images, errors = sum(r["images"] for r in rows), sum(r["errors"] for r in rows)
    index = {
        "schema": "shortcut-audit/multilabel-index",
        "schema_version": 1,
        "dataset": str(config.manifest or config.data),
        "verdict": verdict,
        "gate": gate,
        "counts": {"images": images, "errors": errors, "findings": sum(by_verdict.values()), "by_verdict": by_verdict},
        "findings": rows,
    }
    out = Path(config.out)
    write_json_atomic(out / "summary.json", index)
    page = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(INDEX_TEMPLATE)
    write_text_atomic(
        out / "index.html", page.render(dataset=index["dataset"], verdict=verdict, gate=gate, findings=rows)
    )
    return index
