"""bench/schemas/, the corpus bench/structured.py sends as ``response_format``: each
file a JSON Schema that Draft 2020-12's meta-schema accepts, each name unique and
one that OpenAI's ``json_schema.name`` allows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared.spec import FUNCTION_NAME_PATTERN

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

CORPUS = Path(__file__).resolve().parent.parent / "bench" / "schemas"


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*/*.json"))


def test_every_entry_is_a_draft_2020_12_schema():
    jsonschema = pytest.importorskip("jsonschema")
    broken = {}
    for path in corpus_files():
        try:
            jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))
        except (ValueError, jsonschema.SchemaError) as e:
            broken[f"{path.parent.name}/{path.stem}"] = str(e).splitlines()[0]
    assert broken == {}


def test_names_are_unique_and_usable_as_the_response_format_name():
    names = [path.stem for path in corpus_files()]
    assert len(names) >= 120
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
    assert [n for n in names if not re.fullmatch(FUNCTION_NAME_PATTERN, n)] == []
