"""The HTML report: one self-contained page with the verdict, the findings, figures and errors.

Build a :class:`ReportContent` and pass it to :func:`write_report`.
"""

from __future__ import annotations

from audit.report.content import VERDICTS, ClassMap, GalleryItem, ReportContent
from audit.report.html import render_report, write_report

__all__ = ["VERDICTS", "ClassMap", "GalleryItem", "ReportContent", "render_report", "write_report"]
