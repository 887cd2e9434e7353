"""The documentation a fresh clone reads is complete and current."""

from __future__ import annotations

import re

import pytest

from pipeline.settings import reference
from steps import CATALOG
from tests.conftest import ROOT


def test_every_yaml_key_is_documented() -> None:
    keys = [k for k, _, _ in reference.keys(CATALOG)]
    assert "steps.calibrate.method" in keys and "data.*.deps" in keys and "sweep.grid" in keys
    undocumented = [k for k in keys if not reference.DESCRIPTIONS.get(k)]
    assert undocumented == [], f"describe these keys in pipeline/settings/reference.py DESCRIPTIONS: {undocumented}"
    stale = [k for k in reference.DESCRIPTIONS if k not in keys]
    assert stale == [], f"these described keys no longer exist: {stale}"


def test_committed_reference_is_current() -> None:
    committed = (ROOT / "docs" / "yaml-reference.md").read_text()
    assert committed == reference.render(CATALOG), "regenerate: int8pipe reference > docs/yaml-reference.md"


def test_nothing_links_outside_the_repository() -> None:
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = path.read_text()
        assert "DESIGN.md" not in text, path
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not target.startswith(("http://", "https://")):
                resolved = (path.parent / target).resolve()
                assert resolved.exists(), f"{path.name} links to missing {target}"
                assert resolved.is_relative_to(ROOT), f"{path.name} links outside the repository: {target}"


def test_int8pipe_reference_prints_the_committed_reference(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.orchestration.cli import main

    assert main(["reference"]) == 0
    assert capsys.readouterr().out == (ROOT / "docs" / "yaml-reference.md").read_text()
