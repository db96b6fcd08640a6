"""report.md is rendered from the manifest alone: the same manifest must give the same bytes.

The golden files under tests/golden/ were rendered from report_manifests.json by the report code
before it was split into one function per section; they cover every section and branch (a served
ensemble with and without a serve reason, refused, forced and dry-run gates, a target reached and
missed, both warnings, missing threshold rows, a manifest from before ensemble serving, an empty one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailtriage_trainer.report import render_markdown

GOLDEN = Path(__file__).resolve().parent / "golden"
MANIFESTS = json.loads((GOLDEN / "report_manifests.json").read_text(encoding="utf-8"))

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_report_renders_byte_identical_to_the_golden_file(name: str) -> None:
    expected = (GOLDEN / f"report_{name}.md").read_text(encoding="utf-8")
    assert render_markdown(MANIFESTS[name], confusion_png=True) == expected


def test_report_without_confusion_png_leaves_out_only_its_section() -> None:
    expected = (GOLDEN / "report_full_nopng.md").read_text(encoding="utf-8")
    assert render_markdown(MANIFESTS["full"], confusion_png=False) == expected
    assert "## Confusion matrix" in (GOLDEN / "report_full.md").read_text(encoding="utf-8")
    assert "## Confusion matrix" not in expected
