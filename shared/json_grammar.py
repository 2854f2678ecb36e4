"""JSON Schemas as llguidance grammars: one place for how Hive compiles them, so the
hive's check at submit and the worker's grammar agree.

llguidance (guidance-ai/llguidance) is the grammar engine: no dependencies (the
hive, which never imports torch, checks schemas with it too), first-time compiles
of 2.4 ms median and 37 ms for fifty tools with a 32k vocabulary, 3-7x faster than
xgrammar's (agents send a different tool list on almost every call, so compiles
rarely hit a cache), and it names what it cannot enforce where xgrammar drops it
silently. xgrammar's masks are faster per token; both measured in
docs/benchmarks.md ("Grammar engines: llguidance and xgrammar").
"""

from __future__ import annotations

import json
import re

#: The JSON's layout: one space after ``:`` and ``,`` as Python's json.dumps and
#: most models write it, and no other whitespace. Flexible whitespace lets a
#: sampled answer run on in blanks to max_tokens: peers had to add a switch
#: against it; here compact output is the only behaviour.
LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
#: ``json_object``: any JSON object.
ANY_OBJECT = {"type": "object"}


_WHERE = re.compile(r"^at \d+\(\d+\): (failed to compile JSON schema: )?")


def _readable(message: str) -> str:
    """llguidance's message without its place and excerpt of Hive's wrapper grammar
    ("at 2(8): failed to compile JSON schema: …", then "   1 | %llguidance {}" …),
    which say nothing about the schema; a regex error's own lines stay."""
    lines = _WHERE.sub("", message).split("\n")
    kept = [line.strip() for line in lines if line.strip() and not re.match(r"^\s*(\d+ \||\^+$)", line)]
    return " ".join(kept)


class UnsupportedSchema(ValueError):
    """A schema the grammar engine cannot enforce: the request is refused (400)."""

    code = "UNSUPPORTED_SCHEMA"


_DATE = r"([0-9]{4}-(0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|[0-9]{4}-(0[469]|11)-(0[1-9]|[12][0-9]|30)|[0-9]{4}-02-(0[1-9]|1[0-9]|2[0-8]))"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: Formats whose llguidance grammar lets through values validators refuse, as patterns
#: that admit only values every validator accepts: a leap second (``:60``) anywhere,
#: a hostname label past 63 characters or a name past 253 (bench/structured.py found
#: each in the answers to its corpus).
#: February 29 is left out (whether it exists depends on the year): a narrower set,
#: never a wrong value. [0-9], not \d: Rust's \d takes any Unicode digit.
_FORMAT_PATTERNS = {
    "date-time": f"^{_DATE}T{_TIME}$",
    "time": f"^{_TIME}$",
    "date": f"^{_DATE}$",
    "hostname": f"^{_LABEL}(\\.{_LABEL}){{0,7}}$",
}
#: Keywords whose values are data, not schemas: never rewritten.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def _merges(node) -> bool:
    """Whether the schema merges objects anywhere (``allOf`` of several): closing
    those objects would make the merge unsatisfiable."""
    if isinstance(node, list):
        return any(_merges(item) for item in node)
    if not isinstance(node, dict):
        return False
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        return True
    return any(_merges(value) for key, value in node.items() if key not in _DATA_KEYWORDS)


def _tightened(node, close: bool):
    """The schema with the formats above as patterns; ``uniqueItems: false`` (which
    every array meets, but llguidance refuses as a keyword) left out; and with
    ``close``, objects that list their properties closed to others. JSON Schema
    leaves them open, so a sampled answer may add keys without end (LangChain's
    function calling strips ``additionalProperties``; tests/test_clients.py saw
    answers cut at max_tokens); closed, every answer is still valid for the open schema."""
    if isinstance(node, list):
        return [_tightened(item, close) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: value if key in _DATA_KEYWORDS else _tightened(value, close) for key, value in node.items()}
    if close and isinstance(out.get("properties"), dict) and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & out.keys():
        out["additionalProperties"] = False
    fmt = out.get("format")
    if isinstance(fmt, str) and fmt in _FORMAT_PATTERNS and "pattern" not in out:
        del out["format"]
        out["pattern"] = _FORMAT_PATTERNS[fmt]
        if fmt == "hostname":  # and at most 253 characters in all
            out["maxLength"] = min(out.get("maxLength", 253), 253) if isinstance(out.get("maxLength"), int) else 253
    if out.get("uniqueItems") is False:
        del out["uniqueItems"]
    return out


def with_layout(schema: dict | None, strict: bool) -> dict:
    """The schema with Hive's layout for llguidance (its ``x-guidance`` key).
    ``strict``: a keyword llguidance cannot enforce is an error; otherwise it is
    left unenforced (``lenient``), as a non-strict tool's schema is a hint."""
    schema = _tightened(schema, close=not _merges(schema)) if schema else dict(ANY_OBJECT)
    schema["x-guidance"] = {**LAYOUT, "lenient": not strict}
    return schema


def json_rule(schema: dict | None, strict: bool) -> str:
    """A Lark rule body for llguidance: ``%json {...}``."""
    return "%json " + json.dumps(with_layout(schema, strict), ensure_ascii=False)


def schema_problem(schema: dict | None, strict: bool) -> str | None:
    """Why the schema cannot be enforced, or None. No tokenizer needed."""
    from llguidance import LLMatcher  # here: the hive imports this module for every request's checks

    grammar = "%llguidance {}\nstart: " + json_rule(schema, strict)
    try:
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, RuntimeError, TypeError, OverflowError) as e:  # a schema llguidance cannot even read
        return str(e)
    if failed:
        return "; ".join(_readable(message) for message in messages)
    return None


def check_schema(schema: dict | None, strict: bool, where: str) -> None:
    problem = schema_problem(schema, strict)
    if problem is not None:
        raise UnsupportedSchema(f"{where}: {problem}")
