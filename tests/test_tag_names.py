"""Tag keys are contracts: every one is named in pipeline/tag_names.py, once."""

from __future__ import annotations

import re

from pipeline import tag_names
from tests.conftest import ROOT


def test_every_tag_key_is_written_through_tag_names() -> None:
    offenders = []
    for folder in ("pipeline", "steps"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "tag_names.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"[\"']int8pipe\.", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert offenders == [], f"name these tag keys in pipeline/tag_names.py: {offenders}"


def test_tag_names_are_distinct_int8pipe_keys() -> None:
    keys = {k: v for k, v in vars(tag_names).items() if k.endswith("_TAG")}
    assert len(keys) > 30 and all(v.startswith("int8pipe.") for v in keys.values())
    assert len(set(keys.values())) == len(keys)  # one fact, one name
